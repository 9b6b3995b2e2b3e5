#!/usr/bin/env python
"""The sft peers of bench_sft.py, on the model, data, sequence length, DeepSpeed config, precision,
gradient checkpointing, optimizer and attention the medgpt-ds side gets:

  trl  TRL's SFTTrainer (HF Trainer + DeepSpeed): packed = its BFD packing, padding-free rows
       with position ids; padded = one sample per row, padded to the longest in the batch.
  lf   LLaMA-Factory's sft recipe on the HF Trainer + DeepSpeed (LLaMA-Factory itself pins
       transformers<=5.6, peft<=0.18, trl<=0.24, datasets<=4.0 and cannot be installed beside this
       stack): samples greedy-knapsack packed into rows of cutoff_len, rows padded to cutoff_len + 1,
       `neat_packing` (block-diagonal causal 4-D attention mask, so samples do not attend to each
       other) — llamafactory 0.9.5 data/processor/supervised.py, processor_utils.greedy_knapsack,
       data/collator.prepare_4d_attention_mask. Its flash-attention path needs batch size 1 and is
       not run here.

Prints `PEER_RESULT {json}` on rank 0: median real tokens/s per step after --warmup steps (each
step's time = the gap between consecutive step ends, data loading included, as on our side),
TFLOP/s and MFU (same FLOPs model as ours: medgpt_ds.metrics), padding fraction, peak GPU memory.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def greedy_knapsack(numbers: list[int], capacity: int) -> list[list[int]]:
    """LLaMA-Factory's packing (processor_utils.greedy_knapsack): fill each row with the largest
    remaining length that fits, by binary search over the sorted lengths."""
    numbers = sorted(numbers)
    knapsacks = []
    while numbers:
        current, remaining = [], capacity
        while True:
            index = bisect.bisect(numbers, remaining) - 1
            if index < 0:
                break
            remaining -= numbers[index]
            current.append(numbers.pop(index))
        knapsacks.append(current)
    return knapsacks


def block_diagonal_mask(segments, dtype):
    """LLaMA-Factory's prepare_4d_attention_mask: (B, T) segment ids (0 = pad) -> (B, 1, T, T)
    additive mask, causal within a segment, blocked across segments and on padding."""
    import torch

    seq_len = segments.size(1)
    min_dtype = torch.finfo(dtype).min
    non_pad = (segments != 0).unsqueeze(1).unsqueeze(2)
    same = segments.unsqueeze(1).unsqueeze(2) == segments.unsqueeze(1).unsqueeze(3)
    allowed = same & non_pad & torch.tril(torch.ones((seq_len, seq_len), dtype=torch.bool))
    return torch.where(allowed, torch.tensor(0, dtype=dtype), min_dtype)


def lf_dataset(recs, tok, max_length: int):
    """Tokenize with our template and label masking, then LLaMA-Factory's knapsack rows."""
    from medgpt_ds.data.templates import encode_conversation

    samples = [s for s in (encode_conversation(tok, tok.chat_template, r["messages"], max_length) for r in recs) if s]
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_length.setdefault(len(s["input_ids"]), []).append(i)
    rows = []
    for knapsack in greedy_knapsack([len(s["input_ids"]) for s in samples], max_length):
        ids, labels, segments = [], [], []
        for k, length in enumerate(knapsack):
            s = samples[by_length[length].pop()]
            ids += s["input_ids"]
            labels += s["labels"]
            segments += [k + 1] * length
        pad = max_length + 1 - len(ids)  # LLaMA-Factory pads every packed row to cutoff_len + 1
        rows.append({"input_ids": ids + [tok.pad_token_id] * pad, "labels": labels + [-100] * pad,
                     "segments": segments + [0] * pad})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", choices=("trl", "lf"), required=True)
    ap.add_argument("--model_config", required=True, help="config.json of the random-init model")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--deepspeed", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2, help="rows (packed) or samples (padded) per micro batch")
    ap.add_argument("--packing", type=int, default=1)
    ap.add_argument("--gc", type=int, default=0, help="gradient checkpointing")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--local_rank", type=int, default=0)
    a = ap.parse_args()
    if "RANK" not in os.environ:  # plain `python`: a world of one (the HF Trainer's DeepSpeed init needs the env)
        from medgpt_ds.dist import _free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))

    import datasets
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from medgpt_ds.data.formats import load_records
    from common import step_clock  # bench/, this script's folder
    from medgpt_ds.metrics import attended_keys, compute_dtype, model_flops, peak_flops

    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    with open(a.model_config) as f:
        spec = json.load(f)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config.vocab_size, config.pad_token_id, config.eos_token_id = len(tok), tok.pad_token_id, tok.eos_token_id
    config.use_cache = False
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    torch.manual_seed(a.seed)  # as our side: seed, then build from the config
    model = AutoModelForCausalLM.from_config(config, attn_implementation=a.attn, dtype=dtype)
    flops = model_flops(model)
    windows = [w for w, *_ in flops.attention]
    peak = peak_flops(compute_dtype({"bf16": {"enabled": a.bf16}}))
    recs = load_records([a.data], "sft", log=lambda *x: None)

    common = dict(output_dir=a.output_dir, max_steps=a.steps, per_device_train_batch_size=a.batch,
                  gradient_accumulation_steps=1, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
                  deepspeed=a.deepspeed, bf16=a.bf16, fp16=False, gradient_checkpointing=bool(a.gc),
                  gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_num_workers=0, seed=a.seed,
                  disable_tqdm=True, use_cpu=not cuda)
    per_step: list[tuple[int, dict, int]] = []  # (real tokens, attended keys, positions) per collated batch

    if a.recipe == "trl":
        from trl import SFTConfig, SFTTrainer

        ds = datasets.Dataset.from_list([{"messages": r["messages"]} for r in recs])
        cfg = SFTConfig(max_length=a.max_length, packing=bool(a.packing), dataset_num_proc=1, **common)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
        collate = trainer.data_collator

        def counting(features):
            batch = collate(features)
            n, keys = attended_keys(batch, windows, None if a.packing else tok.pad_token_id)
            per_step.append((n, keys, batch["input_ids"].numel()))
            return batch
    else:
        if a.attn == "flash_attention_2":
            raise SystemExit("error: the LLaMA-Factory recipe's flash-attention path needs batch size 1; run it with sdpa")
        rows = lf_dataset(recs, tok, a.max_length)
        ds = datasets.Dataset.from_list(rows)
        trainer = Trainer(model=model, args=TrainingArguments(remove_unused_columns=False, **common), train_dataset=ds,
                          data_collator=lambda x: x)

        def counting(features):
            segments = torch.tensor([f["segments"] for f in features])
            n, keys = 0, {w: 0.0 for w in windows}
            for row in segments.tolist():
                for k in set(row) - {0}:
                    length = row.count(k)
                    n += length
                    for w in windows:
                        keys[w] += sum(min(p + 1, w or p + 1) for p in range(length))
            per_step.append((n, keys, segments.numel()))
            return {"input_ids": torch.tensor([f["input_ids"] for f in features]),
                    "labels": torch.tensor([f["labels"] for f in features]),
                    "attention_mask": block_diagonal_mask(segments, dtype)}

    trainer.data_collator = counting
    clock, ends = step_clock()

    trainer.add_callback(clock)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    from medgpt_ds.dist import unlink_cpu_shm_segment

    unlink_cpu_shm_segment()  # DeepSpeed (via the HF Trainer) leaves its CPU shm segments otherwise
    dts = [t1 - t0 for t0, t1 in zip(ends, ends[1:])]
    steps = per_step[:len(dts)]  # batches are collated in step order (accelerate prefetches one more)
    rates = [n / dt for (n, _, _), dt in zip(steps, dts)]
    tflops = [flops.training_flops(n, keys) / dt / 1e12 for (n, keys, _), dt in zip(steps, dts)]
    res = {"tokens_per_s": statistics.median(rates[a.warmup:] or rates),
           "tflops": statistics.median(tflops[a.warmup:] or tflops),
           "pad_frac": 1.0 - sum(s[0] for s in steps) / max(sum(s[2] for s in steps), 1),
           "tokens_per_step": statistics.mean(s[0] for s in steps), "steps_timed": len(rates[a.warmup:])}
    if peak:
        res["mfu"] = res["tflops"] * 1e12 / peak
    if cuda:
        res["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if int(os.environ.get("RANK", "0")) == 0:
        print("PEER_RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
