"""What the RL stages (ppo.py, grpo.py) and opd.py share before their loops: the checks of their model paths,
the prompts and their order, the batch arithmetic, rewards, sampling settings, and the actor /
frozen models. Plain functions; each stage calls them top to bottom.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
from transformers import AutoModelForSequenceClassification

from medgpt_ds import dist, engine as eng
from medgpt_ds.config import LoraArguments, split_list
from medgpt_ds.data.loading import load_train_eval
from medgpt_ds.data.templates import encode_prompt, turn_terminators
from medgpt_ds.errors import UserError
from medgpt_ds.generation import SamplingParams
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


def reward_functions(a, stage: str) -> list:
    """[(fn, weight)] of --reward_funcs / --reward_weights; UserError when the stage has no reward at all."""
    names = split_list(a.reward_funcs)
    weights = [float(w) for w in split_list(a.reward_weights)] if a.reward_weights else [1.0] * len(names)
    fns = rule_reward_functions(names, weights)
    if not fns and not a.reward_model_path:
        raise UserError(f"--stage {stage} needs a reward: --reward_model_path and/or --reward_funcs")
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


def timing(generation_s: float, scoring_s: float, training_s: float) -> dict:
    """Seconds and shares of one step's generation, scoring and training, for the log."""
    total = max(generation_s + scoring_s + training_s, 1e-9)
    return {"time/generation_s": generation_s, "time/scoring_s": scoring_s, "time/training_s": training_s,
            "time/generation_share": generation_s / total, "time/scoring_share": scoring_s / total,
            "time/training_share": training_s / total}
