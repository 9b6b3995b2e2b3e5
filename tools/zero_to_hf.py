#!/usr/bin/env python
"""DeepSpeed checkpoint (any ZeRO stage, any world size) -> a Hugging Face model folder.

    python tools/zero_to_hf.py --checkpoint_dir outputs/sft/checkpoint-200 --output_dir hf/sft
    python tools/zero_to_hf.py --checkpoint_dir outputs/sft --output_dir hf/sft   # uses `latest`
    python tools/zero_to_hf.py --checkpoint_dir outputs/sft-lora --output_dir hf/sft-merged --merge_lora --verify

Full models -> sharded model*.safetensors (+ index), config.json, generation_config.json and the
tokenizer with its chat template, in the layout save_pretrained writes and vLLM / transformers 4 read
(a MoE layer's experts as per-expert weights, a Gemma3 composite as language_model.model.*). LoRA
runs -> a PEFT adapter (PeftModel.from_pretrained(base, dir)) or, with --merge_lora, full merged
weights. Reward/value models keep their score head (a PPO critic: --model_kind value --base_model).
Weights are written tensor by tensor: peak memory stays near one tensor (one layer's experts for a
MoE) plus overhead.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medgpt_ds.errors import main_boundary  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint_dir", required=True,
                    help="a tag dir (output_dir/checkpoint-N) or the run's output_dir (then `latest` is used)")
    ap.add_argument("--output_dir", required=True, help="where the Hugging Face model is written")
    ap.add_argument("--base_model", default=None,
                    help="base model path: recorded in adapter_config.json and checked against the adapter; "
                         "default: the base recorded in the checkpoint. Required for checkpoints without hf_meta/")
    ap.add_argument("--merge_lora", action="store_true", help="merge a LoRA adapter into full weights")
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: the training dtype)")
    ap.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    ap.add_argument("--model_kind", default=None, choices=["causal_lm", "reward", "value"],
                    help="override the kind recorded in the checkpoint (needed without hf_meta/ for reward models)")
    ap.add_argument("--verify", action="store_true",
                    help="load the export with transformers and compare logits with the checkpoint's weights")
    ap.add_argument("--trust_checkpoint", action="store_true",
                    help="unpickle the checkpoint files without the allow-list of DeepSpeed classes (only for "
                         "checkpoints whose origin you trust: a hostile pickle runs code when loaded)")
    return ap.parse_args(argv)


@main_boundary
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from medgpt_ds.convert import canonical_dtype, export_checkpoint

    t0 = time.time()
    if args.dtype is not None:
        canonical_dtype(args.dtype)  # fail before touching the checkpoint
    result = export_checkpoint(args.checkpoint_dir, args.output_dir, base_model=args.base_model,
                               merge_lora=args.merge_lora, dtype=args.dtype, max_shard_size=args.max_shard_size,
                               model_kind=args.model_kind, verify=args.verify,
                               trust_checkpoint=args.trust_checkpoint)
    print(f"wrote {result.kind} model ({result.num_params / 1e6:.2f}M params, {result.num_tensors} tensors, "
          f"{result.dtype}, {len(result.files)} file(s)) to {result.output_dir} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
