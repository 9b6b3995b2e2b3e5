"""PPO (RLHF step 3): actor, critic, reference and reward model as DeepSpeed engines.

Papers: PPO, https://arxiv.org/abs/1707.06347 (eq. 7); KL-penalised rewards for LMs, Ziegler et al.
https://arxiv.org/abs/1909.08593 (eq. 2) and InstructGPT, https://arxiv.org/abs/2203.02155; GAE,
https://arxiv.org/abs/1506.02438. Each step: sample responses to a batch of prompts (rollout
backend, default "hybrid": ZeRO-3 shards gathered once, KV-cached generate), score them (reward
model at the last token and/or rule rewards), per-token KL to the reference as a penalty, values
from the critic, GAE, then ppo_epochs passes of clipped policy and value losses over minibatches.

    deepspeed --num_gpus 8 launch/train.py --stage ppo --sft_model_path outputs/sft \
        --reward_model_path outputs/rm --train_file_dir data/demo/sft --template_name chatml \
        --deepspeed ds_configs/zero3.json --output_dir outputs/ppo
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import AutoConfig, set_seed

from medgpt_ds import checkpoint, dist, engine as eng, loop
from medgpt_ds.logprobs import entropy_from_logits
from medgpt_ds.losses import ppo_policy_loss, ppo_value_loss
from medgpt_ds.metrics import MetricsLogger
from medgpt_ds.model import load_model, set_zero3_init, value_model_class
from medgpt_ds.rollout import (AdaptiveKLController, FixedKLController, RLSetup, RolloutArguments, chunked,
                               critic_values, gae, global_sums, kl_estimate, no_dropout, policy_logprobs,
                               shape_rewards, whiten)


@dataclass
class Arguments(RolloutArguments):
    critic_model_path: Optional[str] = field(
        default=None, metadata={"help": "Critic init (a token classifier with one label = the value head): default "
                                        "the reward model when given, else the starting policy."})
    critic_learning_rate: Optional[float] = field(default=None, metadata={"help": "Critic LR (default --learning_rate)."})
    ppo_epochs: int = field(default=1, metadata={"help": "Passes over each rollout (minibatch = micro x grad_accum)."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip epsilon."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip around the rollout's values."})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty coefficient in the reward (initial one when adaptive)."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt kl_coef towards --target_kl (Ziegler et al.)."})
    target_kl: float = field(default=6.0, metadata={"help": "Adaptive KL target (sequence KL, nats)."})
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive KL horizon (samples)."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Normalise advantages over the rank's rollout."})
    missing_eos_penalty: Optional[float] = field(
        default=None, metadata={"help": "Subtracted from the score of responses cut at max_new_tokens (no eos)."})

    def __post_init__(self):
        super().__post_init__()
        if self.ppo_epochs <= 0:
            raise ValueError("--ppo_epochs must be positive")
        if self.cliprange <= 0 or self.cliprange_value <= 0:
            raise ValueError("--cliprange and --cliprange_value must be positive")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError("--gamma and --lam must be in [0, 1]")
        if self.kl_coef < 0:
            raise ValueError("--kl_coef must be >= 0")
        if self.adaptive_kl and (self.target_kl <= 0 or self.kl_horizon <= 0):
            raise ValueError("--adaptive_kl needs --target_kl > 0 and --kl_horizon > 0")


def load_critic(cfg, path: str, tokenizer, ds_config: dict):
    """Value model: AutoModelForTokenClassification (num_labels=1, no dropout, no bias) from ``path``;
    from a reward model the score head carries over, from a causal LM it starts at random."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    config.num_labels, config.classifier_dropout, config.token_classification_bias = 1, 0.0, False
    config.pad_token_id = tokenizer.pad_token_id
    args = dataclasses.replace(cfg.model, model_name_or_path=path, model_config=None)
    return load_model(args, cfg.train, cfg.lora, tokenizer, ds_config, model_cls=value_model_class(config),
                      extra_config={"config": config}, peft_task_type="TOKEN_CLS")


def run(cfg) -> Optional[loop.TrainState]:
    t, a = cfg.train, cfg.stage_args or Arguments()
    micro, ga = t.per_device_train_batch_size, t.gradient_accumulation_steps
    r = RLSetup(cfg, a, default_prompts_per_rank=micro * ga, samples_per_prompt=1)
    set_seed(t.seed)
    world = dist.world_size()
    n_prompts = r.prompts_per_rank
    minibatches = n_prompts // (micro * ga)
    updates_per_step = a.ppo_epochs * minibatches
    total_updates = r.total_steps * updates_per_step

    ds_config = eng.build_ds_config(cfg, hidden_size=r.hidden_size, num_training_steps=total_updates)
    actor, ref, _ = r.build_engines(ds_config, total_updates)
    critic_path = a.critic_model_path or a.reward_model_path or r.policy_path
    set_zero3_init(ds_config)
    critic_lr = a.critic_learning_rate or t.learning_rate
    critic_cfg = json.loads(json.dumps(ds_config))
    critic_cfg.pop("hybrid_engine", None)  # the critic never generates
    critic_cfg["optimizer"]["params"]["lr"] = critic_lr
    if "warmup_max_lr" in critic_cfg.get("scheduler", {}).get("params", {}):
        critic_cfg["scheduler"]["params"]["warmup_max_lr"] = critic_lr
    critic_model = load_critic(cfg, critic_path, r.tokenizer, critic_cfg)
    no_dropout(critic_model)
    critic, _, _ = eng.init_train_engine(critic_model, critic_cfg, dataclasses.replace(t, learning_rate=critic_lr),
                                         total_updates)
    dist.print0(f"ppo: {n_prompts} prompts per rank per step ({n_prompts * world} in all), {minibatches} minibatch(es) "
                f"x {a.ppo_epochs} epoch(s) = {updates_per_step} updates per step; critic from {critic_path}")

    r.seed_rollouts()
    state = loop.TrainState(extra={"kl_coef": a.kl_coef})
    if r.resume:
        saved = checkpoint.load(actor, r.resume, load_universal=t.load_universal, extra_engines={"critic": critic})
        state = loop.TrainState(**{k: v for k, v in saved.items() if k in loop.TrainState.__dataclass_fields__})
        dist.print0(f"resumed from {r.resume} at step {state.global_step} (epoch {state.epoch}, prompt batch "
                    f"{state.step_in_epoch} of {r.steps_per_epoch})")
    kl_ctl = (AdaptiveKLController(state.extra["kl_coef"], a.target_kl, a.kl_horizon) if a.adaptive_kl
              else FixedKLController(state.extra["kl_coef"]))
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
        state.extra["kl_coef"] = kl_ctl.value
        checkpoint.save(actor, t.output_dir, state.to_dict(), run_config=cfg.to_dict(), ds_config=ds_config,
                        hf_meta=r.hf_meta(actor), save_total_limit=t.save_total_limit,
                        extra_engines={"critic": critic})

    last_saved = state.global_step if r.resume else -1
    actor.train()
    critic.train()
    while state.global_step < r.total_steps:
        loop._debug_fault(state.global_step + 1)
        # 1. rollout
        t0 = time.perf_counter()
        prompts = r.prompts_for(state.epoch, state.step_in_epoch)
        gen = r.backend.generate([p["prompt_ids"] for p in prompts])
        t1 = time.perf_counter()

        # 2. score: rewards, old log-probs, reference log-probs, values; KL-shaped rewards, GAE
        mask = gen.response_mask
        score, parts = r.score(gen, [p["answer"] for p in prompts], micro)
        old_logps = chunked(lambda g: policy_logprobs(actor, g, temperature)[0], gen, micro)
        ref_logps = chunked(ref_logprobs, gen, micro)
        values = chunked(lambda g: critic_values(critic, g), gen, micro).masked_fill(~mask, 0.0)
        kl = kl_estimate(old_logps, ref_logps, a.kl_estimator).masked_fill(~mask, 0.0)  # (B, R)
        coef = kl_ctl.value
        rewards = shape_rewards(score, kl, mask, coef, a.missing_eos_penalty, gen.has_eos)
        advantages, returns = gae(rewards, values, mask, a.gamma, a.lam)
        if a.whiten_advantages:
            advantages = whiten(advantages, mask)
        t2 = time.perf_counter()

        # 3. train: ppo_epochs over shuffled minibatches of micro x grad_accum rollouts
        sums: dict[str, float] = {}
        g = torch.Generator().manual_seed(t.seed * 1000003 + state.global_step)
        for _ in range(a.ppo_epochs):
            perm = torch.randperm(len(gen), generator=g)
            for start in range(0, len(gen), micro * ga):
                rows = perm[start:start + micro * ga]
                tokens = dist.all_reduce_sum(mask[rows].sum().double().to(dist.device())).item()
                norm = max(tokens, 1.0) / (world * ga)  # global token mean over the minibatch
                for j in range(ga):
                    idx = rows[j * micro:(j + 1) * micro]
                    sub = gen.select(idx)
                    logps, logits = policy_logprobs(actor, sub, temperature)
                    pg_loss, pm = ppo_policy_loss(logps, old_logps[idx], advantages[idx], sub.response_mask,
                                                  a.cliprange, num_tokens=norm)
                    actor.backward(pg_loss)
                    actor.step()
                    with torch.no_grad():
                        entropy = entropy_from_logits(logits.detach(), sub.response_mask)
                    vpred = critic_values(critic, sub)
                    vf_loss, vm = ppo_value_loss(vpred, values[idx], returns[idx], sub.response_mask,
                                                 a.cliprange_value, num_tokens=norm)
                    critic.backward(vf_loss)
                    critic.step()
                    n = float(sub.response_mask.sum())
                    for k, v in {"policy_loss": pg_loss.item() * norm / max(n, 1.0), "value_loss": vf_loss.item() * norm / max(n, 1.0),
                                 "entropy": entropy.sum().item() / max(n, 1.0), **pm, **vm}.items():
                        sums[k] = sums.get(k, 0.0) + float(v) * n
                    sums["_tokens"] = sums.get("_tokens", 0.0) + n
        t3 = time.perf_counter()

        # 4. bookkeeping: metrics over all ranks, KL controller, checkpoint, stop signal
        seq_kl = kl.sum(-1)  # (B,)
        fmask = mask.float()
        resid = (returns - values) * fmask
        keys = sorted(k for k in sums if k != "_tokens")
        tot = global_sums([len(gen), score.sum(), (score ** 2).sum(), seq_kl.sum(), fmask.sum(), gen.has_eos.sum(),
                           (returns * fmask).sum(), (returns ** 2 * fmask).sum(), resid.sum(), (resid ** 2).sum(),
                           sums["_tokens"]] + [sums[k] for k in keys] + [parts[k].sum() for k in sorted(parts)])
        n_seq, n_tok = tot[0], tot[4]
        ret_var = tot[7] / n_tok - (tot[6] / n_tok) ** 2
        res_var = tot[9] / n_tok - (tot[8] / n_tok) ** 2
        mean_kl = tot[3] / n_seq
        kl_ctl.update(mean_kl, int(n_seq))
        steps_min = -dist.all_reduce_max(torch.tensor([-gen.steps], device=dist.device())).item()
        steps_max = dist.all_reduce_max(torch.tensor([gen.steps], device=dist.device())).item()
        rec = {"reward": tot[1] / n_seq, "reward_std": math.sqrt(max(tot[2] / n_seq - (tot[1] / n_seq) ** 2, 0.0)),
               "kl": mean_kl, "kl_coef": coef, "non_score_reward": -coef * mean_kl,
               "explained_variance": 1.0 - res_var / ret_var if ret_var > 0 else float("nan"),
               "response_length": n_tok / n_seq, "eos_fraction": tot[5] / n_seq,
               "generation_steps_min": steps_min, "generation_steps_max": steps_max}
        rec.update({k: tot[11 + i] / tot[10] for i, k in enumerate(keys)})
        rec.update({f"reward/{k}": tot[11 + len(keys) + i] / n_seq for i, k in enumerate(sorted(parts))})
        state.extra["kl_coef"] = kl_ctl.value
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
