"""GRPO: G sampled responses per prompt, group-normalised rewards as advantages, no critic.

Paper: DeepSeekMath, https://arxiv.org/abs/2402.03300 (eq. 3-4); Dr. GRPO (no std scaling, length
normaliser), https://arxiv.org/abs/2503.20783; DAPO (token-level loss, clip-higher),
https://arxiv.org/abs/2503.14476. Each step: num_generations responses to each prompt (rollout
backend, default "hybrid": ZeRO-3 shards gathered once, KV-cached generate), rewards from rules
(format, answer match, module:function) and/or a reward model, advantages (r - mean_group) /
std_group, then num_iterations passes of the clipped objective with beta x k3 KL to the reference.
--advantage_estimator rloo (Ahmadian et al., https://arxiv.org/abs/2402.14740) or reinforce_pp
(REINFORCE++, https://arxiv.org/abs/2501.03262) put the KL into the reward instead; --dynamic_sampling
(DAPO) drops groups whose rewards are all equal and tops up from the next prompts. With
--rollout_backend vllm the loss is weighted by truncated importance ratios of the engine mismatch.
Data: MedicalGPT's `question`/`answer` records, `prompt`/`answer`, or sft conversations.

    deepspeed --num_gpus 8 launch/train.py --stage grpo --model_name_or_path outputs/sft \
        --train_file_dir data/demo/grpo --template_name chatml --num_generations 8 \
        --reward_funcs format,answer_choice --reward_weights 0.5,1.0 \
        --deepspeed ds_configs/zero3.json --output_dir outputs/grpo
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import AutoConfig, set_seed

from medgpt_ds import checkpoint, dist, engine as eng, generation, rl
from medgpt_ds.advantages import group_advantages
from medgpt_ds.config import RolloutArguments
from medgpt_ds.convert import write_hf_meta
from medgpt_ds.data.templates import get_chat_template
from medgpt_ds.logprobs import entropy_from_logits
from medgpt_ds.losses import GRPO_LOSS_TYPES, grpo_loss
from medgpt_ds.model import load_tokenizer
from medgpt_ds.run_state import RunState, TrainState, debug_fault
from medgpt_ds.scoring import in_chunks, policy_logprobs, reference_logprobs, rollout_logprobs, sequence_rewards

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
    dynamic_sampling: bool = field(
        default=False, metadata={"help": "DAPO dynamic sampling: drop prompt groups whose rewards are all equal (no "
                                         "advantage) and generate for the next prompts until every rank has "
                                         "rollout_batch_size groups with a signal (counted in the log)."})
    max_sampling_rounds: int = field(
        default=3, metadata={"help": "Dynamic sampling: at most this many extra generation rounds per step; groups "
                                     "still missing then are filled with dropped ones (zero advantage, counted)."})

    def __post_init__(self):
        super().__post_init__()
        if self.max_sampling_rounds < 0:
            raise ValueError("--max_sampling_rounds must be >= 0")
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


def run(cfg) -> Optional[TrainState]:
    t, d, a = cfg.train, cfg.data, cfg.stage_args or Arguments()
    micro, ga, G = t.per_device_train_batch_size, t.gradient_accumulation_steps, a.num_generations
    est = rl.estimator(a, t.stage)

    # 1. setup: checks, tokenizer, prompts, batch arithmetic, rewards, sampling
    policy_path = rl.check_model_paths(cfg, a)
    dist.init(t.ddp_timeout)
    dist.announce()
    model_config = AutoConfig.from_pretrained(policy_path, trust_remote_code=cfg.model.trust_remote_code)
    generation.check_backend(a.rollout_backend, model_type=model_config.model_type, device_type=dist.device().type,
                             use_peft=cfg.lora.use_peft, cfg=cfg, model_config=model_config)
    resume = checkpoint.prepare_output_dir(cfg)
    model_args = dataclasses.replace(cfg.model, model_name_or_path=policy_path)
    tokenizer = load_tokenizer(model_args)
    tokenizer.chat_template = get_chat_template(d.template_name, tokenizer)
    items = rl.load_prompts(d, tokenizer, t.seed, t.output_dir)
    world = dist.world_size()
    n_prompts = a.rollout_batch_size or micro * ga // math.gcd(micro * ga, G)
    steps_per_epoch, total_steps = rl.prompt_steps(cfg, len(items), n_prompts, G)
    minibatches = n_prompts * G // (micro * ga)
    total_updates = total_steps * a.num_iterations * minibatches
    kl_in_reward = est != "grpo" and a.beta != 0  # rloo / reinforce_pp: beta x KL per token in the reward
    loss_beta = a.beta if est == "grpo" else 0.0
    reward_fns = rl.reward_functions(a, t.stage, items)
    params = rl.sampling_params(a, tokenizer)
    truncation = (a.top_k, a.top_p) if a.temperature > 0 else (0, 1.0)  # what the sampler drew from
    set_seed(t.seed)

    # 2. engines: actor (trained), reference and reward model (frozen), rollout backend
    ds_config = eng.build_ds_config(cfg, hidden_size=getattr(model_config, "hidden_size", None),
                                    num_training_steps=total_updates)
    generation.patch_ds_config(a.rollout_backend, ds_config, d.max_source_length + a.max_new_tokens)
    zero3 = eng.zero_stage(ds_config) == 3
    actor = rl.load_actor(cfg, model_args, tokenizer, ds_config, total_updates)
    ref, reward_engine = rl.frozen_engines(cfg, a, tokenizer, ds_config, policy_path, with_reference=a.beta != 0)
    backend = generation.make_backend(a.rollout_backend, actor, tokenizer, params, zero3=zero3, args=a, cfg=cfg)
    dist.print0(f"grpo: {n_prompts} prompts x {G} responses per rank per step ({n_prompts * world * G} in all), "
                f"{minibatches} minibatch(es) x {a.num_iterations} iteration(s) per step, loss {a.loss_type}, "
                f"advantages {est}" + (f", dynamic sampling (up to {a.max_sampling_rounds} extra rounds)"
                                       if a.dynamic_sampling else ""))

    def hf_meta(tag_dir: str) -> None:
        write_hf_meta(tag_dir, actor.module, tokenizer, model_kind="causal_lm", base_model=policy_path,
                      torch_dtype=str(next(actor.module.parameters()).dtype))

    sync_times: list[float] = []  # the backend's weight-sync seconds inside this step's generate calls

    def rollout(batch: int):
        """Generate and score the prompt batch ``batch`` (counted over epochs): (gen, score, parts)."""
        prompts = rl.prompts_for(items, batch // steps_per_epoch, batch % steps_per_epoch, n_prompts, t.seed)
        gen = backend.generate([p["prompt_ids"] for p in prompts for _ in range(G)])
        sync_times.append(rl.backend_stats(backend).get("weight_sync/seconds", 0.0))
        score, parts = sequence_rewards(gen, [p["answer"] for p in prompts for _ in range(G)], tokenizer,
                                        reward_fns, reward_engine, a.reward_model_weight, micro)
        return gen, score, parts

    # ranks sample from their own streams (same-seeded ranks would draw the same tokens for similar
    # prompts); set after every model is built, before a resume restores each rank's stream
    set_seed(t.seed + dist.rank())
    run_state = RunState(cfg, actor, tokenizer, ds_config=ds_config, total_steps=total_steps,
                         steps_per_epoch=steps_per_epoch, resume_dir=resume, hf_meta=hf_meta,
                         export_name="actor")
    state = run_state.resume()
    temperature = params.logit_temperature

    # 3. loop: rollout, score, update
    actor.train()
    with closing(backend):
        while state.global_step < total_steps:
            debug_fault(state.global_step + 1)
            # rollout: the G responses of a prompt are adjacent rows on the same rank; the prompt batch
            # cursor is checkpointed (dynamic sampling may use several batches per step)
            t0 = time.perf_counter()
            cursor = state.extra.get("prompt_batches", state.epoch * steps_per_epoch + state.step_in_epoch)
            sync_times.clear()
            gen, score, parts, rounds, ds = rl.sampled_rollout(rollout, cursor, G, n_prompts, a, tokenizer.pad_token_id)
            rl.check_weight_version(gen, actor.global_steps)
            sync_s = sum(sync_times)
            t1 = time.perf_counter()

            # score: advantages, old (trainer) and reference log-probs, the engine mismatch correction
            mask = gen.response_mask
            need_old = a.num_iterations > 1 or minibatches > 1 or gen.logprobs is not None or kl_in_reward
            old_logps = sampled_logps = None  # None: on-policy, the ratio is exactly 1
            if need_old:
                old_logps, sampled_logps = in_chunks(lambda g: rollout_logprobs(actor, g, temperature, *truncation),
                                                     gen, micro)
            ref_logps = (in_chunks(lambda g: reference_logprobs(actor, ref, g, temperature), gen, micro)
                         if a.beta != 0 else None)
            if est == "grpo":
                advantages = group_advantages(score, G, scale_std=a.scale_rewards)  # (B,)
                kl = None
            else:
                kl = rl.reference_kl(old_logps, ref_logps, mask, a.kl_estimator)
                advantages = rl.critic_free_advantages(est, score, kl, mask, G, a.beta)  # (B, R)
            is_weights, mismatch, max_diff = rl.engine_correction(gen, old_logps, sampled_logps,
                                                                  a.vllm_importance_sampling_cap)
            t2 = time.perf_counter()

            # train: num_iterations over shuffled minibatches of micro x grad_accum responses
            sums: dict[str, float] = {}
            loss_sum = sync_train = 0.0
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
                                            None if ref_logps is None or loss_beta == 0 else ref_logps[idx],
                                            advantages[idx], sub.response_mask, beta=loss_beta, eps_low=a.epsilon,
                                            eps_high=a.epsilon_high or a.epsilon, loss_type=a.loss_type,
                                            max_completion_length=a.max_new_tokens, num_tokens=num_tokens,
                                            num_sequences=num_sequences,
                                            is_weights=None if is_weights is None else is_weights[idx])
                        actor.backward(loss)
                        actor.step()
                        loss_sum += loss.item() / (world * ga)
                        with torch.no_grad():
                            entropy = entropy_from_logits(logits.detach(), sub.response_mask)
                        n = float(sub.response_mask.sum())
                        for k, v in {"entropy": entropy.sum().item() / max(n, 1.0), **m}.items():
                            sums[k] = sums.get(k, 0.0) + float(v) * n
                        sums["_tokens"] = sums.get("_tokens", 0.0) + n
                    ts = time.perf_counter()
                    backend.update_weights(actor.global_steps)
                    sync_train += time.perf_counter() - ts
            t3 = time.perf_counter()

            # bookkeeping: metrics over all ranks (by name), log, checkpoint, stop signal
            grouped = score.view(-1, G)
            zero_std = (grouped.std(dim=1) < 1e-6).sum() if G > 1 else torch.tensor(0)
            reward_kl = {} if kl is None else {"reward_kl": kl.sum()}
            tot = dist.all_reduce_dict({"n_seq": len(gen), "score": score.sum(), "score_sq": (score ** 2).sum(),
                                        "n_tok": mask.sum(), "eos": gen.has_eos.sum(), "zero_std": zero_std,
                                        "loss": loss_sum, **{f"sum/{k}": v for k, v in sums.items()},
                                        **{f"reward/{k}": v.sum() for k, v in parts.items()}, **reward_kl,
                                        **mismatch, **ds})
            n_seq, n_tok = tot["n_seq"], tot["n_tok"]
            steps = dist.all_reduce_max(torch.tensor([-gen.steps, gen.steps, max_diff], dtype=torch.float64,
                                                     device=dist.device())).tolist()
            rec = {"loss": tot["loss"] / (a.num_iterations * minibatches), "reward": tot["score"] / n_seq,
                   "reward_std": math.sqrt(max(tot["score_sq"] / n_seq - (tot["score"] / n_seq) ** 2, 0.0)),
                   "frac_reward_zero_std": tot["zero_std"] / (n_seq / G), "response_length": n_tok / n_seq,
                   "eos_fraction": tot["eos"] / n_seq, "generation_steps_min": -steps[0],
                   "generation_steps_max": steps[1], "rollout/weight_version": float(gen.weight_version)}
            rec.update({k: tot[f"sum/{k}"] / tot["sum/_tokens"] for k in sorted(sums) if k != "_tokens"})
            rec.update({f"reward/{k}": tot[f"reward/{k}"] / n_seq for k in sorted(parts)})
            if kl is not None:
                rec["kl"] = tot["reward_kl"] / max(n_tok, 1.0)  # token-mean KL to the reference (in the reward)
            if mismatch:
                rec.update(rl.mismatch_metrics(tot, steps[2]))
            if ds:
                rec.update({k: tot[k] for k in ds})
                rec["dynamic_sampling/rounds"] = float(rounds)
            rec.update(rl.timing(t1 - t0 - sync_s, t2 - t1, t3 - t2 - sync_train, sync_s + sync_train))
            rec["lr"] = actor.get_lr()[0]
            state.extra["prompt_batches"] = cursor + rounds
            run_state.after_step(n_prompts * world * rounds, rec)
            if run_state.should_stop():
                return state
    return run_state.finish()

