"""Continued pretraining: next-token loss on raw domain text.

Paper: "Don't Stop Pretraining", https://arxiv.org/abs/2004.10964 (domain-adaptive pretraining).
Documents (.txt one per line, jsonl/json `text`, parquet) get an EOS, long ones are split into
block_size chunks, and chunks are packed into rows of block_size with position_ids restarting
per document, so documents never attend to each other (unless --packing False: one chunk a row).
--max_train_samples / --max_eval_samples count blocks (rows of block_size), as MedicalGPT's
pretraining.py does, not documents.

    deepspeed --num_gpus 2 launch/train.py --stage pt --model_config tiny \
        --tokenizer_name_or_path outputs/tokenizer --train_file_dir data/demo/pretrain \
        --block_size 256 --deepspeed ds_configs/zero2.json --output_dir outputs/pt
"""
from __future__ import annotations

import dataclasses
import functools
import math

from transformers import set_seed

from medgpt_ds import checkpoint, dist, engine as eng, long_context, loop
from medgpt_ds.convert import write_hf_meta
from medgpt_ds.data.loading import data_key, load_train_eval, tokenize_records
from medgpt_ds.data.packing import PaddedCollator, chunk_documents
from medgpt_ds.model import count_parameters, load_model, load_tokenizer
from medgpt_ds.sequence_parallel import ShardCollator
from medgpt_ds.stages.sft import lm_loss_sum, pack_or_pad, plan_packing


def chunked(tokenizer, items: list[dict], block_size: int, what: str) -> list[dict]:
    chunks, stats = chunk_documents([x["input_ids"] for x in items], block_size, tokenizer.eos_token_id)
    dist.print0(f"{what}: {stats['docs']} documents -> {stats['chunks']} chunks of <= {block_size} tokens "
                f"({stats['split_docs']} long documents split, {stats['tokens']} tokens)")
    return [{"input_ids": c, "labels": list(c)} for c in chunks]


def first_blocks(items: list, limit, split: str) -> list:
    """The first ``limit`` blocks (training rows) of ``items``, logged; all when ``limit`` is None."""
    if limit is None or limit >= len(items):
        return items
    flag = "--max_train_samples" if split == "train" else "--max_eval_samples"
    dist.print0(f"pt {split}: {flag} {limit} keeps {limit} of {len(items)} blocks (rows of --block_size tokens, "
                "as MedicalGPT's pretraining.py counts them)")
    return items[:limit]


def run(cfg) -> loop.TrainState:
    t, d = cfg.train, cfg.data
    dist.init(t.ddp_timeout)
    dist.init_sequence_parallel(t.sequence_parallel_size)
    dist.announce()
    resume = checkpoint.prepare_output_dir(cfg)
    set_seed(t.seed)

    tokenizer = load_tokenizer(cfg.model)
    # every document is read: --max_train_samples / --max_eval_samples count blocks, applied after chunking
    d_all = dataclasses.replace(d, max_train_samples=None, max_eval_samples=None)
    train_recs, eval_recs, files = load_train_eval(d_all, "pt", t.seed, output_dir=t.output_dir)

    def encode(rec: dict):
        return {"input_ids": tokenizer(rec["text"], add_special_tokens=True)["input_ids"]}

    key = [data_key("pt", d_all, tokenizer, files, t.seed)]
    cache = f"{t.output_dir}/.cache/tokenized" if not cfg.model.cache_dir else f"{cfg.model.cache_dir}/tokenized"
    docs, _ = tokenize_records(train_recs, encode, cache_dir=cache, key=key + ["train"],
                               num_proc=d.preprocessing_num_workers, overwrite=d.overwrite_cache, desc="pt-train")
    train_items = chunked(tokenizer, docs, d.block_size, "pt train")
    eval_items = []
    if eval_recs:
        edocs, _ = tokenize_records(eval_recs, encode, cache_dir=cache, key=key + ["eval"], desc="pt-eval")
        eval_items = first_blocks(chunked(tokenizer, edocs, d.block_size, "pt eval"), d.max_eval_samples, "eval")
    train_items, collate = pack_or_pad(train_items, d.block_size, plan_packing(cfg, tokenizer), tokenizer.pad_token_id,
                                       "pt train")
    train_items = first_blocks(train_items, d.max_train_samples, "train")

    steps_per_epoch, _ = loop.epoch_layout(len(train_items), t.per_device_train_batch_size,
                                           t.gradient_accumulation_steps, dist.dp_world_size())
    total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * steps_per_epoch))

    ds_config = eng.build_ds_config(cfg, hidden_size=None, num_training_steps=total_steps)
    model = load_model(cfg.model, t, cfg.lora, tokenizer, ds_config)
    long_context.prepare_model(model, t)
    engine, _, _ = eng.init_train_engine(model, ds_config, t, total_steps)
    chunk = long_context.loss_chunk_size(t, engine, "pt")
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
