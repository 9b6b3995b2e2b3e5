"""Supervised fine-tuning: next-token loss on assistant turns of multi-turn conversations.

Paper: InstructGPT, https://arxiv.org/abs/2203.02155 (the SFT step). Formats: MedicalGPT's
sharegpt `conversations`, `messages`, alpaca. Samples are packed into rows of model_max_length
(position_ids restart per sample, no cross-sample attention) unless --packing False.

    deepspeed --num_gpus 2 launch/train.py --stage sft --model_name_or_path outputs/pt \
        --train_file_dir data/demo/sft --template_name chatml --deepspeed ds_configs/zero2.json \
        --output_dir outputs/sft
"""
from __future__ import annotations

import functools
import math
from typing import Optional

from transformers import set_seed

from medgpt_ds import checkpoint, dist, engine as eng, long_context, loop
from medgpt_ds.convert import write_hf_meta
from medgpt_ds.data.loading import data_key, load_train_eval, resolve_tools, tokenize_records
from medgpt_ds.data.packing import PackingPlan, PaddedCollator, model_inputs, pack_sequences, packing_plan
from medgpt_ds.data.templates import encode_conversation, get_chat_template
from medgpt_ds.errors import UserError
from medgpt_ds.losses import causal_lm_loss, chunked_causal_lm_loss
from medgpt_ds.model import count_parameters, load_config, load_model, load_tokenizer, resolve_attn_implementation
from medgpt_ds.sequence_parallel import ShardCollator


def lm_loss_sum(engine, batch: dict, chunk_size: int = 0):
    """Summed next-token cross entropy over label tokens (the loop normalises globally). With
    ``chunk_size`` the head and loss run in chunks of tokens from the final hidden states (no full
    logits); a sequence-parallel shard carries pre-shifted ``shift_labels``."""
    inputs = {**model_inputs(batch), "use_cache": False}
    if chunk_size:
        hidden = long_context.final_hidden_states(engine, **inputs)
        head = long_context.OutputHead(engine)
        with head.gathered() as head_fn:
            loss, _ = chunked_causal_lm_loss(hidden, head_fn, batch.get("labels"), num_tokens=1.0, chunk_size=chunk_size,
                                             shift_labels=batch.get("shift_labels"), frozen_head=head.frozen)
    else:
        loss, _ = causal_lm_loss(engine(**inputs).logits, batch["labels"], num_tokens=1.0)
    return loss, {}


def pack_or_pad(items: list[dict], max_len: int, plan: Optional[PackingPlan], pad_id: int, what: str):
    """Rows of packed samples (best-fit decreasing) in the plan's layout, or single padded samples
    (no plan: --packing False; or a model packing cannot keep exact here), and their collator."""
    if plan is None or plan.layout == "padded":
        if plan is not None:
            dist.print0(plan.notice)
        return items, PaddedCollator(pad_id)
    rows = pack_sequences([len(x["input_ids"]) for x in items], max_len)
    n_tok = sum(len(x["input_ids"]) for x in items)
    dist.print0(f"{what}: packed {len(items)} samples into {len(rows)} rows of <= {max_len} tokens "
                f"(fill {100 * n_tok / max(1, len(rows) * max_len):.1f}%, layout {plan.layout}); a batch counts rows "
                "(--packing False: one sample a row, as MedicalGPT)")
    return [[items[i] for i in row] for row in rows], plan.collator(pad_id)


def plan_packing(cfg, tokenizer) -> Optional[PackingPlan]:
    """The packed layout for this run's model and attention (None with --packing False)."""
    if cfg.data.packing is False:
        return None
    return packing_plan(load_config(cfg.model, tokenizer), resolve_attn_implementation(cfg.model), dist.device().type)


def run(cfg) -> loop.TrainState:
    t, d = cfg.train, cfg.data
    dist.init(t.ddp_timeout)
    dist.init_sequence_parallel(t.sequence_parallel_size)
    dist.announce()
    resume = checkpoint.prepare_output_dir(cfg)
    set_seed(t.seed)

    tokenizer = load_tokenizer(cfg.model)
    tokenizer.chat_template = get_chat_template(d.template_name, tokenizer)
    train_recs, eval_recs, files = load_train_eval(d, "sft", t.seed, output_dir=t.output_dir)
    tool_format = resolve_tools(d, tokenizer, train_recs + eval_recs)

    def encode(rec: dict):
        return encode_conversation(tokenizer, tokenizer.chat_template, rec["messages"], d.model_max_length,
                                   train_on_inputs=d.train_on_inputs, tools=rec.get("tools"), tool_format=tool_format)

    key = [data_key("sft", d, tokenizer, files, t.seed, tool_format=tool_format)]
    cache = f"{t.output_dir}/.cache/tokenized" if not cfg.model.cache_dir else f"{cfg.model.cache_dir}/tokenized"
    train_items, counts = tokenize_records(train_recs, encode, cache_dir=cache, key=key + ["train"],
                                           num_proc=d.preprocessing_num_workers, overwrite=d.overwrite_cache, desc="sft-train")
    dist.print0(f"sft train: {counts['kept']} kept, {counts['truncated']} truncated to {d.model_max_length} tokens, "
                f"{counts['dropped']} dropped (no assistant token left after truncation) of {counts['records']}")
    eval_items = []
    if eval_recs:
        eval_items, ecounts = tokenize_records(eval_recs, encode, cache_dir=cache, key=key + ["eval"], desc="sft-eval")
        dist.print0(f"sft eval: {ecounts['kept']} kept, {ecounts['dropped']} dropped of {ecounts['records']}")
    if not train_items:
        raise UserError("no training sample left after tokenization (all dropped); raise --model_max_length")
    train_items, collate = pack_or_pad(train_items, d.model_max_length, plan_packing(cfg, tokenizer),
                                       tokenizer.pad_token_id, "sft train")

    world = dist.dp_world_size()
    steps_per_epoch, _ = loop.epoch_layout(len(train_items), t.per_device_train_batch_size,
                                           t.gradient_accumulation_steps, world)
    total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * steps_per_epoch))

    ds_config = eng.build_ds_config(cfg, hidden_size=None, num_training_steps=total_steps)
    model = load_model(cfg.model, t, cfg.lora, tokenizer, ds_config)
    long_context.prepare_model(model, t)
    engine, _, _ = eng.init_train_engine(model, ds_config, t, total_steps)
    chunk = long_context.loss_chunk_size(t, engine, "sft")
    loss_fn = long_context.with_context(functools.partial(lm_loss_sum, chunk_size=chunk),
                                        long_context.offload_context(engine, t))
    eval_collate = PaddedCollator(tokenizer.pad_token_id)
    if dist.sp_size() > 1:
        collate, eval_collate = (ShardCollator(c, tokenizer.pad_token_id) for c in (collate, eval_collate))

    def hf_meta(tag_dir: str) -> None:
        write_hf_meta(tag_dir, engine.module, tokenizer, model_kind="causal_lm",
                      base_model=cfg.model.model_name_or_path, torch_dtype=str(next(engine.module.parameters()).dtype))

    return loop.train(cfg=cfg, engine=engine, model=model, tokenizer=tokenizer, ds_config=ds_config,
                      train_items=train_items, eval_items=eval_items, collate=collate,
                      eval_collate=eval_collate, loss_fn=loss_fn,
                      unit_key="num_label_tokens", total_steps=total_steps, hf_meta=hf_meta,
                      num_params=count_parameters(model), resume_dir=resume)
