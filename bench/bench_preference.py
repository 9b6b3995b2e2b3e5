#!/usr/bin/env python
"""Benchmark (not a test): real tokens/s of the preference stages against sft on the same model,
data and ZeRO stage — rm, dpo with a live reference engine, dpo with precomputed reference
log-probs, orpo — and dpo against TRL's DPOTrainer (HF Trainer + the same DeepSpeed config, live
and precomputed reference) on the same settings.

    python bench/bench_preference.py [--nproc 2] [--zero zero2] [--steps 20] [--batch 4]

Data: MedicalGPT's reward sample (../shared/data/medicalgpt/reward/dpo_zh_500.jsonl) when present,
else pairs generated here; only pairs whose prompt and answers fit max_source/target_length are
kept, so no run truncates and every run sees the same tokens. sft trains on prompt + chosen.
Real tokens = non-pad tokens forwarded (a pair counts prompt + chosen + prompt + rejected); the
figure is the median over the steps after a warm-up of 5 of (real tokens of the step / its time),
which shrugs off other load on a shared machine. Each configuration runs in its own process
(`deepspeed --num_gpus N` when nproc > 1).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(os.path.dirname(ROOT), "shared", "data", "medicalgpt", "reward", "dpo_zh_500.jsonl")
sys.path.insert(0, ROOT)
WARMUP = 5


def make_workspace(wd: str, a) -> tuple[str, str, str, float]:
    """Tokenizer + random-init Llama, the fitting pairs (MedicalGPT and TRL formats) and the sft file.
    Returns (base dir, pairs jsonl, trl jsonl, mean real tokens per pair)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from medgpt_ds.data.formats import load_records
    from medgpt_ds.data.templates import TEMPLATES, encode_preference
    from medgpt_ds.tokenizer import train_bpe_tokenizer

    if os.path.exists(REAL) and not a.synthetic:
        recs = load_records([REAL], "preference", log=lambda *x: None)
    else:
        rng = random.Random(0)
        words = "fever cough headache patient doctor infection virus treatment dose tablet blood pressure heart lung pain".split()
        recs = [{"prompt": [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))}],
                 "chosen": " ".join(rng.choice(words) for _ in range(rng.randint(40, 150))),
                 "rejected": " ".join(rng.choice(words) for _ in range(rng.randint(40, 150)))} for _ in range(400)]
    texts = [m["content"] for r in recs for m in r["prompt"]] + [r["chosen"] for r in recs] + [r["rejected"] for r in recs]
    base = os.path.join(wd, "base")
    tok = train_bpe_tokenizer(texts=texts, vocab_size=4000, output_dir=base, chat_template=TEMPLATES["qwen"])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4, num_hidden_layers=a.layers,
                      num_attention_heads=max(1, a.hidden // 64), num_key_value_heads=max(1, a.hidden // 128),
                      max_position_embeddings=4096, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(base)
    keep, tokens = [], 0
    for r in recs:
        e = encode_preference(tok, tok.chat_template, r["prompt"], r["chosen"], r["rejected"], 10**6, 10**6)
        if len(e["prompt_ids"]) <= a.max_source_length and max(len(e["chosen_ids"]), len(e["rejected_ids"])) <= a.max_target_length:
            keep.append(r)
            tokens += 2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
    if len(keep) < a.batch * a.nproc * (a.steps + 1):
        print(f"note: {len(keep)} fitting pairs; runs take more than one epoch", flush=True)
    pairs, trl, sft = (os.path.join(wd, f) for f in ("pairs.jsonl", "trl.jsonl", "sft.jsonl"))
    with open(pairs, "w") as f1, open(trl, "w") as f2, open(sft, "w") as f3:
        for r in keep:
            f1.write(json.dumps(r, ensure_ascii=False) + "\n")
            f2.write(json.dumps({"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                 "rejected": [{"role": "assistant", "content": r["rejected"]}]}, ensure_ascii=False) + "\n")
            f3.write(json.dumps({"messages": r["prompt"] + [{"role": "assistant", "content": r["chosen"]}]}, ensure_ascii=False) + "\n")
    print(f"data: {len(keep)} of {len(recs)} pairs fit {a.max_source_length}/{a.max_target_length} tokens; "
          f"{tokens / len(keep):.0f} real tokens per pair", flush=True)
    return base, pairs, trl, tokens / len(keep)


def launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable]
    return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(nproc)]


def run(cmd: list[str], env: dict) -> tuple[str, float]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout, time.perf_counter() - t0


def run_ours(name: str, stage: str, extra: list[str], base: str, data: str, wd: str, a, env: dict) -> dict:
    out = os.path.join(wd, name)
    data_flags = (["--train_file_dir", data, "--packing", "False",
                   "--model_max_length", str(a.max_source_length + a.max_target_length)] if stage == "sft" else
                  ["--train_file_dir", data, "--max_source_length", str(a.max_source_length),
                   "--max_target_length", str(a.max_target_length)])
    cmd = launcher(a.nproc) + [
        os.path.join(ROOT, "launch", "train.py"), "--stage", stage, "--model_name_or_path", base, "--template_name", "qwen",
        *data_flags, "--per_device_train_batch_size", str(a.batch), "--max_steps", str(a.steps), "--logging_steps",
        "1", "--save_steps", "0", "--report_to", "none", "--learning_rate", "1e-5", "--deepspeed",
        os.path.join(ROOT, "ds_configs", f"{a.zero}.json"), "--output_dir", out, "--overwrite_output_dir", "--export_hf",
        "False", *extra]
    _, wall = run(cmd, env)
    recs = [json.loads(line) for line in open(os.path.join(out, "logs", "metrics.jsonl"))]
    recs = [r for r in recs if r["split"] == "train" and r["step"] > WARMUP]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in recs), "wall_s": wall}


def run_trl(name: str, precompute: bool, base: str, data: str, wd: str, a, env: dict) -> dict:
    out = os.path.join(wd, name)
    cmd = launcher(a.nproc) + [os.path.abspath(__file__), "--_trl_peer", "--base", base, "--data", data, "--out", out,
                               "--steps", str(a.steps), "--batch", str(a.batch), "--zero", a.zero,
                               "--max_source_length", str(a.max_source_length), "--max_target_length", str(a.max_target_length)]
    if precompute:
        cmd.append("--precompute")
    stdout, wall = run(cmd, env)
    res = json.loads(stdout.rsplit("TRL_RESULT", 1)[1].split("\n", 1)[0])
    res["wall_s"] = wall
    return res


def trl_peer(a) -> None:
    """TRL's DPOTrainer on the same model, pairs, batch and DeepSpeed config; prints TRL_RESULT."""
    if "RANK" not in os.environ:  # plain `python` (1 rank): DeepSpeed would otherwise try MPI discovery
        from medgpt_ds.dist import _free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    ds = datasets.load_dataset("json", data_files=a.data, split="train")
    tok = AutoTokenizer.from_pretrained(a.base)
    model = AutoModelForCausalLM.from_pretrained(a.base, attn_implementation="sdpa")
    cfg = DPOConfig(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.batch, learning_rate=1e-5, beta=0.1,
                    max_length=a.max_source_length + a.max_target_length + 16, precompute_ref_log_probs=a.precompute,
                    logging_steps=WARMUP, save_strategy="no", report_to="none", disable_tqdm=True, dataset_num_proc=1,
                    bf16=False, gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),  # TRL defaults differ
                    deepspeed=os.path.join(ROOT, "ds_configs", f"{a.zero}.json"))
    per_step: list[int] = []
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        per_step.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else
                        int((batch["input_ids"] != tok.pad_token_id).sum()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    from medgpt_ds.dist import unlink_cpu_shm_segment

    unlink_cpu_shm_segment()  # DeepSpeed (via the HF Trainer) leaves its CPU shm segments otherwise
    # the last `steps` collated batches are the training ones (precomputing the reference comes first)
    tokens = torch.tensor(per_step[-a.steps:], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tokens)  # real tokens of each step over all ranks
    rates = [n / t for n, t in zip(tokens.tolist()[WARMUP:], times[WARMUP:])]
    if int(os.environ.get("RANK", "0")) == 0:
        print("TRL_RESULT " + json.dumps({"tokens_per_s": statistics.median(rates)}), flush=True)


def peer_args():
    p = argparse.ArgumentParser()
    for k in ("--base", "--data", "--out", "--zero"):
        p.add_argument(k, required=True)
    for k in ("--steps", "--batch", "--max_source_length", "--max_target_length", "--local_rank"):
        p.add_argument(k, type=int, default=0)
    p.add_argument("--_trl_peer", action="store_true")
    p.add_argument("--precompute", action="store_true")
    return p.parse_args()


def main() -> None:
    if "--_trl_peer" in sys.argv:  # this file launched again as the TRL peer
        return trl_peer(peer_args())
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--zero", default="zero2", help="ds_configs/<name>.json")
    ap.add_argument("--batch", type=int, default=4, help="pairs (sft: samples) per micro batch per rank")
    ap.add_argument("--max_source_length", type=int, default=192)
    ap.add_argument("--max_target_length", type=int, default=320)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--synthetic", action="store_true", help="generated pairs even when the real sample is present")
    ap.add_argument("--skip_trl", action="store_true")
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
    a = ap.parse_args()

    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.path.join(ROOT, ".cache", "torch_extensions"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MEDGPT_NO_PROGRESS="1")
    if a.nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // a.nproc))
    wd = a.workdir or tempfile.mkdtemp(prefix="medgpt_bench_pref_")
    os.makedirs(wd, exist_ok=True)
    base, pairs, trl, tok_per_pair = make_workspace(wd, a)
    sft_data = os.path.join(wd, "sft.jsonl")
    rows = [("sft (prompt + chosen)", run_ours("sft", "sft", [], base, sft_data, wd, a, env))]
    for name, stage, extra in (("rm", "rm", []), ("dpo, live reference engine", "dpo", ["--reference", "model"]),
                               ("dpo, precomputed reference", "dpo", ["--reference", "precomputed"]), ("orpo", "orpo", [])):
        rows.append((name, run_ours(name.split(",")[0] + ("_pre" if "precomputed" in name else ""), stage, extra, base, pairs, wd,
                                    a, env)))
        print(f"{name}: {rows[-1][1]['tokens_per_s']:.0f} tokens/s", flush=True)
    if not a.skip_trl:
        for name, pre in (("TRL DPOTrainer, live reference", False), ("TRL DPOTrainer, precomputed reference", True)):
            rows.append((name, run_trl("trl_pre" if pre else "trl", pre, base, trl, wd, a, env)))
            print(f"{name}: {rows[-1][1]['tokens_per_s']:.0f} tokens/s", flush=True)
    sft_tps = rows[0][1]["tokens_per_s"]
    print(f"\n{os.path.basename(REAL) if os.path.exists(REAL) and not a.synthetic else 'generated pairs'}, llama hidden "
          f"{a.hidden} x {a.layers} layers, {a.zero}, {a.nproc} rank(s), micro batch {a.batch}, {a.steps} steps "
          f"(median tokens/s per step after step {WARMUP}; {tok_per_pair:.0f} real tokens per pair)\n")
    print("| run | real tokens/s | vs sft | pairs/s | wall s (incl. start, precompute) |\n|---|---|---|---|---|")
    for name, r in rows:
        pairs_s = "" if name.startswith("sft") else f"{r['tokens_per_s'] / tok_per_pair:.2f}"
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / sft_tps:.2f} | {pairs_s} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
