#!/usr/bin/env python
"""Benchmark (not a test): sft on the real MedicalGPT SFT sample with one small model and one ZeRO
stage — medgpt-ds packed vs padded, and TRL's SFTTrainer (DeepSpeed through the HF Trainer) as the
peer, packed (padding-free BFD) and padded. Prints real tokens/s (padding excluded), the padding
fraction and peak RSS (CPU) / peak GPU memory.

    python bench/bench_packing.py [--steps 30] [--nproc 1] [--zero zero2] [--max_length 512]

Runs each configuration in its own process (`deepspeed --num_gpus N` when nproc > 1).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(os.path.dirname(ROOT), "shared", "data", "medicalgpt", "sft", "medical_sft_1K_format.jsonl")
sys.path.insert(0, ROOT)


def make_model(workdir: str, hidden: int, layers: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from medgpt_ds.data.formats import load_records
    from medgpt_ds.data.templates import TEMPLATES
    from medgpt_ds.tokenizer import train_bpe_tokenizer

    texts = [m["content"] for r in load_records([SFT], "sft", log=lambda *a: None) for m in r["messages"]]
    out = os.path.join(workdir, "base")
    tok = train_bpe_tokenizer(texts=texts, vocab_size=4000, output_dir=out, chat_template=TEMPLATES["qwen"])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=4096, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def rss_wrap(cmd: list[str], env: dict) -> tuple[int, str]:
    """Run cmd; return (peak RSS of its largest process in MiB, stdout)."""
    code = ("import resource,subprocess,sys;p=subprocess.run(sys.argv[1:]);"
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);sys.exit(p.returncode)")
    p = subprocess.run([sys.executable, "-c", code, *cmd], env=env, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    kb = int(p.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return kb // 1024, p.stdout


def launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable]
    return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(nproc)]


def run_ours(base: str, workdir: str, packing: bool, a, env: dict) -> dict:
    out = os.path.join(workdir, f"ours_{'packed' if packing else 'padded'}")
    cmd = launcher(a.nproc) + [
        os.path.join(ROOT, "launch", "train.py"), "--stage", "sft", "--model_name_or_path", base,
        "--train_file_dir", SFT, "--template_name", "qwen", "--model_max_length", str(a.max_length),
        "--per_device_train_batch_size", str(a.batch if not packing else a.packed_rows), "--max_steps", str(a.steps),
        "--logging_steps", "5", "--save_steps", "0", "--report_to", "none", "--learning_rate", "1e-4",
        "--packing", str(packing), "--deepspeed", os.path.join(ROOT, "ds_configs", f"{a.zero}.json"),
        "--output_dir", out, "--overwrite_output_dir", "--export_hf", "False"] + (["--bf16"] if a.bf16 else [])
    rss, _ = rss_wrap(cmd, env)
    recs = [json.loads(line) for line in open(os.path.join(out, "logs", "metrics.jsonl"))]
    recs = [r for r in recs if r["split"] == "train" and r["step"] > 5]  # skip warm-up window
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in recs) / len(recs),
            "pad_frac": sum(r.get("pad_frac", 0.0) for r in recs) / len(recs),
            "peak_rss_mib": rss, "gpu_mem_gib": max((r.get("mem_gib", 0.0) for r in recs), default=0.0)}


def run_trl(base: str, workdir: str, packing: bool, a, env: dict) -> dict:
    out = os.path.join(workdir, f"trl_{'packed' if packing else 'padded'}")
    cmd = launcher(a.nproc) + [os.path.join(ROOT, "bench", "trl_sft_peer.py"), "--base", base, "--data", SFT,
                               "--output_dir", out, "--steps", str(a.steps), "--max_length", str(a.max_length),
                               "--batch", str(a.batch), "--packing", str(int(packing)),
                               "--deepspeed", os.path.join(ROOT, "ds_configs", f"{a.zero}.json")] + (["--bf16"] if a.bf16 else [])
    rss, stdout = rss_wrap(cmd, env)
    res = json.loads(stdout.rsplit("TRL_RESULT", 1)[1].split("\n", 1)[0])
    res["peak_rss_mib"] = rss
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--zero", default="zero2")
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="samples per micro batch when padded")
    ap.add_argument("--packed_rows", type=int, default=2, help="packed rows of max_length per micro batch")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--skip_trl", action="store_true")
    a = ap.parse_args()
    if not os.path.exists(SFT):
        raise SystemExit(f"needs the MedicalGPT sample at {SFT}")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.path.join(ROOT, ".cache", "torch_extensions"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", MEDGPT_NO_PROGRESS="1")
    with tempfile.TemporaryDirectory() as wd:
        base = make_model(wd, a.hidden, a.layers)
        rows = []
        for packing in (True, False):
            rows.append((f"medgpt-ds {'packed' if packing else 'padded'}", run_ours(base, wd, packing, a, env)))
        if not a.skip_trl:
            for packing in (True, False):
                rows.append((f"TRL SFTTrainer {'packed' if packing else 'padded'}", run_trl(base, wd, packing, a, env)))
    print(f"\nsft on medical_sft_1K_format.jsonl, llama hidden {a.hidden} x {a.layers} layers, max_length {a.max_length}, "
          f"{a.zero}, {a.nproc} rank(s), {a.steps} steps\n")
    print("| run | real tokens/s | padding | peak RSS MiB | GPU mem GiB |\n|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['tokens_per_s']:.0f} | {100 * r['pad_frac']:.1f}% | {r['peak_rss_mib']} | {r.get('gpu_mem_gib', 0):.2f} |")


if __name__ == "__main__":
    main()
