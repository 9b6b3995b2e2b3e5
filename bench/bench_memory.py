#!/usr/bin/env python
"""Benchmark (not a test): the memory estimator (medgpt_ds/memory.py, tools/estimate_memory.py)
against the measured peak of real training runs, and the chunked loss against the plain one.

    python bench/bench_memory.py                 # estimator vs measured, CPU fp32, 1 rank
    python bench/bench_memory.py --loss_bench    # one sft step at vocab 152k, 4k tokens: plain vs chunked

Each row runs `launch/train.py --stage pt` (or sft; two optimizer steps, fp32, one rank: the second
step runs with Adam's states allocated, as every later step does) in its own process and reports the
process's peak RSS above its RSS right after the imports (VmHWM reset through /proc/self/clear_refs),
next to the estimate for the same setup with no framework overhead.
glibc's malloc keeps freed blocks below its (adaptive) mmap threshold, which makes RSS lag behind
what is live; the runs fix MALLOC_MMAP_THRESHOLD_=65536 so large tensors are returned on free and
RSS tracks live memory, as a GPU's allocated-memory counter does.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

_RUNNER = r"""
import re, sys, gc
def _kb(key):
    return int(re.search(key + r':\s+(\d+)', open('/proc/self/status').read()).group(1))
import torch, deepspeed, transformers, datasets  # noqa: F401 - imports are part of the baseline
from medgpt_ds import cli
gc.collect()
base = _kb('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')
rc = cli.main(sys.argv[1:])
print('MEM_PEAK_MIB', (_kb('VmHWM') - base) / 1024)
sys.exit(rc)
"""


def make_corpus(workdir: str, n_words: int) -> str:
    """A plain-text corpus (one long document a line) of generated medical-ish words."""
    words = ("fever cough patient doctor infection virus treatment dose tablet blood pressure heart lung liver "
             "kidney pain chronic acute symptom diagnosis test the a of and to in for with").split()
    rng = random.Random(0)
    path = os.path.join(workdir, "corpus")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "notes.txt"), "w") as f:
        for _ in range(8):
            f.write(" ".join(rng.choice(words) for _ in range(n_words // 8)) + "\n")
    return path


def make_sft(workdir: str, n: int = 80) -> str:
    """Generated conversations (~200 tokens each) to pack into full 4096-token rows."""
    words = ("fever cough patient doctor infection virus treatment dose tablet blood pressure heart lung liver "
             "kidney pain chronic acute symptom diagnosis test").split()
    rng = random.Random(1)
    path = os.path.join(workdir, "sft")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "train.jsonl"), "w") as f:
        for _ in range(n):
            q, a = (" ".join(rng.choice(words) for _ in range(k)) for k in (40, 100))
            f.write(json.dumps({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}) + "\n")
    return path


def make_model(workdir: str, name: str, hidden: int, layers: int, vocab: int, tok_dir: str) -> str:
    """A random Llama with ``vocab`` rows (only the tokenizer's first ids occur in the data)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = os.path.join(workdir, name)
    if os.path.isdir(out):
        return out
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=65536, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_tokenizer(workdir: str) -> str:
    from medgpt_ds.tokenizer import train_bpe_tokenizer

    out = os.path.join(workdir, "tok")
    train_bpe_tokenizer(files=[os.path.join(ROOT, "data", "demo", "pretrain", "medical_notes.txt")], vocab_size=600,
                        output_dir=out)
    return out


def measure(model_dir: str, data: str, workdir: str, row: dict) -> float:
    """Peak RSS (MiB) above the post-import baseline of two optimizer steps of ``row``'s run."""
    out = os.path.join(workdir, "run_" + row["name"].replace(" ", "_").replace(",", ""))
    zero = row.get("zero", 0)
    ds = [] if zero == 0 else ["--deepspeed", os.path.join(ROOT, "ds_configs", f"zero{zero}.json")]
    if row.get("stage", "pt") == "pt":
        stage = ["--stage", "pt", "--block_size", str(row["seq"])]
    else:
        stage = ["--stage", "sft", "--template_name", "chatml", "--model_max_length", str(row["seq"])]
    args = [*stage, "--model_name_or_path", model_dir, "--train_file_dir", data, "--per_device_train_batch_size", "1",
            "--max_steps", "2", "--save_steps", "0", "--export_hf", "False", "--report_to", "none", "--output_dir", out,
            "--overwrite_output_dir", "--chunked_loss", str(row.get("chunked", False)),
            "--loss_chunk_size", str(row.get("chunk", 1024)), *ds, *row.get("flags", [])]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT,
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions")))
    p = subprocess.run([sys.executable, "-c", _RUNNER, *args], env=env, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0 or "MEM_PEAK_MIB" not in p.stdout:
        raise SystemExit(f"run {row['name']} failed\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return float(p.stdout.rsplit("MEM_PEAK_MIB", 1)[1].split()[0])


def estimate_mib(model_dir: str, row: dict) -> dict:
    from medgpt_ds import memory

    arch = memory.arch_from_config(memory.load_config(model_dir))
    setup = memory.Setup(zero=row.get("zero", 0), num_gpus=1, nodes=1, seq_len=row["seq"], micro_batch=1,
                         dtype_bytes=4, gradient_checkpointing=row.get("gc", False), chunked_loss=row.get("chunked", False),
                         loss_chunk_size=row.get("chunk", 1024), tiled_mlp=row.get("tiled_mlp", False), overhead_gib=0.0)
    est = memory.estimate(arch, setup)
    mib = 2 ** 20
    return {"states": est.deepspeed_states / mib, "activations": est.activations / mib, "recompute": est.recompute / mib,
            "logits": est.logits / mib, "total": est.per_gpu / mib, "params_m": arch.total_params / 1e6}


def estimator_rows() -> list[dict]:
    """States-, activation- and logits-heavy cases (pt: every token scored)."""
    gc = {"gc": True, "flags": ["--gradient_checkpointing"]}
    return [
        {"name": "h256 L4 V32k T2048 z0", "model": (256, 4, 32000), "seq": 2048},
        {"name": "h256 L4 V32k T2048 z2", "model": (256, 4, 32000), "seq": 2048, "zero": 2},
        {"name": "h256 L4 V32k T2048 z3", "model": (256, 4, 32000), "seq": 2048, "zero": 3},
        {"name": "h256 L4 V32k T2048 z0 chunked", "model": (256, 4, 32000), "seq": 2048, "chunked": True},
        {"name": "h512 L8 V8k T4096 z0", "model": (512, 8, 8000), "seq": 4096},
        {"name": "h512 L8 V8k T4096 z0 gc", "model": (512, 8, 8000), "seq": 4096, **gc},
        {"name": "h512 L8 V8k T8192 z2 gc chunked", "model": (512, 8, 8000), "seq": 8192, "zero": 2, "chunked": True, **gc},
        {"name": "h512 L8 V8k T8192 z0 tiled", "model": (512, 8, 8000), "seq": 8192, "chunked": True, "tiled_mlp": True,
         "flags": ["--tiled_mlp"]},
    ]


def loss_rows() -> list[dict]:
    """One sft step at Qwen's vocabulary (152064) on 4096-token packed rows: full logits vs chunked."""
    base = {"model": (256, 2, 152064), "seq": 4096, "stage": "sft", "data": "sft"}
    return [{"name": "sft V152k T4096 plain", **base}, {"name": "sft V152k T4096 chunked", **base, "chunked": True}]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="keep models/corpus here (default: a temp dir)")
    ap.add_argument("--only", default=None, help="run only rows whose name contains this (no result file written)")
    ap.add_argument("--loss_bench", action="store_true", help="the plain vs chunked loss rows (vocab 152k, ~9 GB peak)")
    a = ap.parse_args()
    workdir = a.workdir or tempfile.mkdtemp(prefix="bench_memory_")
    os.makedirs(workdir, exist_ok=True)
    tok = make_tokenizer(workdir)
    corpus = make_corpus(workdir, 200_000)
    rows = [r for r in (loss_rows() if a.loss_bench else estimator_rows()) if not a.only or a.only in r["name"]]
    table = ["| run | params | states MiB | activations kept | layer recompute | logits + CE | estimate | measured | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    print(f"{'run':<32}{'params':>8}{'states':>9}{'activ.':>9}{'recomp.':>9}{'logits':>9}{'estimate':>10}{'measured':>10}"
          f"{'error':>8}")
    for row in rows:
        h, layers, vocab = row["model"]
        model_dir = make_model(workdir, f"llama_h{h}_l{layers}_v{vocab}", h, layers, vocab, tok)
        est = estimate_mib(model_dir, row)
        got = measure(model_dir, make_sft(workdir) if row.get("data") == "sft" else corpus, workdir, row)
        err = (est["total"] - got) / got
        print(f"{row['name']:<32}{est['params_m']:>7.1f}M{est['states']:>9.0f}{est['activations']:>9.0f}"
              f"{est['recompute']:>9.0f}{est['logits']:>9.0f}{est['total']:>10.0f}{got:>10.0f}{100 * err:>7.1f}%", flush=True)
        table.append(f"| {row['name']} | {est['params_m']:.1f}M | {est['states']:.0f} | {est['activations']:.0f} | "
                     f"{est['recompute']:.0f} | {est['logits']:.0f} | {est['total']:.0f} | {got:.0f} | {100 * err:+.1f}% |")
        row.update(estimate=est, measured_mib=got, error=err)
    if not a.only:
        from common import write_result

        name = "memory_loss" if a.loss_bench else "memory_estimator"
        title = ("Memory: one sft step at vocab 152k x 4096 tokens, full logits vs chunked loss" if a.loss_bench else
                 "Memory: estimator (tools/estimate_memory.py) vs measured peaks")
        intro = ["CPU, fp32, one rank, two optimizer steps of `launch/train.py` (the second with Adam's states "
                 "allocated); peak RSS above the post-import RSS (VmHWM reset, MALLOC_MMAP_THRESHOLD_=65536 so freed "
                 "tensors leave RSS); estimate = medgpt_ds/memory.py for the same setup, no framework overhead (total = "
                 "states + activations kept + the larger of layer recompute and logits). "
                 f"Worst estimate error: {100 * max(abs(r['error']) for r in rows):.1f}%.", ""]
        path = write_result(name, {"kind": "memory", "title": title, "command": "python bench/bench_memory.py"
                                   + (" --loss_bench" if a.loss_bench else ""), "table": intro + table,
                                   "rows": [{k: v for k, v in r.items() if k != "flags"} for r in rows]})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
