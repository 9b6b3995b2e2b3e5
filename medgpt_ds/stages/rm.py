"""Reward modeling: a scalar head on the LM, trained with the pairwise Bradley-Terry loss.

Paper: InstructGPT, https://arxiv.org/abs/2203.02155 (eq. 1); optional margin as Llama 2,
https://arxiv.org/abs/2307.09288 (eq. 2). The model is AutoModelForSequenceClassification with
num_labels=1; the reward of a sequence is the score at its last non-pad token (transformers'
rule, so the exported model scores text exactly as it was trained). Chosen and rejected of every
pair run in one forward (data/pairs.py). Under LoRA the `score` head is trained in full and
saved with the adapter (PEFT task SEQ_CLS puts it in modules_to_save).

    deepspeed --num_gpus 2 launch/train.py --stage rm --model_name_or_path outputs/sft \
        --train_file_dir data/demo/reward --template_name chatml --deepspeed ds_configs/zero3.json \
        --output_dir outputs/rm
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForSequenceClassification, set_seed

from medgpt_ds import checkpoint, dist, engine as eng, long_context, loop
from medgpt_ds.convert import write_hf_meta
from medgpt_ds.data.pairs import PairCollator, load_pairs
from medgpt_ds.data.templates import get_chat_template
from medgpt_ds.losses import rm_pairwise_loss
from medgpt_ds.model import count_parameters, load_model, load_tokenizer


@dataclass
class Arguments:
    margin: float = field(default=0.0, metadata={"help": "Target margin m in -log sigmoid(r_c - r_r - m) (0: plain Bradley-Terry)."})
    center_rewards_coefficient: float = field(
        default=0.0, metadata={"help": "Adds coef * mean((r_c + r_r)^2) to keep rewards centred near 0 (0: off)."})

    def __post_init__(self):
        if self.center_rewards_coefficient < 0:
            raise ValueError("--center_rewards_coefficient must be >= 0")


def rewards(engine, batch: dict):
    """Scores of the (2B, T) pair batch -> (chosen (B,), rejected (B,))."""
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    scores = out.logits.squeeze(-1)  # (2B,)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # bf16/fp16 -> float32
    n = int(batch["num_pairs"])
    return scores[:n], scores[n:]


def pairwise_loss_sum(engine, batch: dict, margin: float = 0.0, center_rewards_coefficient: float = 0.0):
    """Pairwise loss and metrics summed over the batch's pairs (the loop normalises globally)."""
    chosen, rejected = rewards(engine, batch)
    loss, metrics = rm_pairwise_loss(chosen, rejected, margin=margin or None, center_rewards_coef=center_rewards_coefficient)
    n = chosen.numel()  # rm_pairwise_loss returns pair means
    return loss * n, {k: v * n for k, v in metrics.items()}


def run(cfg) -> loop.TrainState:
    t, d, a = cfg.train, cfg.data, cfg.stage_args or Arguments()
    dist.init(t.ddp_timeout)
    dist.announce()
    resume = checkpoint.prepare_output_dir(cfg)
    set_seed(t.seed)

    tokenizer = load_tokenizer(cfg.model)
    tokenizer.chat_template = get_chat_template(d.template_name, tokenizer)
    train_items, eval_items = load_pairs(cfg, tokenizer, "rm")

    steps_per_epoch, _ = loop.epoch_layout(len(train_items), t.per_device_train_batch_size,
                                           t.gradient_accumulation_steps, dist.world_size())
    total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * steps_per_epoch))

    ds_config = eng.build_ds_config(cfg, hidden_size=None, num_training_steps=total_steps)
    model = load_model(cfg.model, t, cfg.lora, tokenizer, ds_config, model_cls=AutoModelForSequenceClassification,
                       extra_config={"num_labels": 1, "pad_token_id": tokenizer.pad_token_id}, peft_task_type="SEQ_CLS")
    long_context.prepare_model(model, t)
    engine, _, _ = eng.init_train_engine(model, ds_config, t, total_steps)

    def loss_fn(engine, batch: dict):
        return pairwise_loss_sum(engine, batch, a.margin, a.center_rewards_coefficient)

    loss_fn = long_context.with_context(loss_fn, long_context.offload_context(engine, t))

    def hf_meta(tag_dir: str) -> None:
        write_hf_meta(tag_dir, engine.module, tokenizer, model_kind="reward", base_model=cfg.model.model_name_or_path,
                      torch_dtype=str(next(engine.module.parameters()).dtype))

    return loop.train(cfg=cfg, engine=engine, model=model, tokenizer=tokenizer, ds_config=ds_config,
                      train_items=train_items, eval_items=eval_items, collate=PairCollator(tokenizer.pad_token_id),
                      loss_fn=loss_fn, unit_key="num_pairs", total_steps=total_steps, hf_meta=hf_meta,
                      num_params=count_parameters(model), resume_dir=resume)
