#!/usr/bin/env python
"""sft throughput against the peers, fair and interleaved (not a test).

    python bench/bench_sft.py                                   # CPU defaults, writes bench/results/sft_peers.json
    python bench/bench_sft.py --shape qwen2.5-0.5b --bf16 --attn flash_attention_2 --max_length 2048 \\
        --groups packed-gc_off --peers trl --rounds 1 --name gpu_sft_qwen2.5-0.5b       # what gpu_suite runs

Every side trains the same random-init model (one config, one seed), on the same MedicalGPT sft
sample, with the same sequence length, DeepSpeed JSON (torch AdamW pinned), precision, gradient
checkpointing (both off or both on, use_reentrant=False), attention implementation, learning rate,
constant schedule, micro batch (packed: N rows of max_length; padded: N samples) and one rank:

  ours  launch/train.py --stage sft (packed: best-fit rows, position ids restart, no mask; padded)
  trl   TRL SFTTrainer (bench/peer_sft.py --recipe trl): BFD packing, padding-free; or padded
  lf    LLaMA-Factory's recipe on the HF Trainer (bench/peer_sft.py --recipe lf): knapsack rows,
        block-diagonal 4-D mask (neat_packing)

Each group of sides runs in rounds, A B C A B C ...; a run's figure is its median real tokens/s
per step after --warmup steps; the result is the median per-round ratio ours / peer, with its
spread. Absolute tokens/s on a shared CPU machine are noise; the ratio is what to read.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (ROOT, SFT_SAMPLE, bench_ds_config, bench_env, interleave, launcher, median_after,  # noqa: E402
                    padded_vocab_tokenizer, run, sft_texts, tagged_json, write_result, write_shape, SHAPES)

GROUPS = {  # name: (packing, gradient checkpointing)
    "packed-gc_off": (True, False), "packed-gc_on": (True, True),
    "padded-gc_off": (False, False), "padded-gc_on": (False, True),
}
PEER_NAMES = {"trl": "TRL SFTTrainer", "lf": "LLaMA-Factory recipe (HF Trainer)"}


def prepare(wd: str, a) -> dict:
    """Tokenizer (vocab padded to the shape's real size) and the model config both sides build."""
    from medgpt_ds.data.templates import TEMPLATES

    vocab = SHAPES[a.shape].get("vocab_size", a.vocab)
    tok = os.path.join(wd, "tokenizer")
    if not os.path.isfile(os.path.join(tok, "tokenizer.json")):  # the same workdir again: reuse it
        padded_vocab_tokenizer(sft_texts(), tok, vocab, trained_vocab=min(4000, vocab), chat_template=TEMPLATES["qwen"])
    cfg = write_shape(a.shape, os.path.join(wd, "model_config.json"))
    ds = bench_ds_config(os.path.join(wd, f"{a.zero}.json"), a.zero, cuda=a.cuda)
    return {"tokenizer": tok, "model_config": cfg, "deepspeed": ds}


def run_ours(paths: dict, wd: str, a, packing: bool, gc: bool, tag: str) -> dict:
    out = os.path.join(wd, f"ours_{tag}")
    shutil.rmtree(out, ignore_errors=True)  # logs/metrics.jsonl appends: a previous round's records would mix in
    cmd = launcher(1) + [
        os.path.join(ROOT, "launch", "train.py"), "--stage", "sft", "--model_config", paths["model_config"],
        "--tokenizer_name_or_path", paths["tokenizer"], "--train_file_dir", a.data, "--template_name", "qwen",
        "--model_max_length", str(a.max_length), "--packing", str(packing),
        "--per_device_train_batch_size", str(a.rows if packing else a.batch), "--gradient_accumulation_steps", "1",
        "--max_steps", str(a.steps), "--logging_steps", "1", "--save_steps", "0", "--report_to", "none",
        "--learning_rate", "1e-4", "--lr_scheduler_type", "constant", "--seed", "42",
        "--gradient_checkpointing", str(gc), "--attn_implementation", a.attn, "--deepspeed", paths["deepspeed"],
        "--output_dir", out, "--overwrite_output_dir", "--export_hf", "False"] + (["--bf16"] if a.bf16 else [])
    r = run(cmd, bench_env(a.threads), timeout=a.timeout)
    recs = [json.loads(line) for line in open(os.path.join(out, "logs", "metrics.jsonl"))]
    recs = [x for x in recs if x["split"] == "train"]
    res = {"tokens_per_s": median_after([x["tokens_per_s"] for x in recs], a.warmup),
           "tflops": median_after([x.get("tflops", float("nan")) for x in recs], a.warmup),
           "pad_frac": sum(x.get("pad_frac", 0.0) for x in recs) / len(recs),
           "peak_rss_mib": r["peak_rss_mib"], "wall_s": round(r["wall_s"], 1)}
    if any("mfu" in x for x in recs):
        res["mfu"] = median_after([x["mfu"] for x in recs], a.warmup)
    if any("mem_gib" in x for x in recs):
        res["gpu_mem_gib"] = max(x["mem_gib"] for x in recs)
    return res


def run_peer(recipe: str, paths: dict, wd: str, a, packing: bool, gc: bool, tag: str) -> dict:
    cmd = launcher(1) + [
        os.path.join(ROOT, "bench", "peer_sft.py"), "--recipe", recipe, "--model_config", paths["model_config"],
        "--tokenizer", paths["tokenizer"], "--data", a.data, "--output_dir", os.path.join(wd, f"{recipe}_{tag}"),
        "--deepspeed", paths["deepspeed"], "--steps", str(a.steps), "--warmup", str(a.warmup),
        "--max_length", str(a.max_length), "--batch", str(a.rows if packing else a.batch),
        "--packing", str(int(packing)), "--gc", str(int(gc)), "--attn", a.attn, "--lr", "1e-4", "--seed", "42"
    ] + (["--bf16"] if a.bf16 else [])
    r = run(cmd, bench_env(a.threads), timeout=a.timeout)
    res = tagged_json(r["stdout"], "PEER_RESULT")
    res.update(peak_rss_mib=r["peak_rss_mib"], wall_s=round(r["wall_s"], 1))
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-h256x4", help=f"one of {', '.join(SHAPES)}")
    ap.add_argument("--vocab", type=int, default=4000, help="vocabulary of shapes that have none of their own")
    ap.add_argument("--data", default=SFT_SAMPLE)
    ap.add_argument("--groups", default="packed-gc_off,packed-gc_on,padded-gc_off,padded-gc_on",
                    help=f"comma list of {', '.join(GROUPS)}")
    ap.add_argument("--peers", default="trl,lf", help="comma list of trl, lf (lf runs in packed groups only)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--rows", type=int, default=2, help="packed rows of max_length per micro batch")
    ap.add_argument("--batch", type=int, default=8, help="samples per micro batch when padded")
    ap.add_argument("--zero", default="zero2")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--attn", default="sdpa", help="sdpa, eager or flash_attention_2 (both sides)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per process on both sides (1 on a shared CPU machine; default: torch's)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--name", default="sft_peers", help="bench/results/<name>.json")
    ap.add_argument("--results_dir", default=None)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)
    import torch

    a.cuda = torch.cuda.is_available()
    if not os.path.exists(a.data):
        raise SystemExit(f"error: needs the MedicalGPT sample at {a.data}")
    wd = a.workdir or tempfile.mkdtemp(prefix="medgpt_bench_sft_")
    os.makedirs(wd, exist_ok=True)
    paths = prepare(wd, a)
    peers = [p for p in a.peers.split(",") if p]
    settings = {"model": f"{a.shape} (random init, seed 42)", "model_config": SHAPES[a.shape],
                "vocab": SHAPES[a.shape].get("vocab_size", a.vocab), "data": os.path.basename(a.data),
                "max_length": a.max_length, "zero": f"{a.zero} (ds_configs/{a.zero}.json, torch AdamW pinned)",
                "precision": "bf16" if a.bf16 else "fp32", "attention": a.attn, "ranks": 1, "grad_accum": 1,
                "lr": "1e-4 constant",
                "torch threads per process": a.threads or "torch default", "steps": a.steps, "warmup_steps_excluded": a.warmup, "rounds": a.rounds,
                "loss masks": "ours and the LLaMA-Factory recipe: assistant tokens; TRL: every token (its default for "
                              "`messages` data without a generation-tagged template); TRL's fused head then projects "
                              "every position, as ours does, so the work is the same"}
    sides_info = {"medgpt-ds": "launch/train.py --stage sft",
                  "TRL SFTTrainer": "SFTConfig(packing=bfd, padding-free | padded), DeepSpeed through the HF Trainer",
                  "LLaMA-Factory recipe (HF Trainer)": "greedy knapsack rows padded to max_length + 1, neat_packing "
                                                       "4-D block-diagonal mask, HF Trainer + DeepSpeed"}
    groups = a.groups.split(",")

    def save(comparisons: list) -> dict:
        """Write the result so far (after each group: a stopped bench keeps what it measured)."""
        payload = {"title": f"sft vs peers — {a.shape}", "kind": "peer_comparison",
                   "command": "python bench/bench_sft.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "settings": settings, "sides": {k: v for k, v in sides_info.items() if k == "medgpt-ds" or
                                                   any(PEER_NAMES[p] == k for p in peers)},
                   "comparisons": comparisons, "complete": len(comparisons) == len(groups)}
        payload["path"] = write_result(a.name, payload, a.results_dir)
        return payload

    comparisons = []
    for group in groups:
        packing, gc = GROUPS[group]
        sides = {"medgpt-ds": lambda p=packing, g=gc, t=group: run_ours(paths, wd, a, p, g, t)}
        for peer in peers:
            if peer == "lf" and not packing:
                continue
            sides[PEER_NAMES[peer]] = lambda r=peer, p=packing, g=gc, t=group: run_peer(r, paths, wd, a, p, g, t)

        def show(name, i, res, group=group):
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items() if k != "error"}
            print(f"[{group}] round {i + 1} {name}: {shown if 'error' not in res else res['error'][-600:]}", flush=True)

        out = interleave(sides, a.rounds, "tokens_per_s", on_result=show)
        comparisons.append({"name": group, "metric": "real tokens/s (median per step)",
                            "settings": {"packing": packing, "gradient_checkpointing": f"{'on' if gc else 'off'} on "
                                         "both sides", "micro batch": f"{a.rows} rows of {a.max_length}" if packing
                                         else f"{a.batch} samples, padded to the longest"}, **out})
        for key, st in out["ratios"].items():
            if st["median"] is not None:
                print(f"[{group}] {key}: median {st['median']:.2f}x (min {st['min']:.2f}, max {st['max']:.2f}, "
                      f"{st['n']} rounds)", flush=True)
        payload = save(comparisons)
    print(f"wrote {payload['path']}", flush=True)
    return payload


if __name__ == "__main__":
    main()
