"""PPO (RLHF step 3): actor, critic, reference and reward model as DeepSpeed engines.

Papers: PPO, https://arxiv.org/abs/1707.06347 (eq. 7); KL-penalised rewards for LMs, Ziegler et al.
https://arxiv.org/abs/1909.08593 (eq. 2) and InstructGPT, https://arxiv.org/abs/2203.02155; GAE,
https://arxiv.org/abs/1506.02438. Each step: sample responses to a batch of prompts (rollout
backend, default "hybrid": ZeRO-3 shards gathered once, KV-cached generate), score them (reward
model at the last token and/or rule rewards), per-token KL to the reference as a penalty, values
from the critic, GAE, then ppo_epochs passes of clipped policy and value losses over minibatches.
--advantage_estimator rloo (RLOO, https://arxiv.org/abs/2402.14740: num_generations samples per prompt,
leave-one-out baseline; what MedicalGPT's run_ppo.sh trains through TRL), reinforce_pp (REINFORCE++,
https://arxiv.org/abs/2501.03262) or grpo train without a critic: KL-shaped rewards summed to go;
--dynamic_sampling (DAPO, https://arxiv.org/abs/2503.14476) then drops prompt groups whose rewards are
all equal and tops up from the next prompts.
With --rollout_backend vllm the policy loss is weighted by truncated importance ratios of the engine
mismatch.

    deepspeed --num_gpus 8 launch/train.py --stage ppo --sft_model_path outputs/sft \
        --reward_model_path outputs/rm --train_file_dir data/demo/sft --template_name chatml \
        --deepspeed ds_configs/zero3.json --output_dir outputs/ppo
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import AutoConfig, set_seed

from medgpt_ds import checkpoint, dist, engine as eng, generation, rl
from medgpt_ds.advantages import AdaptiveKLController, FixedKLController, gae, shape_rewards, whiten
from medgpt_ds.config import RolloutArguments
from medgpt_ds.convert import write_hf_meta
from medgpt_ds.data.templates import get_chat_template
from medgpt_ds.logprobs import entropy_from_logits
from medgpt_ds.losses import ppo_policy_loss, ppo_value_loss
from medgpt_ds.model import load_model, load_tokenizer, value_model_class
from medgpt_ds.run_state import RunState, TrainState, debug_fault
from medgpt_ds.scoring import (critic_values, in_chunks, policy_logprobs, reference_logprobs, rollout_logprobs,
                               sequence_rewards)


@dataclass
class Arguments(RolloutArguments):
    critic_model_path: Optional[str] = field(
        default=None, metadata={"help": "Critic init (a token classifier with one label = the value head): default "
                                        "the reward model when given, else the starting policy."})
    critic_learning_rate: Optional[float] = field(default=None, metadata={"help": "Critic LR (default --learning_rate)."})
    num_generations: int = field(
        default=1, metadata={"help": "Responses sampled per prompt (k; adjacent rows). rloo and grpo advantages need "
                                     ">= 2 (the baseline comes from the other samples of the prompt)."})
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
    dynamic_sampling: bool = field(
        default=False, metadata={"help": "DAPO dynamic sampling (group estimators rloo, grpo, reinforce_pp with "
                                         "--num_generations >= 2): drop prompt groups whose rewards are all equal (no "
                                         "advantage) and generate for the next prompts until every rank has "
                                         "rollout_batch_size groups with a signal (counted in the log)."})
    max_sampling_rounds: int = field(
        default=3, metadata={"help": "Dynamic sampling: at most this many extra generation rounds per step; groups "
                                     "still missing then are filled with dropped ones (zero advantage, counted)."})

    def __post_init__(self):
        super().__post_init__()
        if self.ppo_epochs <= 0:
            raise ValueError("--ppo_epochs must be positive")
        if self.num_generations <= 0:
            raise ValueError("--num_generations must be positive")
        if self.advantage_estimator in ("rloo", "grpo") and self.num_generations < 2:
            raise ValueError(f"--advantage_estimator {self.advantage_estimator} compares the samples of a prompt: set "
                             "--num_generations >= 2")
        if self.dynamic_sampling and (self.advantage_estimator in (None, "gae") or self.num_generations < 2):
            raise ValueError("--dynamic_sampling drops prompt groups whose samples all scored the same: it needs a group "
                             "estimator (--advantage_estimator rloo, grpo or reinforce_pp) and --num_generations >= 2, "
                             f"got {self.advantage_estimator or 'gae'} with {self.num_generations}")
        if self.max_sampling_rounds < 0:
            raise ValueError("--max_sampling_rounds must be >= 0")
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


def run(cfg) -> Optional[TrainState]:
    t, d, a = cfg.train, cfg.data, cfg.stage_args or Arguments()
    micro, ga, k = t.per_device_train_batch_size, t.gradient_accumulation_steps, a.num_generations
    est = rl.estimator(a, t.stage)
    use_critic = est == "gae"

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
    n_prompts = a.rollout_batch_size or micro * ga // math.gcd(micro * ga, k)
    steps_per_epoch, total_steps = rl.prompt_steps(cfg, len(items), n_prompts, k)
    minibatches = n_prompts * k // (micro * ga)
    updates_per_step = a.ppo_epochs * minibatches
    total_updates = total_steps * updates_per_step
    reward_fns = rl.reward_functions(a, t.stage, items)
    params = rl.sampling_params(a, tokenizer)
    truncation = (a.top_k, a.top_p) if a.temperature > 0 else (0, 1.0)  # what the sampler drew from
    set_seed(t.seed)

    # 2. engines: actor and critic (trained; no critic for rloo / reinforce_pp / grpo), reference and
    # reward model (frozen), rollout backend
    ds_config = eng.build_ds_config(cfg, hidden_size=getattr(model_config, "hidden_size", None),
                                    num_training_steps=total_updates)
    generation.patch_ds_config(a.rollout_backend, ds_config, d.max_source_length + a.max_new_tokens)
    zero3 = eng.zero_stage(ds_config) == 3
    actor = rl.load_actor(cfg, model_args, tokenizer, ds_config, total_updates)
    ref, reward_engine = rl.frozen_engines(cfg, a, tokenizer, ds_config, policy_path, with_reference=True)
    backend = generation.make_backend(a.rollout_backend, actor, tokenizer, params, zero3=zero3, args=a, cfg=cfg)
    critic, critic_path = None, None
    if use_critic:
        critic_path = a.critic_model_path or a.reward_model_path or policy_path
        critic_lr = a.critic_learning_rate or t.learning_rate
        critic_cfg = json.loads(json.dumps(ds_config))
        critic_cfg.pop("hybrid_engine", None)  # the critic never generates
        critic_cfg["optimizer"]["params"]["lr"] = critic_lr
        if "warmup_max_lr" in critic_cfg.get("scheduler", {}).get("params", {}):
            critic_cfg["scheduler"]["params"]["warmup_max_lr"] = critic_lr
        critic_model = load_critic(cfg, critic_path, tokenizer, critic_cfg)
        rl.no_dropout(critic_model)
        critic, _, _ = eng.init_train_engine(critic_model, critic_cfg, dataclasses.replace(t, learning_rate=critic_lr),
                                             total_updates)
    dist.print0(f"ppo: {n_prompts} prompts x {k} responses per rank per step ({n_prompts * world * k} in all), "
                f"{minibatches} minibatch(es) x {a.ppo_epochs} epoch(s) = {updates_per_step} updates per step; "
                + (f"critic from {critic_path}" if use_critic else f"advantages {est}, no critic")
                + (f", dynamic sampling (up to {a.max_sampling_rounds} extra rounds)" if a.dynamic_sampling else ""))

    def hf_meta(tag_dir: str) -> None:
        write_hf_meta(tag_dir, actor.module, tokenizer, model_kind="causal_lm", base_model=policy_path,
                      torch_dtype=str(next(actor.module.parameters()).dtype))

    sync_times: list[float] = []  # the backend's weight-sync seconds inside this step's generate calls
    reward_times: list[float] = []  # seconds spent on rewards inside rollout() (timed as scoring)

    def rollout(batch: int):
        """Generate and score the prompt batch ``batch`` (counted over epochs): (gen, score, parts)."""
        prompts = rl.prompts_for(items, batch // steps_per_epoch, batch % steps_per_epoch, n_prompts, t.seed)
        gen = backend.generate([p["prompt_ids"] for p in prompts for _ in range(k)])
        sync_times.append(rl.backend_stats(backend).get("weight_sync/seconds", 0.0))
        ts = time.perf_counter()
        score, parts = sequence_rewards(gen, [p["answer"] for p in prompts for _ in range(k)], tokenizer,
                                        reward_fns, reward_engine, a.reward_model_weight, micro)
        reward_times.append(time.perf_counter() - ts)
        return gen, score, parts

    # ranks sample from their own streams (same-seeded ranks would draw the same tokens for similar
    # prompts); set after every model is built, before a resume restores each rank's stream
    set_seed(t.seed + dist.rank())
    run_state = RunState(cfg, actor, tokenizer, ds_config=ds_config, total_steps=total_steps,
                         steps_per_epoch=steps_per_epoch, resume_dir=resume, hf_meta=hf_meta,
                         extra_engines={"critic": critic} if use_critic else None, extra={"kl_coef": a.kl_coef},
                         export_name="actor")
    state = run_state.resume()
    kl_ctl = (AdaptiveKLController(state.extra["kl_coef"], a.target_kl, a.kl_horizon) if a.adaptive_kl
              else FixedKLController(state.extra["kl_coef"]))
    temperature = params.logit_temperature

    # 3. loop: rollout, score, update
    actor.train()
    if use_critic:
        critic.train()
    with closing(backend):
        while state.global_step < total_steps:
            debug_fault(state.global_step + 1)
            # rollout and rewards: the k responses of a prompt are adjacent rows on the same rank; the prompt
            # batch cursor is checkpointed (dynamic sampling may use several batches per step)
            t0 = time.perf_counter()
            cursor = state.extra.get("prompt_batches", state.epoch * steps_per_epoch + state.step_in_epoch)
            sync_times.clear()
            reward_times.clear()
            gen, score, parts, rounds, ds = rl.sampled_rollout(rollout, cursor, k, n_prompts, a, tokenizer.pad_token_id)
            rl.check_weight_version(gen, actor.global_steps)
            sync_s, reward_s = sum(sync_times), sum(reward_times)
            t1 = time.perf_counter()

            # score: old (trainer) and reference log-probs, values; KL-shaped rewards, advantages; the
            # engine mismatch correction
            mask = gen.response_mask
            old_logps, sampled_logps = in_chunks(lambda g: rollout_logprobs(actor, g, temperature, *truncation), gen,
                                                 micro)
            ref_logps = in_chunks(lambda g: reference_logprobs(actor, ref, g, temperature), gen, micro)
            kl = rl.reference_kl(old_logps, ref_logps, mask, a.kl_estimator)  # (B, R)
            coef = kl_ctl.value
            values = returns = None
            if use_critic:
                values = in_chunks(lambda g: critic_values(critic, g), gen, micro).masked_fill(~mask, 0.0)
                rewards = shape_rewards(score, kl, mask, coef, a.missing_eos_penalty, gen.has_eos)
                advantages, returns = gae(rewards, values, mask, a.gamma, a.lam)
                if a.whiten_advantages:
                    advantages = whiten(advantages, mask)
            else:
                advantages = rl.critic_free_advantages(est, score, kl, mask, k, coef,
                                                       a.gamma if est == "reinforce_pp" else 1.0,
                                                       a.missing_eos_penalty, gen.has_eos)
            is_weights, mismatch, max_diff = rl.engine_correction(gen, old_logps, sampled_logps,
                                                                  a.vllm_importance_sampling_cap)
            t2 = time.perf_counter()

            # train: ppo_epochs over shuffled minibatches of micro x grad_accum rollouts
            sums: dict[str, float] = {}
            sync_train = 0.0
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
                                                      a.cliprange, num_tokens=norm,
                                                      is_weights=None if is_weights is None else is_weights[idx])
                        actor.backward(pg_loss)
                        actor.step()
                        with torch.no_grad():
                            entropy = entropy_from_logits(logits.detach(), sub.response_mask)
                        n = float(sub.response_mask.sum())
                        step_metrics = {"policy_loss": pg_loss.item() * norm / max(n, 1.0),
                                        "entropy": entropy.sum().item() / max(n, 1.0), **pm}
                        if use_critic:
                            vpred = critic_values(critic, sub)
                            vf_loss, vm = ppo_value_loss(vpred, values[idx], returns[idx], sub.response_mask,
                                                         a.cliprange_value, num_tokens=norm)
                            critic.backward(vf_loss)
                            critic.step()
                            step_metrics.update({"value_loss": vf_loss.item() * norm / max(n, 1.0), **vm})
                        for key, v in step_metrics.items():
                            sums[key] = sums.get(key, 0.0) + float(v) * n
                        sums["_tokens"] = sums.get("_tokens", 0.0) + n
                    ts = time.perf_counter()
                    backend.update_weights(actor.global_steps)
                    sync_train += time.perf_counter() - ts
            t3 = time.perf_counter()

            # bookkeeping: metrics over all ranks (by name), KL controller, log, checkpoint, stop signal
            seq_kl = kl.sum(-1)  # (B,)
            fmask = mask.float()
            critic_sums = {}
            if use_critic:
                resid = (returns - values) * fmask
                critic_sums = {"ret": (returns * fmask).sum(), "ret_sq": (returns ** 2 * fmask).sum(),
                               "resid": resid.sum(), "resid_sq": (resid ** 2).sum()}
            groups = {"zero_std": (score.view(-1, k).std(dim=1) < 1e-6).sum()} if k > 1 else {}
            tot = dist.all_reduce_dict({
                "n_seq": len(gen), "score": score.sum(), "score_sq": (score ** 2).sum(), "kl": seq_kl.sum(),
                "n_tok": fmask.sum(), "eos": gen.has_eos.sum(), **critic_sums, **mismatch, **groups, **ds,
                **{f"sum/{key}": v for key, v in sums.items()}, **{f"reward/{key}": v.sum() for key, v in parts.items()}})
            n_seq, n_tok = tot["n_seq"], tot["n_tok"]
            mean_kl = tot["kl"] / n_seq
            kl_ctl.update(mean_kl, int(n_seq))
            steps = dist.all_reduce_max(torch.tensor([-gen.steps, gen.steps, max_diff], dtype=torch.float64,
                                                     device=dist.device())).tolist()
            rec = {"reward": tot["score"] / n_seq,
                   "reward_std": math.sqrt(max(tot["score_sq"] / n_seq - (tot["score"] / n_seq) ** 2, 0.0)),
                   "kl": mean_kl, "kl_coef": coef, "non_score_reward": -coef * mean_kl,
                   "response_length": n_tok / n_seq, "eos_fraction": tot["eos"] / n_seq,
                   "generation_steps_min": -steps[0], "generation_steps_max": steps[1],
                   "rollout/weight_version": float(gen.weight_version)}
            if groups:  # prompt groups (of the trained batch) whose k rewards are all equal
                rec["frac_reward_zero_std"] = tot["zero_std"] / (n_seq / k)
            if use_critic:
                ret_var = tot["ret_sq"] / n_tok - (tot["ret"] / n_tok) ** 2
                res_var = tot["resid_sq"] / n_tok - (tot["resid"] / n_tok) ** 2
                rec["explained_variance"] = 1.0 - res_var / ret_var if ret_var > 0 else float("nan")
            rec.update({key: tot[f"sum/{key}"] / tot["sum/_tokens"] for key in sorted(sums) if key != "_tokens"})
            rec.update({f"reward/{key}": tot[f"reward/{key}"] / n_seq for key in sorted(parts)})
            if mismatch:
                rec.update(rl.mismatch_metrics(tot, steps[2]))
            if ds:
                rec.update({key: tot[key] for key in ds})
                rec["dynamic_sampling/rounds"] = float(rounds)
            state.extra["kl_coef"] = kl_ctl.value
            rec.update(rl.timing(t1 - t0 - sync_s - reward_s, t2 - t1 + reward_s, t3 - t2 - sync_train,
                                 sync_s + sync_train))
            rec["lr"] = actor.get_lr()[0]
            state.extra["prompt_batches"] = cursor + rounds
            run_state.after_step(n_prompts * world * rounds, rec)
            if run_state.should_stop():
                return state
    return run_state.finish()
