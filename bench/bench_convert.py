#!/usr/bin/env python
"""Checkpoint conversion benchmark: wall time and peak RSS against model size (CPU, random weights).

    python bench/bench_convert.py                       # tiny, 60M, 130M, 370M; ZeRO-3 x 2 ranks
    python bench/bench_convert.py --sizes tiny,60M --stage 2 --shard 128MB

For every size it makes a real DeepSpeed checkpoint once (2-rank launch, one AdamW step, cached in
--workdir), then converts it in fresh processes with:

  stream     medgpt_ds.convert.export_checkpoint (shard by shard; what tools/zero_to_hf.py runs)
  ds_whole   DeepSpeed get_fp32_state_dict_from_zero_checkpoint -> model.load_state_dict ->
             save_pretrained (the whole-model path)
  ds_lazy    DeepSpeed convert_zero_checkpoint_to_fp32_state_dict(safe_serialization=True), its own
             lazy-mode writer (weights only: no config, no tokenizer)
  imports    the same imports and nothing else: the fixed overhead in every row

Peak RSS is the kernel's high-water mark (VmHWM: anonymous memory plus touched pages of
memory-mapped files); peak anon is sampled every 5 ms (RssAnon: memory that cannot be dropped).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# hidden, layers, intermediate, vocab, heads, kv heads
SIZES = {
    "tiny": (64, 2, 172, 1000, 4, 2),
    "60M": (512, 8, 1408, 32000, 8, 4),
    "130M": (768, 12, 2048, 32000, 12, 4),
    "370M": (1024, 24, 2816, 32000, 16, 8),
}
METHODS = ("imports", "stream", "ds_lazy", "ds_whole")


def llama_config(size: str):
    from transformers import LlamaConfig

    h, n, i, v, a, kv = SIZES[size]
    return LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                       num_attention_heads=a, num_key_value_heads=kv, max_position_embeddings=512,
                       tie_word_embeddings=False)


# --- checkpoint maker (runs under the deepspeed launcher) ------------------------------------

def make_checkpoint(size: str, out: str, stage: int) -> None:
    import deepspeed
    import torch
    from transformers import LlamaForCausalLM

    from medgpt_ds.convert import write_hf_meta
    from medgpt_ds.tokenizer import train_bpe_tokenizer

    from medgpt_ds import dist

    dist.init()  # the trainer's init: gloo on CPU, and DeepSpeed's CPU shm segments unlinked
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    config = llama_config(size)
    model = LlamaForCausalLM(config)
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": zero, "steps_per_print": 10**9})
    ids = torch.randint(0, config.vocab_size, (1, 8))
    engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
    engine.step()
    engine.save_checkpoint(out, tag="checkpoint-1", save_latest=False)
    if rank == 0:
        tok = train_bpe_tokenizer(texts=["fever cough headache"] * 20, vocab_size=300)
        write_hf_meta(os.path.join(out, "checkpoint-1"), engine.module, tok, base_model=None, torch_dtype="fp32")
        with open(os.path.join(out, "latest"), "w") as f:
            f.write("checkpoint-1")


# --- one measured conversion (fresh process) ---------------------------------------------------

def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_method(method: str, ckpt: str, out: str, shard: str) -> dict:
    peak_anon = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.005)

    import contextlib
    import io

    import deepspeed  # noqa: F401  (same imports for every method)
    import torch
    import transformers  # noqa: F401
    from deepspeed.utils import zero_to_fp32

    from medgpt_ds import convert

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if method == "stream":
            convert.export_checkpoint(ckpt, out, max_shard_size=shard, dtype="fp32", log=lambda m: None)
        elif method == "ds_lazy":
            zero_to_fp32.convert_zero_checkpoint_to_fp32_state_dict(ckpt, out, max_shard_size=shard,
                                                                    safe_serialization=True)
        elif method == "ds_whole":
            from transformers import AutoConfig, AutoModelForCausalLM

            sd = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(ckpt)
            config = AutoConfig.from_pretrained(os.path.join(ckpt, "checkpoint-1", "hf_meta"))
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            model.load_state_dict(sd, assign=True)
            del sd
            model.save_pretrained(out, max_shard_size=shard)
    wall = time.perf_counter() - t0
    stop.set()
    return {"wall_s": wall, "peak_rss": _status("VmHWM"), "peak_anon": max(peak_anon[0], _status("RssAnon"))}


# --- driver ------------------------------------------------------------------------------------

def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--world_size", type=int, default=2)
    ap.add_argument("--shard", default="256MB", help="max_shard_size for every writer")
    ap.add_argument("--workdir", default="/tmp/medgpt_bench_convert")
    ap.add_argument("--keep", action="store_true", help="keep the exports (checkpoints are always kept)")
    ap.add_argument("--_make", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._make:
        make_checkpoint(args._make, args.out, args.stage)
        return
    if args._run:
        print("RESULT " + json.dumps(run_method(args._run, args.ckpt, args.out, args.shard)))
        return

    import shutil

    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    for size in args.sizes.split(","):
        ckpt = os.path.join(args.workdir, f"{size}-z{args.stage}-w{args.world_size}")
        if not os.path.isfile(os.path.join(ckpt, "latest")):
            print(f"[{size}] making a ZeRO-{args.stage} x {args.world_size} checkpoint ...", flush=True)
            import socket

            with socket.socket() as sock:  # a free port: 29500 may be taken by another run
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
            subprocess.run([launcher, "--num_gpus", str(args.world_size), "--master_port", str(port),
                            os.path.abspath(__file__),
                            "--_make", size, "--out", ckpt, "--stage", str(args.stage)],
                           cwd=ROOT, env=env, check=True, capture_output=True)
        cfg = llama_config(size)
        from transformers import LlamaForCausalLM

        import torch

        with torch.device("meta"):
            n_params = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
        ckpt_bytes = _dir_bytes(os.path.join(ckpt, "checkpoint-1"))
        for method in args.methods.split(","):
            out = os.path.join(args.workdir, "out", f"{size}-{method}")
            shutil.rmtree(out, ignore_errors=True)
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_run", method, "--ckpt", ckpt,
                                   "--out", out, "--shard", args.shard], cwd=ROOT, env=env,
                                  capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"[{size}] {method} failed:\n{proc.stderr[-2000:]}")
                continue
            r = json.loads(line[0][len("RESULT "):])
            r.update(size=size, method=method, params=n_params, ckpt_bytes=ckpt_bytes,
                     out_bytes=_dir_bytes(out) if os.path.isdir(out) else 0)
            rows.append(r)
            print(f"[{size}] {method:8s} {r['wall_s']:7.1f} s  peak RSS {r['peak_rss'] / 2**20:7.0f} MiB  "
                  f"peak anon {r['peak_anon'] / 2**20:7.0f} MiB", flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)

    table = [f"ZeRO-{args.stage} x {args.world_size} ranks, fp32 weights, max_shard_size {args.shard}; MiB; 'imports' = "
             "fixed overhead of every process", "",
             "| size | params | fp32 weights | method | wall s | peak RSS | peak anon | RSS - imports |",
             "|---|---|---|---|---|---|---|---|"]
    base = {r["size"]: r["peak_rss"] for r in rows if r["method"] == "imports"}
    for r in rows:
        over = (r["peak_rss"] - base.get(r["size"], 0)) / 2**20
        table.append(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['params'] * 4 / 2**20:.0f} | {r['method']} | "
                     f"{r['wall_s']:.1f} | {r['peak_rss'] / 2**20:.0f} | {r['peak_anon'] / 2**20:.0f} | {over:.0f} |")
    print("\n" + "\n".join(table))
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from common import write_result

    print("wrote", write_result("convert", {
        "title": "ZeRO -> HF conversion memory", "kind": "table",
        "command": "python bench/bench_convert.py " + " ".join(sys.argv[1:]),
        "settings": {"stage": args.stage, "world_size": args.world_size, "shard": args.shard, "sizes": args.sizes},
        "rows": rows, "table": table}))

if __name__ == "__main__":
    main()
