#!/usr/bin/env python
"""How much GPU memory and CPU RAM a training run needs, and the longest sequence that fits,
from the model's config.json alone (nothing but the config is read or downloaded).

    python tools/estimate_memory.py --model_name_or_path Qwen/Qwen2.5-7B --zero 3 --offload optimizer \
        --num_gpus 8 --nodes 2 --seq_len 32768 --micro_batch 1 --gradient_checkpointing --gpu_memory 80
    python tools/estimate_memory.py --model_name_or_path outputs/sft --use_peft --zero 2 --seq_len 8192

Model states (params, gradients, optimizer) come from DeepSpeed's estimators
(estimate_zero2/zero3_model_states_mem_needs); activations and logits from the architecture
(medgpt_ds/memory.py explains the accounting; bench/bench_memory.py checks it against measured peaks).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medgpt_ds.errors import main_boundary  # noqa: E402


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name_or_path", required=True,
                    help="model dir, config.json path, hub id (only config.json is fetched) or a preset (tiny, small)")
    ap.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3], help="ZeRO stage")
    ap.add_argument("--offload", default="none", choices=["none", "optimizer", "param", "all"],
                    help="ZeRO offload to CPU: optimizer (offload_optimizer), param (offload_param, ZeRO-3), all (both)")
    ap.add_argument("--num_gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--nodes", type=int, default=1, help="number of nodes")
    ap.add_argument("--seq_len", type=int, default=4096, help="tokens per sample (model_max_length / block_size)")
    ap.add_argument("--micro_batch", type=int, default=1, help="per_device_train_batch_size (rows per GPU)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="training precision")
    ap.add_argument("--use_peft", action="store_true", help="LoRA: only adapter weights are trained")
    ap.add_argument("--lora_rank", type=int, default=8, help="LoRA rank (with --use_peft)")
    ap.add_argument("--target_modules", default="all", help="LoRA target modules (comma list or all)")
    ap.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    ap.add_argument("--offload_activations", action="store_true", help="checkpointed activations live in CPU RAM")
    ap.add_argument("--tiled_mlp", action="store_true", help="DeepSpeed TiledMLP")
    ap.add_argument("--chunked_loss", type=_bool, default=True,
                    help="LM head + cross entropy in chunks of tokens (the trainer's default); false = full logits")
    ap.add_argument("--loss_chunk_size", type=int, default=1024, help="tokens per loss chunk")
    ap.add_argument("--sequence_parallel_size", type=int, default=1, help="Ulysses sequence parallel degree")
    ap.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"],
                    help="attention kernel (eager keeps the full attention matrix)")
    ap.add_argument("--gpu_memory", default="80",
                    help="GPU memory in GiB for the longest-sequence search; comma list for several (e.g. 24,40,80)")
    ap.add_argument("--overhead_gib", type=float, default=1.0, help="per-GPU framework overhead (CUDA context, buffers)")
    ap.add_argument("--trust_remote_code", action="store_true", help="allow custom config code from the model dir")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    return ap.parse_args(argv)


@main_boundary
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # deepspeed and transformers log to stdout on import: keep stdout for the table / JSON
    with contextlib.redirect_stdout(sys.stderr):
        arch, setup, est, fits = _estimate(args)
    if args.json:
        out = {k: getattr(est, k) for k in ("params", "grads", "optimizer", "deepspeed_states", "activations",
                                            "recompute", "logits", "overhead", "cpu_per_node", "tokens_per_rank")}
        out.update(per_gpu=est.per_gpu, total_params=arch.total_params, trainable_params=arch.lora_params or arch.total_params,
                   max_seq_len={f"{k:g}": v for k, v in fits.items()})
        print(json.dumps(out, indent=2))
    else:
        from medgpt_ds import memory

        print(memory.format_table(arch, setup, est, fits))
    return 0


def _estimate(args):
    """(arch, setup, estimate, {GiB: longest sequence}); a UserError for bad flags or config."""
    from medgpt_ds import memory
    from medgpt_ds.errors import UserError

    for name in ("num_gpus", "nodes", "seq_len", "micro_batch", "sequence_parallel_size", "loss_chunk_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    try:
        gpu_mems = [float(x) for x in args.gpu_memory.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--gpu_memory {args.gpu_memory!r}: expected GiB numbers, e.g. 80 or 24,40,80") from None
    if args.model_name_or_path in _presets():
        from transformers import AutoConfig

        kw = dict(_presets()[args.model_name_or_path])
        config = AutoConfig.for_model(kw.pop("model_type"), vocab_size=32000, **kw)
    else:
        config = memory.load_config(args.model_name_or_path, args.trust_remote_code)
    arch = memory.arch_from_config(config, lora_rank=args.lora_rank if args.use_peft else 0,
                                   target_modules=args.target_modules)
    setup = memory.Setup(
        zero=args.zero, offload_optimizer=args.offload in ("optimizer", "all"),
        offload_param=args.offload in ("param", "all"), num_gpus=args.num_gpus, nodes=args.nodes,
        seq_len=args.seq_len, micro_batch=args.micro_batch, dtype_bytes=4 if args.dtype == "fp32" else 2,
        gradient_checkpointing=args.gradient_checkpointing, chunked_loss=args.chunked_loss,
        loss_chunk_size=args.loss_chunk_size, sequence_parallel=args.sequence_parallel_size,
        attn=args.attn_implementation, tiled_mlp=args.tiled_mlp, offload_activations=args.offload_activations,
        overhead_gib=args.overhead_gib)
    est = memory.estimate(arch, setup)
    fits = {m: memory.max_seq_len(arch, setup, int(m * memory.GiB)) for m in gpu_mems}
    return arch, setup, est, fits


def _presets() -> dict:
    from medgpt_ds.model import PRESETS

    return PRESETS


if __name__ == "__main__":
    sys.exit(main())
