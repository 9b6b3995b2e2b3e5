#!/usr/bin/env python
"""The peer for bench_packing.py: TRL's SFTTrainer (HF Trainer + DeepSpeed) on the same model,
data and ZeRO config. Prints `TRL_RESULT {json}` with real tokens/s (after a warm-up window) and
the padding fraction. Launched by bench_packing.py (`python` or `deepspeed --num_gpus N`)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--packing", type=int, default=1)
    ap.add_argument("--deepspeed", required=True)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--local_rank", type=int, default=0)
    a = ap.parse_args()
    if "RANK" not in os.environ:  # plain `python`: a world of one (the HF Trainer's DeepSpeed init needs the env)
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from medgpt_ds.data.formats import load_records

    recs = load_records([a.data], "sft", log=lambda *x: None)
    ds = datasets.Dataset.from_list([{"messages": r["messages"]} for r in recs])
    tok = AutoTokenizer.from_pretrained(a.base)
    model = AutoModelForCausalLM.from_pretrained(a.base, attn_implementation="sdpa")
    # padded: 8 samples a batch; packed: TRL's BFD packing into rows of max_length (padding-free), with
    # the batch size chosen so a step carries about the same number of real tokens
    cfg = SFTConfig(output_dir=a.output_dir, max_steps=a.steps, per_device_train_batch_size=2 if a.packing else a.batch,
                    max_length=a.max_length, packing=bool(a.packing), learning_rate=1e-4, logging_steps=5,
                    save_strategy="no", report_to="none", deepspeed=a.deepspeed, bf16=a.bf16,
                    dataset_num_proc=1, disable_tqdm=True)

    class Clock(TrainerCallback):
        """Time and count tokens after step 5 (warm-up excluded, as in our bench)."""

        def __init__(self):
            self.t0 = None
            self.start_tokens = 0

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:
                self.t0 = time.perf_counter()
                self.start_tokens = trainer._total_train_tokens

    clock = Clock()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[clock])
    positions = {"n": 0}
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        positions["n"] += batch["input_ids"].numel()
        return batch

    trainer.data_collator = counting
    trainer.train()
    from medgpt_ds.dist import unlink_cpu_shm_segment

    unlink_cpu_shm_segment()  # DeepSpeed (via the HF Trainer) leaves its CPU shm segments otherwise
    dt = time.perf_counter() - clock.t0
    real = trainer._total_train_tokens - clock.start_tokens
    # TRL counts padding-free positions as tokens; real tokens = non-pad ids over all processed batches
    res = {"tokens_per_s": real / dt, "pad_frac": max(0.0, 1.0 - trainer._total_train_tokens / max(positions["n"] * int(
        os.environ.get("WORLD_SIZE", "1")), 1))}
    if int(os.environ.get("RANK", "0")) == 0:
        print("TRL_RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
