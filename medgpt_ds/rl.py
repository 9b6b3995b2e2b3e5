"""What the RL stages (ppo.py, grpo.py) and opd.py share: the checks of their model paths, the prompts
and their order, the batch arithmetic, rewards, sampling settings, the actor / frozen models, and
inside the RL loops the critic-free advantages, the rollout engine's weight-version check and
off-policy correction, DAPO's dynamic sampling and the step's time split. Plain
functions; each stage calls them top to bottom.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from medgpt_ds import dist, engine as eng
from medgpt_ds.advantages import (group_advantages, kl_estimate, masked_moments, normalize, reward_to_go, rloo_scores,
                                  shape_rewards, truncated_importance_weights)
from medgpt_ds.config import LoraArguments, split_list
from medgpt_ds.data.loading import check_answers, load_train_eval
from medgpt_ds.data.templates import encode_prompt, turn_terminators
from medgpt_ds.errors import UserError
from medgpt_ds.generation import Generation, SamplingParams
from medgpt_ds.loop import epoch_order
from medgpt_ds.model import load_model
from medgpt_ds.rewards import rule_reward_functions
from medgpt_ds.scoring import LastTokenScore


def check_model_paths(cfg, a) -> str:
    """The policy to start from (--sft_model_path, else --model_name_or_path), after checking every
    model path flag of the stage; UserError naming the flag otherwise."""
    stage = cfg.train.stage
    policy = a.sft_model_path or cfg.model.model_name_or_path
    if not policy:
        raise UserError(f"--stage {stage} needs --sft_model_path (or --model_name_or_path): the policy to start from")
    if cfg.model.model_config:
        raise UserError(f"--stage {stage} starts from a trained policy (--sft_model_path), not --model_config")
    for flag in ("sft_model_path", "ref_model_path", "reward_model_path", "critic_model_path"):
        path = getattr(a, flag, None)  # a local dir, or a hub id (resolved from the hub cache)
        if path and not os.path.exists(os.path.expanduser(path)) and (
                path.startswith(("/", ".", "~")) or path.count("/") != 1):
            raise UserError(f"--{flag} {path}: no such directory")
    if a.reward_model_path and os.path.isfile(os.path.join(a.reward_model_path, "adapter_config.json")):
        raise UserError(f"--reward_model_path {a.reward_model_path} is a LoRA adapter; merge it into its base first "
                        "(tools/merge_lora.py) and pass the merged dir")
    return policy


def load_prompts(data_args, tokenizer, seed: int, output_dir: str) -> list[dict]:
    """Prompts (``question``/``answer``, ``prompt``/``answer``, or every user turn of sft conversations)
    rendered with the chat template's generation prompt and left-truncated to max_source_length:
    [{"prompt_ids": [...], "answer": str | None}]. Records --skip_bad_records drops are listed in
    ``output_dir``/rejected_records.jsonl."""
    records, eval_records, _ = load_train_eval(data_args, "prompt", seed, output_dir=output_dir)
    if eval_records:
        dist.print0(f"ppo/grpo: {len(eval_records)} validation records are not used (no evaluation pass in RL stages)")
    limit, truncated, items = data_args.max_source_length, 0, []
    for rec in records:
        ids = encode_prompt(tokenizer, tokenizer.chat_template, rec["prompt"])
        truncated += len(ids) > limit
        items.append({"prompt_ids": ids[-limit:], "answer": rec["answer"]})
    dist.print0(f"prompts: {len(items)} ({truncated} left-truncated to {limit} tokens)")
    return items


def prompt_steps(cfg, n_items: int, prompts_per_rank: int, samples_per_prompt: int) -> tuple[int, int]:
    """(steps per epoch, total steps) for ``prompts_per_rank`` prompts per rank per step, each sampled
    ``samples_per_prompt`` times; UserError when the rollouts do not fill whole minibatches of
    micro x grad_accum or the data cannot fill one step."""
    t, world = cfg.train, dist.world_size()
    micro, ga = t.per_device_train_batch_size, t.gradient_accumulation_steps
    per_rank = prompts_per_rank * samples_per_prompt
    if per_rank % (micro * ga):
        raise UserError(f"{per_rank} rollouts per rank per step ({prompts_per_rank} prompts x {samples_per_prompt}) "
                        f"must fill whole minibatches of per_device_train_batch_size x gradient_accumulation_steps = "
                        f"{micro * ga}; adjust --rollout_batch_size")
    steps_per_epoch = n_items // (prompts_per_rank * world)
    if steps_per_epoch == 0:
        raise UserError(f"{n_items} prompts cannot fill one step of {prompts_per_rank} prompts x {world} ranks; lower "
                        "--rollout_batch_size or add data")
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * steps_per_epoch))
    return steps_per_epoch, total


def prompts_for(items: list[dict], epoch: int, batch: int, per_rank: int, seed: int) -> list[dict]:
    """This rank's ``per_rank`` prompts of prompt batch ``batch`` of ``epoch`` (a seeded permutation
    per epoch, the same on every rank)."""
    world = dist.world_size()
    order = epoch_order(len(items), epoch, seed)
    start = batch * per_rank * world + dist.rank() * per_rank
    return [items[i] for i in order[start:start + per_rank]]


def reward_functions(a, stage: str, items: list[dict]) -> list:
    """[(fn, weight)] of --reward_funcs / --reward_weights; UserError when the stage has no reward at all,
    DataError when an answer reward is on and no prompt has an answer (the prompts without one are
    counted in the log: they score 0 there)."""
    names = split_list(a.reward_funcs)
    weights = [float(w) for w in split_list(a.reward_weights)] if a.reward_weights else [1.0] * len(names)
    fns = rule_reward_functions(names, weights)
    if not fns and not a.reward_model_path:
        raise UserError(f"--stage {stage} needs a reward: --reward_model_path and/or --reward_funcs")
    answer_rewards = [n for n in names if n.startswith("answer_")]
    if answer_rewards:
        missing = check_answers(items, f"--reward_funcs {','.join(answer_rewards)}")
        if missing:
            dist.print0(f"warning: {missing} of {len(items)} prompts have no 'answer': "
                        f"{','.join(answer_rewards)} scores them 0")
    return fns


def sampling_params(a, tokenizer) -> SamplingParams:
    """Rollout sampling: the flags, ending at eos, the template's end of turn and the --stop strings."""
    stop_ids, template_stops = turn_terminators(tokenizer, tokenizer.chat_template)
    return SamplingParams(max_new_tokens=a.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                          stop_token_ids=stop_ids, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          stop_strings=template_stops + a.stop_strings())


def no_dropout(model) -> None:
    """Set every dropout to 0: rollout log-probs and update log-probs must come from one policy."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def load_actor(cfg, model_args, tokenizer, ds_config: dict, total_updates: int):
    """The trained policy as a DeepSpeed engine (dropout off)."""
    model = load_model(model_args, cfg.train, cfg.lora, tokenizer, ds_config)
    no_dropout(model)
    actor, _, _ = eng.init_train_engine(model, ds_config, cfg.train, total_updates)
    return actor


def load_frozen(cfg, path: str, model_cls, tokenizer, ds_config: dict):
    """A frozen, optimizer-free engine of ``path`` (reference policy, or reward model read at its
    last token); ``ds_config`` is ``engine.frozen_ds_config`` of the training one, so under ZeRO-3
    zero.Init places the weights as the engine will hold them."""
    args = dataclasses.replace(cfg.model, model_name_or_path=path, tokenizer_name_or_path=None,
                               load_in_4bit=False, load_in_8bit=False)
    train_args = dataclasses.replace(cfg.train, gradient_checkpointing=False, neft_alpha=0.0)
    model = load_model(args, train_args, LoraArguments(), tokenizer, ds_config, model_cls=model_cls)
    if model_cls is AutoModelForSequenceClassification:
        if getattr(model.config, "num_labels", 1) != 1:
            raise UserError(f"--reward_model_path {path} has {model.config.num_labels} labels; a reward model has one "
                            "(the rm stage's export)")
        model = LastTokenScore(model)
    return eng.init_frozen_engine(model, ds_config)


def frozen_engines(cfg, a, tokenizer, ds_config: dict, policy_path: str, with_reference: bool):
    """The frozen engines of an RL step, after the actor: the reference policy when
    ``with_reference`` (none for LoRA without --ref_model_path: the reference is then the actor
    without its adapter) and the reward model of --reward_model_path; --offload_frozen puts their
    ZeRO-3 parameters on the CPU. Returns (reference or None, reward engine or None)."""
    if a.offload_frozen and eng.zero_stage(ds_config) != 3:
        dist.print0("warning: --offload_frozen needs ZeRO-3 (parameter offload); frozen models stay on the device")
    frozen_config = eng.frozen_ds_config(ds_config, offload_params=a.offload_frozen)
    ref = reward_engine = None
    if with_reference and (a.ref_model_path or not cfg.lora.use_peft):
        ref = load_frozen(cfg, a.ref_model_path or policy_path, AutoModelForCausalLM, tokenizer, frozen_config)
    if a.reward_model_path:
        reward_engine = load_frozen(cfg, a.reward_model_path, AutoModelForSequenceClassification, tokenizer,
                                    frozen_config)
    return ref, reward_engine


def estimator(a, stage: str) -> str:
    """--advantage_estimator with the stage's default (ppo: gae, grpo: grpo); UserError for gae in grpo."""
    est = a.advantage_estimator or ("gae" if stage == "ppo" else "grpo")
    if est == "gae" and stage != "ppo":
        raise UserError("--advantage_estimator gae needs a critic: use --stage ppo (grpo takes grpo, rloo, reinforce_pp)")
    return est


def critic_free_advantages(est: str, score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, group_size: int,
                           kl_coef: float, gamma: float = 1.0, missing_eos_penalty=None,
                           has_eos=None) -> torch.Tensor:
    """Per-token advantages (B, T) without a critic (OpenRLHF's estimators): the sequence score
    (minus ``missing_eos_penalty`` for responses cut at max_new_tokens) is centred per prompt group
    (``rloo``: leave-one-out; ``grpo``: (r - mean) / std), placed on the last token with ``-kl_coef x
    kl`` on every token (``advantages.shape_rewards``), and summed to go (``reward_to_go``).
    ``reinforce_pp`` (REINFORCE++) keeps the raw score and normalises the result over the GLOBAL batch
    (collective: every rank calls it). Rows of a group are adjacent (``group_size`` per prompt)."""
    if missing_eos_penalty is not None:
        score = score - missing_eos_penalty * (~has_eos.bool()).to(score.dtype)
    if est == "rloo":
        score = rloo_scores(score, group_size)
    elif est == "grpo":
        score = group_advantages(score, group_size)
    elif est != "reinforce_pp":
        raise ValueError(f"not a critic-free estimator: {est!r}")
    adv = reward_to_go(shape_rewards(score, kl, mask, kl_coef), mask, gamma)  # (B, T)
    if est == "reinforce_pp":
        m = dist.all_reduce_dict(masked_moments(adv.double(), mask))
        adv = normalize(adv, mask, m["n"], m["sum"], m["sum_sq"])
    return adv


def reference_kl(old_logps, ref_logps, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate to the reference (B, T), zero where masked (or everywhere without a reference)."""
    if ref_logps is None:
        return torch.zeros_like(mask, dtype=torch.float32)
    return kl_estimate(old_logps, ref_logps, kind).masked_fill(~mask, 0.0)


def check_weight_version(gen: Generation, step: int) -> None:
    """A backend with its own copy of the weights must have generated with the trainer's current step
    (-1: the engine's own weights, always current). Anything else is a stale-policy rollout."""
    if gen.weight_version not in (-1, step):
        raise RuntimeError(f"the rollout came from weights of step {gen.weight_version}, the trainer is at step {step}: "
                           "the rollout engine missed a weight sync")


def engine_correction(gen: Generation, trainer_logps: torch.Tensor, trainer_sampled_logps: torch.Tensor,
                      cap: float) -> tuple[Optional[torch.Tensor], dict, float]:
    """Off-policy correction for a rollout engine that reports its sampled tokens' log-probs (vLLM):
    ``(is_weights (B, R) or None, sums, max |delta|)``. The behaviour policy is the engine's log-prob, the old policy
    the trainer's recomputed one under the SAME sampling distribution (``trainer_sampled_logps``: after
    top-k / top-p, as the engine reports it), so only the engines' numerical mismatch is corrected;
    the weights are ``advantages.truncated_importance_weights`` (None with ``cap`` 0). ``sums`` (to
    reduce by name): token count, sum |delta log-prob|, sum of k3 KL(engine || trainer), IS weight
    sum and truncated count (reduce the max with a max)."""
    mask = gen.response_mask
    if gen.logprobs is None:
        return None, {}, 0.0
    # a token the trainer's truncation would not have kept: -inf, clamped so the metrics stay finite
    delta = (trainer_sampled_logps.clamp(min=-50.0) - gen.logprobs).masked_fill(~mask, 0.0)  # (B, R)
    k3 = (torch.expm1(delta) - delta).masked_fill(~mask, 0.0)
    raw = torch.exp(delta.clamp(max=20.0))
    weights = truncated_importance_weights(trainer_sampled_logps.clamp(min=-50.0), gen.logprobs, mask, cap) if cap else None
    sums = {"n": mask.sum(), "abs": delta.abs().sum(), "kl": k3.sum(), "w": (raw * mask).sum(),
            "clipped": ((raw > cap) & mask).sum() if cap else torch.tensor(0)}
    return weights, {f"mismatch/{k}": v for k, v in sums.items()}, float(delta.abs().max())


def mismatch_metrics(tot: dict, max_abs: float) -> dict:
    """The logged engine-mismatch metrics from ``engine_correction``'s sums reduced over ranks."""
    n = max(tot["mismatch/n"], 1.0)
    return {"rollout/logprob_diff_mean": tot["mismatch/abs"] / n, "rollout/logprob_diff_max": max_abs,
            "rollout/kl_engine_trainer": tot["mismatch/kl"] / n, "rollout/is_ratio_mean": tot["mismatch/w"] / n,
            "rollout/is_truncated_frac": tot["mismatch/clipped"] / n}


def concat_generations(gens: list[Generation], pad_id: int) -> Generation:
    """One Generation from several (dynamic sampling's rounds): prompts re-left-padded to the widest,
    responses re-right-padded; all must come from the same weights."""
    if len(gens) == 1:
        return gens[0]
    if len({g.weight_version for g in gens}) > 1:
        raise RuntimeError("joined rollouts came from different weight versions")
    P, R = max(g.prompt_length for g in gens), max(g.response_mask.size(1) for g in gens)
    seqs, pmask, rmask, lps = [], [], [], []
    for g in gens:
        p, r = P - g.prompt_length, R - g.response_mask.size(1)
        seqs.append(torch.nn.functional.pad(torch.nn.functional.pad(g.sequences, (p, 0), value=pad_id), (0, r),
                                            value=pad_id))
        pmask.append(torch.nn.functional.pad(g.prompt_mask, (p, 0), value=False))
        rmask.append(torch.nn.functional.pad(g.response_mask, (0, r), value=False))
        if g.logprobs is not None:
            lps.append(torch.nn.functional.pad(g.logprobs, (0, r), value=0.0))
    return Generation(torch.cat(seqs), torch.cat(pmask), torch.cat(rmask), torch.cat([g.has_eos for g in gens]),
                      steps=max(g.steps for g in gens), logprobs=torch.cat(lps) if len(lps) == len(gens) else None,
                      weight_version=gens[0].weight_version)


def sampled_rollout(rollout, cursor: int, G: int, n_prompts: int, stage_args, pad_id: int):
    """One step's rollout from prompt batch ``cursor``: (gen, score, parts, rounds, counts). With
    --dynamic_sampling, groups whose rewards are all equal are replaced from the next batches
    (``dynamic_sampling``); otherwise one round and no counts."""
    gen, score, parts = rollout(cursor)
    if not stage_args.dynamic_sampling:
        return gen, score, parts, 1, {}
    return dynamic_sampling(gen, score, parts, rollout, cursor, G, n_prompts, stage_args.max_sampling_rounds, pad_id)


def dynamic_sampling(gen, score, parts, rollout, cursor: int, G: int, n_prompts: int, max_rounds: int, pad_id: int):
    """DAPO's dynamic sampling (Yu et al. 2025, https://arxiv.org/abs/2503.14476, sec. 3.2): keep the
    prompt groups whose G rewards are not all equal, generate for the next prompt batches until this
    rank has ``n_prompts`` of them or ``max_rounds`` extra rounds ran (rounds are collective: every rank
    runs as many as the neediest), fill what is still missing with dropped groups (zero advantage).
    ``gen, score, parts`` are prompt batch ``cursor``'s rollout (G adjacent rows per prompt) and
    ``rollout(batch)`` generates and scores batch ``batch`` the same way; the caller advances its prompt
    cursor by ``rounds``. Returns (gen, score, parts, rounds, counts) with counts summed over ranks by
    the caller. Used by grpo and by ppo's group estimators."""
    kept, dropped = [], []  # (generation, score, parts) of single groups
    counts = {"dynamic_sampling/dropped_groups": 0, "dynamic_sampling/surplus_groups": 0,
              "dynamic_sampling/filled_groups": 0}
    rounds = 0
    while True:
        rounds += 1
        equal = (score.view(-1, G).std(dim=1) < 1e-6).tolist() if G > 1 else [False] * (len(score) // G)
        for i, flat in enumerate(equal):
            group = (gen.select(slice(i * G, (i + 1) * G)), score[i * G:(i + 1) * G],
                     {k: v[i * G:(i + 1) * G] for k, v in parts.items()})
            if flat:
                dropped.append(group)
                counts["dynamic_sampling/dropped_groups"] += 1
            elif len(kept) < n_prompts:
                kept.append(group)
            else:
                counts["dynamic_sampling/surplus_groups"] += 1
        short = torch.tensor([float(len(kept) < n_prompts)], device=dist.device())
        if not dist.all_reduce_max(short).item() or rounds > max_rounds:
            break
        gen, score, parts = rollout(cursor + rounds)
    while len(kept) < n_prompts:
        kept.append(dropped.pop(0))
        counts["dynamic_sampling/filled_groups"] += 1
    joined = concat_generations([g for g, _, _ in kept], pad_id)
    return (joined, torch.cat([s for _, s, _ in kept]), {k: torch.cat([p[k] for _, _, p in kept]) for k in parts},
            rounds, counts)


def backend_stats(backend) -> dict:
    """The backend's own metrics of its last generate (``stats()``, optional in the protocol)."""
    stats = getattr(backend, "stats", None)
    return stats() if stats is not None else {}


def timing(generation_s: float, scoring_s: float, training_s: float, weight_sync_s: float = 0.0) -> dict:
    """Seconds and shares of one step's generation, scoring, training and weight sync, for the log."""
    total = max(generation_s + scoring_s + training_s + weight_sync_s, 1e-9)
    return {"time/generation_s": generation_s, "time/scoring_s": scoring_s, "time/training_s": training_s,
            "time/weight_sync_s": weight_sync_s, "time/generation_share": generation_s / total,
            "time/scoring_share": scoring_s / total, "time/training_share": training_s / total,
            "time/weight_sync_share": weight_sync_s / total}
