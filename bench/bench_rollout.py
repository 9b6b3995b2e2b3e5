#!/usr/bin/env python
"""Rollout benchmark: PPO step time split into generation / scoring (reference + reward model +
critic + old log-probs) / training / weight sync, for the rollout backends under ZeRO-3.

    python bench/bench_rollout.py                              # 2 ranks, tiny model, CPU or GPU
    python bench/bench_rollout.py --sizes tiny,small --max_new_tokens 64 --steps 6
    python bench/bench_rollout.py --runs hybrid,vllm --sizes tiny32,40m --result rollout_vllm

Each run is a real `deepspeed --num_gpus N launch/train.py --stage ppo` (through bench/rollout_probe.py,
which records every rollout's token ids) with a reward model, greedy decoding and the same prompts:

  hybrid     ZeRO-3: the actor's shards gathered once per rollout, KV-cached generate (the default)
  per_token  ZeRO-3: no gather; every decoding step re-gathers every layer, synced_gpus=True
  zero2      ZeRO-2 (replicated weights): plain generate, for reference
  vllm       ZeRO-3 + a vLLM server started by rank 0 (`make rollout-env` on CPU): the gathered
             weights pushed to it before every rollout (the weight sync column), generation there

The bench fails unless the greedy response token ids are identical, rank by rank and step by step,
between the ZeRO-3 backends (same weights at every step), and between ZeRO-2 and ZeRO-3 at the first
step (same initial weights; later ZeRO-2 steps may differ in the last bits of the update). Times are
per-step means over the steps after the first (warm-up); vLLM's server start (before step 1) is not
in them. Results: a table on stdout and bench/results/<--result>.json (rollout_backends by default).
vLLM's CPU attention needs a head size >= 32: use tiny32 (or larger) with the vllm run.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

# hidden, layers, intermediate, heads, kv heads
SIZES = {"tiny": (64, 2, 176, 4, 2), "tiny32": (64, 2, 176, 2, 1), "small": (256, 4, 704, 8, 4),
         "40m": (512, 14, 1408, 8, 4)}
RUNS = {"hybrid": ("zero3", "hybrid"), "per_token": ("zero3", "per_token"), "zero2": ("zero2", "hybrid"),
        "vllm": ("zero3", "vllm")}


def make_assets(workdir: str, size: str) -> dict:
    """A tokenizer trained on the demo corpus, a random Llama actor and a reward model of ``size``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from medgpt_ds.data.templates import TEMPLATES
    from medgpt_ds.tokenizer import train_bpe_tokenizer

    out = os.path.join(workdir, size)
    paths = {"actor": os.path.join(out, "actor"), "rm": os.path.join(out, "rm")}
    if all(os.path.isfile(os.path.join(p, "config.json")) for p in paths.values()):
        return paths
    tok_dir = os.path.join(workdir, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        train_bpe_tokenizer(files=[os.path.join(ROOT, "data", "demo", "pretrain", "medical_notes.txt")],
                            vocab_size=1000, output_dir=tok_dir, chat_template=TEMPLATES["chatml"])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    h, n, i, a, kv = SIZES[size]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                         num_attention_heads=a, num_key_value_heads=kv, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(paths["actor"])
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(paths["rm"])
    for p in paths.values():
        tok.save_pretrained(p)
    return paths


def ds_config(workdir: str, name: str) -> str:
    with open(os.path.join(ROOT, "ds_configs", f"{name}.json")) as f:
        cfg = json.load(f)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # tiny models: really shard every tensor
    path = os.path.join(workdir, f"{name}_bench.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def run_ppo(args, paths: dict, run: str, out: str) -> list[dict]:
    stage_cfg, backend = RUNS[run]
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MEDGPT_NO_PROGRESS="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
    env["MEDGPT_BENCH_TOKENS"] = out + "-tokens"  # beside the output dir: the trainer wants that one new
    shutil.rmtree(env["MEDGPT_BENCH_TOKENS"], ignore_errors=True)
    os.makedirs(env["MEDGPT_BENCH_TOKENS"])
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(args.nproc),
           "--master_port", str(29700 + os.getpid() % 200), os.path.join(ROOT, "bench", "rollout_probe.py"),
           "--stage", "ppo", "--sft_model_path", paths["actor"], "--reward_model_path", paths["rm"],
           "--template_name", "chatml", "--train_file_dir", os.path.join(ROOT, "data", "demo", "sft"),
           "--rollout_backend", backend, "--temperature", "0", "--max_new_tokens", str(args.max_new_tokens),
           "--per_device_train_batch_size", str(args.batch), "--max_steps", str(args.steps), "--save_steps", "0",
           "--logging_steps", "1", "--learning_rate", "1e-5", "--report_to", "none", "--export_hf", "False",
           "--deepspeed", ds_config(args.workdir, stage_cfg), "--output_dir", out]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{run} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    print(f"  {run}: {time.perf_counter() - t0:.0f} s wall (launch included)", flush=True)
    with open(os.path.join(out, "logs", "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("split") == "train"]


def rollout_tokens(out: str) -> dict[str, list[dict]]:
    """Every rollout's prompt and response token ids, per rank, in call order."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(out + "-tokens", "rank*.jsonl"))):
        with open(path) as f:
            runs[os.path.basename(path)[:-6]] = [json.loads(line) for line in f]
    return runs


def first_difference(a: dict, b: dict, steps: int | None = None) -> str | None:
    """Where two runs' greedy tokens first differ (None: identical over the first ``steps`` rollouts)."""
    if sorted(a) != sorted(b) or not a:
        return f"ranks differ: {sorted(a)} vs {sorted(b)}"
    for rank in a:
        calls_a, calls_b = a[rank][:steps], b[rank][:steps]
        if len(calls_a) != len(calls_b):
            return f"{rank}: {len(calls_a)} vs {len(calls_b)} rollouts"
        for i, (x, y) in enumerate(zip(calls_a, calls_b)):
            if x["prompts"] != y["prompts"]:
                return f"{rank} rollout {i + 1}: different prompts"
            for row, (rx, ry) in enumerate(zip(x["responses"], y["responses"])):
                if rx != ry:
                    return f"{rank} rollout {i + 1} row {row}: {rx[:12]}... vs {ry[:12]}..."
    return None


def summarize(records: list[dict]) -> dict:
    timed = records[1:] or records  # the first step pays one-time costs
    mean = {k: sum(r.get(f"time/{k}_s", 0.0) for r in timed) / len(timed)
            for k in ("generation", "scoring", "training", "weight_sync")}
    mean["step"] = sum(mean.values())
    mean["tokens"] = sum(r["response_length"] for r in timed) / len(timed)
    return mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--runs", default="hybrid,per_token,zero2", help=f"comma list of {', '.join(RUNS)}")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4, help="prompts per rank per step")
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--workdir", default="/tmp/medgpt_bench_rollout")
    ap.add_argument("--result", default="rollout_backends", help="bench/results/<name>.json")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    results = {}
    for size in args.sizes.split(","):
        paths = make_assets(args.workdir, size)
        print(f"{size}: {args.nproc} ranks, {args.batch} prompts/rank, greedy, max_new_tokens {args.max_new_tokens}",
              flush=True)
        records = {run: run_ppo(args, paths, run, os.path.join(args.workdir, f"{size}-{run}"))
                   for run in args.runs.split(",")}
        tokens = {run: rollout_tokens(os.path.join(args.workdir, f"{size}-{run}")) for run in records}
        runs = list(records)
        checks = {}
        for run in runs[1:]:
            both_zero3 = RUNS[run][0] == RUNS[runs[0]][0]
            checks[f"{runs[0]} vs {run}"] = {
                "scope": "every rollout" if both_zero3 else "first rollout (same initial weights)",
                "difference": first_difference(tokens[runs[0]], tokens[run], None if both_zero3 else 1),
                "later_rollouts_identical": first_difference(tokens[runs[0]], tokens[run]) is None}
        results[size] = {run: summarize(recs) for run, recs in records.items()}
        results[size]["token_checks"] = checks
        results[size]["rollouts_compared"] = sum(len(v) for v in tokens[runs[0]].values())
        bad = {k: c["difference"] for k, c in checks.items() if c["difference"]}
        if bad:
            raise SystemExit(f"error: greedy token ids differ across rollout backends ({size}): {bad}")
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    load = os.getloadavg()[0]  # other jobs on the machine inflate every number
    print(f"\nPPO step time, s per step (mean of steps 2..{args.steps}); {args.nproc} ranks on {device}, "
          f"load average {load:.1f}")
    first = args.runs.split(",")[0]
    print(f"| model | run | generation | scoring | training | weight sync | step | gen. share | gen. speedup vs {first} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, res in results.items():
        base = res[first]["generation"]
        for run in args.runs.split(","):
            m = res[run]
            print(f"| {size} | {run} | {m['generation']:.3f} | {m['scoring']:.3f} | {m['training']:.3f} | "
                  f"{m['weight_sync']:.3f} | {m['step']:.3f} | {100 * m['generation'] / m['step']:.0f}% | "
                  f"{base / m['generation']:.2f}x |")
        for name, c in res["token_checks"].items():
            print(f"greedy token ids identical ({size}, {name}, {c['scope']}, {res['rollouts_compared']} rollouts "
                  f"per run): yes; all later rollouts too: {c['later_rollouts_identical']}")
    from common import write_result

    print("wrote", write_result(args.result, {
        "title": "online RL rollout backends (PPO step split)" if args.result == "rollout_backends" else
                 f"online RL rollout backends: {' vs '.join(args.runs.split(','))} (PPO step split)", "kind": "rollout",
        "command": "python bench/bench_rollout.py " + " ".join(sys.argv[1:]),
        "settings": {"ranks": args.nproc, "prompts_per_rank": args.batch, "max_new_tokens": args.max_new_tokens,
                     "decoding": "greedy", "steps": args.steps, "sizes": {k: SIZES[k] for k in results},
                     "timed": f"mean of steps 2..{args.steps}"}, "results": results}))


if __name__ == "__main__":
    main()
