#!/usr/bin/env python
"""Merge a LoRA adapter into its base model: base folder + adapter folder -> a full model folder.

    python tools/merge_lora.py --base_model models/Qwen2.5-0.5B --adapter hf/sft-lora --output_dir hf/sft-merged
    python tools/merge_lora.py --base_model models/Qwen2.5-0.5B --adapter hf/rm-lora --output_dir hf/rm --verify
    # MedicalGPT's tools/merge_peft_adapter.py flags work as they are (--output_dir defaults to ./merged)
    python tools/merge_lora.py --base_model models/Qwen2.5-0.5B --lora_model outputs-sft --tokenizer_path outputs-sft

Works one layer at a time (base safetensors and adapter read lazily, each LoRA layer merged in fp32
with PEFT's own merge; a MoE layer's experts together), so memory stays near one layer plus one tensor
whatever the model size. The base folder is read, and the merged model written, in the layout
save_pretrained writes (per-expert MoE weights, a composite's own prefixes).
Reward/value adapters (task SEQ_CLS) give a sequence-classification model that keeps the trained
score head. The tokenizer and its chat template come from the adapter folder when it has them
(tools/zero_to_hf.py puts them there), else from the base, or from --tokenizer_path. A vocabulary
resized in training travels in the adapter and is merged as it is (MedicalGPT's --resize_emb is
accepted: nothing else to resize). For a DeepSpeed checkpoint, use
tools/zero_to_hf.py --merge_lora directly: the checkpoint holds the base weights too.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medgpt_ds.errors import UserError, main_boundary  # noqa: E402


@main_boundary
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base_model", required=True, help="base model folder (safetensors)")
    ap.add_argument("--adapter", "--lora_model", dest="adapter", required=True, help="PEFT adapter folder")
    ap.add_argument("--output_dir", default="./merged", help="where the merged model goes (default ./merged)")
    ap.add_argument("--tokenizer_path", default=None,
                    help="tokenizer saved with the merged model (default: the adapter's if it has one, else the base's)")
    ap.add_argument("--resize_emb", action="store_true",
                    help="MedicalGPT's flag, accepted: a vocabulary resized in training is merged from the adapter")
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: the base model's dtype)")
    ap.add_argument("--max_shard_size", default="5GB")
    ap.add_argument("--model_kind", default=None, choices=["causal_lm", "reward", "value"],
                    help="default: from the adapter (task_type SEQ_CLS -> reward)")
    ap.add_argument("--verify", action="store_true",
                    help="compare the merged model's logits with PeftModel(base, adapter) on a few prompts")
    args = ap.parse_args(argv)
    from medgpt_ds.convert import canonical_dtype, merge_lora_folders

    t0 = time.time()
    if args.dtype is not None:
        canonical_dtype(args.dtype)
    tokenizer = None
    if args.tokenizer_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)  # before merging: a bad path loses nothing
    result = merge_lora_folders(args.base_model, args.adapter, args.output_dir, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, model_kind=args.model_kind, verify=args.verify)
    if tokenizer is not None:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(args.output_dir).get_text_config().vocab_size
        if len(tokenizer) > vocab:
            raise UserError(f"--tokenizer_path {args.tokenizer_path} has {len(tokenizer)} tokens but the merged model's "
                            f"embeddings have {vocab} rows; pass the tokenizer the adapter was trained with")
        tokenizer.save_pretrained(args.output_dir)
    print(f"wrote merged model ({result.num_params / 1e6:.2f}M params, {result.dtype}, {len(result.files)} "
          f"file(s)) to {result.output_dir} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
