"""``hf_meta/``: what a Hugging Face export needs besides the weights, written into every checkpoint.

The trainer writes, inside every DeepSpeed tag dir, an ``hf_meta/`` folder (``write_hf_meta``):
config, generation config, tokenizer with chat template, adapter config and ``medgpt_meta.json``.
The weights stay in DeepSpeed's own files, so DeepSpeed's ``zero_to_fp32.py`` keeps working on our
checkpoints.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any

import torch

from medgpt_ds.errors import PathNotFound, UserError

META_DIR = "hf_meta"
META_FILE = "medgpt_meta.json"
META_VERSION = 1
MODEL_KINDS = ("causal_lm", "reward", "value")

# Accepted spellings of dtypes, mapped to torch's canonical names (written to the config).
DTYPE_NAMES = {
    "fp32": "float32", "float32": "float32", "float": "float32",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
}


def canonical_dtype(name: str | torch.dtype) -> str:
    """'bf16' / 'torch.bfloat16' / torch.bfloat16 -> 'bfloat16'; anything else is a UserError."""
    key = str(name).removeprefix("torch.").lower()
    if key not in DTYPE_NAMES:
        raise UserError(f"unknown dtype {name!r}: use one of bf16, fp16, fp32")
    return DTYPE_NAMES[key]


def _unwrap(model: Any) -> Any:
    """DeepSpeedEngine / DDP wrapper -> the user's module."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def write_hf_meta(
    tag_dir: str,
    model: Any,
    tokenizer: Any,
    *,
    model_kind: str = "causal_lm",
    base_model: str | None,
    peft_config: Any = None,
    torch_dtype: str,
    extra: dict | None = None,
) -> str:
    """Write ``tag_dir/hf_meta/``: config.json, generation_config.json (if the model generates),
    the tokenizer with its chat_template, adapter_config.json (LoRA) and medgpt_meta.json.

    ``model`` may be the DeepSpeed engine, a PeftModel or a transformers model; nothing here
    touches parameters or runs collectives (safe under ZeRO-3; call it on rank 0 only).
    ``base_model`` is the path/name the run started from (the base of a LoRA adapter).
    ``peft_config`` defaults to the PeftModel's active adapter config. Returns the folder path.
    """
    if model_kind not in MODEL_KINDS:
        raise UserError(f"model_kind must be one of {MODEL_KINDS}, got {model_kind!r}")
    dtype = canonical_dtype(torch_dtype)
    model = _unwrap(model)
    adapter_name = "default"
    inner = model
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):  # PeftModel
        adapter_name = getattr(model, "active_adapter", "default") or "default"
        if peft_config is None:
            peft_config = model.peft_config[adapter_name]
        inner = model.get_base_model()

    # Write into a temp folder and swap it in, so a crash never leaves half a meta folder.
    out = os.path.join(tag_dir, META_DIR)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    config = copy.deepcopy(inner.config)
    config.architectures = [type(inner).__name__]
    config.dtype = dtype
    config.save_pretrained(tmp)
    generation_config = getattr(inner, "generation_config", None)
    if generation_config is not None and getattr(inner, "can_generate", lambda: False)():
        generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)

    modules_to_save = None
    if peft_config is not None:
        peft_config = copy.deepcopy(peft_config)
        if base_model is not None:
            peft_config.base_model_name_or_path = base_model
        peft_config.inference_mode = True
        peft_config.save_pretrained(tmp)
        modules_to_save = sorted(getattr(peft_config, "modules_to_save", None) or []) or None

    import deepspeed
    import transformers

    meta = {
        "format_version": META_VERSION,
        "model_kind": model_kind,
        "use_peft": peft_config is not None,
        "peft_type": getattr(getattr(peft_config, "peft_type", None), "value", None),
        "adapter_name": adapter_name if peft_config is not None else None,
        "modules_to_save": modules_to_save,
        "base_model": base_model,
        "torch_dtype": dtype,
        "architecture": type(inner).__name__,
        "tie_word_embeddings": bool(getattr(config.get_text_config(), "tie_word_embeddings", False)),
        "vocab_size": getattr(config.get_text_config(), "vocab_size", None),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__,
        },
    }
    if peft_config is not None:
        import peft

        meta["versions"]["peft"] = peft.__version__
    base_config = os.path.join(base_model, "config.json") if base_model else ""
    if os.path.isfile(base_config):  # a vocabulary resized for an extended tokenizer shows here
        with open(base_config, encoding="utf-8") as f:
            base_cfg = json.load(f)
        meta["base_vocab_size"] = base_cfg.get("vocab_size", (base_cfg.get("text_config") or {}).get("vocab_size"))
    if extra:
        meta.update(extra)
    with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def read_hf_meta(tag_dir: str) -> dict:
    """Load ``tag_dir/hf_meta/medgpt_meta.json`` (error naming the folder when absent)."""
    path = os.path.join(tag_dir, META_DIR, META_FILE)
    if not os.path.isfile(path):
        raise PathNotFound(
            f"{tag_dir} has no {META_DIR}/{META_FILE}: it was not written by medgpt-ds "
            "(pass --base_model to take config and tokenizer from a base model instead)"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)
