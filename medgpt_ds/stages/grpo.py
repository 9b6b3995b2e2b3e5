"""GRPO: G sampled responses per prompt, group-normalised rewards as advantages, no critic.

Paper: DeepSeekMath, https://arxiv.org/abs/2402.03300 (eq. 3-4); Dr. GRPO (no std scaling, length
normaliser), https://arxiv.org/abs/2503.20783; DAPO (token-level loss, clip-higher),
https://arxiv.org/abs/2503.14476. Each step: num_generations responses to each prompt (rollout
backend, default "hybrid": ZeRO-3 shards gathered once, KV-cached generate), rewards from rules
(format, answer match, module:function) and/or a reward model, advantages (r - mean_group) /
std_group, then num_iterations passes of the clipped objective with beta x k3 KL to the reference.
Data: MedicalGPT's `question`/`answer` records, `prompt`/`answer`, or sft conversations.

    deepspeed --num_gpus 8 launch/train.py --stage grpo --model_name_or_path outputs/sft \
        --train_file_dir data/demo/grpo --template_name chatml --num_generations 8 \
        --reward_funcs format,answer_choice --reward_weights 0.5,1.0 \
        --deepspeed ds_configs/zero3.json --output_dir outputs/grpo
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import set_seed

from medgpt_ds import checkpoint, dist, engine as eng, loop
from medgpt_ds.logprobs import entropy_from_logits
from medgpt_ds.losses import GRPO_LOSS_TYPES, grpo_loss
from medgpt_ds.metrics import MetricsLogger
from medgpt_ds.rollout import RLSetup, RolloutArguments, chunked, global_sums, group_advantages, policy_logprobs

LOSS_ALIASES = {"sequence": "grpo", "token": "bnpo"}


@dataclass
class Arguments(RolloutArguments):
    reward_funcs: Optional[str] = field(
        default="format,answer_normalized",
        metadata={"help": "Comma-separated rule rewards: format, answer_exact, answer_normalized, answer_choice, or "
                          "module.path:function (fn(completions, answers) -> floats)."})
    num_generations: int = field(default=4, metadata={"help": "G: responses sampled per prompt (the group)."})
    beta: float = field(default=0.04, metadata={"help": "Weight of the k3 KL to the reference in the loss (0: no "
                                                        "reference model at all)."})
    loss_type: str = field(
        default="grpo", metadata={"help": "grpo (= sequence: mean of per-response token means), bnpo (= token: "
                                          "token mean over the batch), dr_grpo (sum / (responses x max_new_tokens)), "
                                          "dapo (token mean over the whole generation batch)."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clip epsilon of the ratio."})
    epsilon_high: Optional[float] = field(default=None, metadata={"help": "Upper clip epsilon (DAPO clip-higher; "
                                                                          "default --epsilon)."})
    scale_rewards: bool = field(default=True, metadata={"help": "Divide advantages by the group std (False: Dr. GRPO)."})
    num_iterations: int = field(default=1, metadata={"help": "Passes over each rollout (mu in the paper)."})

    def __post_init__(self):
        super().__post_init__()
        self.loss_type = LOSS_ALIASES.get(self.loss_type, self.loss_type)
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"--loss_type must be one of {', '.join(GRPO_LOSS_TYPES)} (or token, sequence), "
                             f"got {self.loss_type!r}")
        if self.num_generations < 2:
            raise ValueError("--num_generations must be >= 2 (advantages are relative to the group)")
        if self.num_iterations <= 0:
            raise ValueError("--num_iterations must be positive")
        if self.beta < 0 or self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ValueError("--beta must be >= 0 and --epsilon / --epsilon_high > 0")


def run(cfg) -> Optional[loop.TrainState]:
    t, a = cfg.train, cfg.stage_args or Arguments()
    micro, ga, G = t.per_device_train_batch_size, t.gradient_accumulation_steps, a.num_generations
    r = RLSetup(cfg, a, default_prompts_per_rank=micro * ga // math.gcd(micro * ga, G), samples_per_prompt=G)
    set_seed(t.seed)
    world = dist.world_size()
    n_prompts = r.prompts_per_rank
    minibatches = n_prompts * G // (micro * ga)
    total_updates = r.total_steps * a.num_iterations * minibatches
    need_old = a.num_iterations > 1 or minibatches > 1  # else the update is on-policy: ratio = 1 exactly

    ds_config = eng.build_ds_config(cfg, hidden_size=r.hidden_size, num_training_steps=total_updates)
    actor, ref, _ = r.build_engines(ds_config, total_updates, need_reference=a.beta != 0)
    dist.print0(f"grpo: {n_prompts} prompts x {G} responses per rank per step ({n_prompts * world * G} in all), "
                f"{minibatches} minibatch(es) x {a.num_iterations} iteration(s) per step, loss {a.loss_type}")

    r.seed_rollouts()
    state = loop.TrainState()
    if r.resume:
        saved = checkpoint.load(actor, r.resume, load_universal=t.load_universal)
        state = loop.TrainState(**{k: v for k, v in saved.items() if k in loop.TrainState.__dataclass_fields__})
        dist.print0(f"resumed from {r.resume} at step {state.global_step} (epoch {state.epoch}, prompt batch "
                    f"{state.step_in_epoch} of {r.steps_per_epoch})")
    logger = MetricsLogger(t.output_dir, t.report_to, t.logging_dir, r.total_steps, state.global_step)
    stopper = loop.StopSignal(os.path.join(t.output_dir, ".stop"))
    temperature = r.params.logit_temperature
    window: dict[str, float] = {}

    def ref_logprobs(g):
        if ref is None:  # LoRA: the reference is the actor without its adapter
            with actor.module.disable_adapter():
                return policy_logprobs(actor, g, temperature)[0]
        return policy_logprobs(ref, g, temperature)[0]

    def save() -> None:
        checkpoint.save(actor, t.output_dir, state.to_dict(), run_config=cfg.to_dict(), ds_config=ds_config,
                        hf_meta=r.hf_meta(actor), save_total_limit=t.save_total_limit)

    last_saved = state.global_step if r.resume else -1
    actor.train()
    while state.global_step < r.total_steps:
        loop._debug_fault(state.global_step + 1)
        # 1. rollout: the G responses of a prompt are adjacent rows on the same rank
        t0 = time.perf_counter()
        prompts = r.prompts_for(state.epoch, state.step_in_epoch)
        gen = r.backend.generate([p["prompt_ids"] for p in prompts for _ in range(G)])
        t1 = time.perf_counter()

        # 2. score: rewards, group advantages, old and reference log-probs
        mask = gen.response_mask
        score, parts = r.score(gen, [p["answer"] for p in prompts for _ in range(G)], micro)
        advantages = group_advantages(score, G, scale_std=a.scale_rewards)  # (B,)
        old_logps = chunked(lambda g: policy_logprobs(actor, g, temperature)[0], gen, micro) if need_old else None
        ref_logps = chunked(ref_logprobs, gen, micro) if a.beta != 0 else None
        t2 = time.perf_counter()

        # 3. train: num_iterations over shuffled minibatches of micro x grad_accum responses
        sums: dict[str, float] = {}
        loss_sum = 0.0
        g = torch.Generator().manual_seed(t.seed * 1000003 + state.global_step)
        for _ in range(a.num_iterations):
            perm = torch.randperm(len(gen), generator=g)
            for start in range(0, len(gen), micro * ga):
                rows = perm[start:start + micro * ga]
                tokens = dist.all_reduce_sum(mask[rows].sum().double().to(dist.device())).item()
                # per-micro-batch normalisers that make the minibatch a global mean (losses.py docstring)
                num_tokens, num_sequences = max(tokens, 1.0) / (world * ga), len(rows) / ga
                for j in range(ga):
                    idx = rows[j * micro:(j + 1) * micro]
                    sub = gen.select(idx)
                    logps, logits = policy_logprobs(actor, sub, temperature)
                    loss, m = grpo_loss(logps, None if old_logps is None else old_logps[idx],
                                        None if ref_logps is None else ref_logps[idx], advantages[idx],
                                        sub.response_mask, beta=a.beta, eps_low=a.epsilon,
                                        eps_high=a.epsilon_high or a.epsilon, loss_type=a.loss_type,
                                        max_completion_length=a.max_new_tokens, num_tokens=num_tokens,
                                        num_sequences=num_sequences)
                    actor.backward(loss)
                    actor.step()
                    loss_sum += loss.item() / (world * ga)
                    with torch.no_grad():
                        entropy = entropy_from_logits(logits.detach(), sub.response_mask)
                    n = float(sub.response_mask.sum())
                    for k, v in {"entropy": entropy.sum().item() / max(n, 1.0), **m}.items():
                        sums[k] = sums.get(k, 0.0) + float(v) * n
                    sums["_tokens"] = sums.get("_tokens", 0.0) + n
        t3 = time.perf_counter()

        # 4. bookkeeping: metrics over all ranks, checkpoint, stop signal
        grouped = score.view(-1, G)
        zero_std = (grouped.std(dim=1) < 1e-6).sum() if G > 1 else torch.tensor(0)
        keys = sorted(k for k in sums if k != "_tokens")
        tot = global_sums([len(gen), score.sum(), (score ** 2).sum(), mask.sum(), gen.has_eos.sum(), zero_std,
                           loss_sum, sums["_tokens"]] + [sums[k] for k in keys] + [parts[k].sum() for k in sorted(parts)])
        n_seq, n_tok = tot[0], tot[3]
        steps_min = -dist.all_reduce_max(torch.tensor([-gen.steps], device=dist.device())).item()
        steps_max = dist.all_reduce_max(torch.tensor([gen.steps], device=dist.device())).item()
        rec = {"loss": tot[6] / (a.num_iterations * minibatches), "reward": tot[1] / n_seq,
               "reward_std": math.sqrt(max(tot[2] / n_seq - (tot[1] / n_seq) ** 2, 0.0)),
               "frac_reward_zero_std": tot[5] / (n_seq / G), "response_length": n_tok / n_seq,
               "eos_fraction": tot[4] / n_seq, "generation_steps_min": steps_min, "generation_steps_max": steps_max}
        rec.update({k: tot[8 + i] / tot[7] for i, k in enumerate(keys)})
        rec.update({f"reward/{k}": tot[8 + len(keys) + i] / n_seq for i, k in enumerate(sorted(parts))})
        rec.update(r.timing(t1 - t0, t2 - t1, t3 - t2))
        rec["lr"] = actor.get_lr()[0]
        state.global_step += 1
        state.step_in_epoch += 1
        state.consumed_items += n_prompts * world
        if state.step_in_epoch >= r.steps_per_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        logger.advance()
        for k, v in rec.items():
            window[k] = window.get(k, 0.0) + v
        window["_n"] = window.get("_n", 0) + 1
        if state.global_step % t.logging_steps == 0 or state.global_step == r.total_steps:
            logger.log(state.global_step, {k: v / window["_n"] for k, v in window.items() if k != "_n"})
            window = {}
        if t.save_steps and state.global_step % t.save_steps == 0:
            save()
            last_saved = state.global_step
        if stopper.should_stop():
            return r.preempt(state, save if last_saved != state.global_step else None, logger, stopper)

    if last_saved != state.global_step:
        save()
    r.finish(actor, logger)
    return state
