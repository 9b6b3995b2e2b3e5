"""The conversion: DeepSpeed checkpoint -> Hugging Face folder (full, PEFT adapter or merged)."""
from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import torch

from medgpt_ds.convert.layout import to_hub_layout
from medgpt_ds.convert.hf_meta import META_DIR, META_FILE, META_VERSION, MODEL_KINDS, canonical_dtype, read_hf_meta
from medgpt_ds.convert.plans import build_model, load_config, plan_adapter, plan_full, plan_merged
from medgpt_ds.convert.verify import verify_export
from medgpt_ds.convert.writer import write_safetensors
from medgpt_ds.convert.zero import ZeroCheckpoint, resolve_tag_dir
from medgpt_ds.errors import CheckpointError, UserError

# Config fields that must agree between a LoRA checkpoint's base and the --base_model it is
# exported against (vocab_size may differ: a resized vocabulary travels in the adapter).
_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "intermediate_size", "head_dim")
_SIDE_FILES = ("config.json", "generation_config.json", "adapter_config.json", META_FILE)


def write_generation_config(src_dir: str | None, config: Any, output_dir: str) -> None:
    """generation_config.json for a causal export: the run's own (or one derived from the config),
    stopping at the chat template's end-of-turn token as well as at eos (ChatML replies end with
    <|im_end|>, not <|endoftext|>), as the trainer's own final export does. Needs the tokenizer
    already in ``output_dir``."""
    from transformers import AutoTokenizer, GenerationConfig

    from medgpt_ds.generation import stop_at_end_of_turn

    if src_dir and os.path.isfile(os.path.join(src_dir, "generation_config.json")):
        gen = GenerationConfig.from_pretrained(src_dir)
    else:
        gen = GenerationConfig.from_model_config(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(output_dir)
    except (OSError, ValueError):
        tokenizer = None
    stop_at_end_of_turn(gen, tokenizer)
    gen.save_pretrained(output_dir)


@dataclass
class ExportResult:
    output_dir: str
    kind: str  # "full" | "adapter" | "merged"
    files: list[str]
    num_tensors: int
    num_params: int
    dtype: str
    verify: dict | None = None


def check_same_base(trained: Any, base: Any, base_name: str) -> None:
    """Raise a CheckpointError when ``base`` (a config) cannot be the base of ``trained``."""
    t, b = trained.get_text_config(), base.get_text_config()
    diffs = [f"{f}: adapter {getattr(t, f, None)} vs base {getattr(b, f, None)}"
             for f in _SHAPE_FIELDS if getattr(t, f, None) != getattr(b, f, None)]
    if diffs:
        raise CheckpointError(f"the adapter was trained on a different base model than {base_name} ("
                              + "; ".join(diffs) + ")")



def prepare_output_dir(output_dir: str, tag_dir: str) -> None:
    """Create ``output_dir`` (never inside the source) and remove stale weight shards from it."""
    out, src = os.path.realpath(output_dir), os.path.realpath(tag_dir)
    if out == src or out.startswith(src + os.sep):
        raise UserError(f"--output_dir {output_dir} must not be inside the checkpoint {tag_dir}")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} is a file, not a folder")
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):  # stale shards of an earlier export would mix in
        if name.startswith(("model", "adapter_model")) and (".safetensors" in name or name.endswith(".bin")):
            os.remove(os.path.join(output_dir, name))


def export_checkpoint(
    checkpoint_dir: str,
    output_dir: str,
    *,
    base_model: str | None = None,
    merge_lora: bool = False,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    model_kind: str | None = None,
    verify: bool = False,
    log: Callable[[str], None] = print,
    trust_checkpoint: bool = False,
) -> ExportResult:
    """DeepSpeed checkpoint (tag dir, or output dir with ``latest``) -> Hugging Face folder.

    Full models -> model*.safetensors + config; LoRA -> a PEFT adapter (or, with ``merge_lora``,
    full merged weights); reward/value models keep their score head. Weights are produced one
    output shard at a time. The tokenizer (with chat template) and generation config come from
    the checkpoint's hf_meta, or from ``base_model`` for checkpoints without one. The DeepSpeed
    files are unpickled through an allow-list unless ``trust_checkpoint`` (see safe_load).
    """
    out_dtype_name = canonical_dtype(dtype) if dtype is not None else None
    tag_dir = resolve_tag_dir(checkpoint_dir)
    meta_dir = os.path.join(tag_dir, META_DIR)
    peft_config = None
    if os.path.isdir(meta_dir):
        meta = read_hf_meta(tag_dir)
        config = load_config(meta_dir)
        if meta.get("use_peft"):
            from peft import PeftConfig

            peft_config = PeftConfig.from_pretrained(meta_dir)
        base_model = base_model or meta.get("base_model")
    else:
        if base_model is None:
            raise CheckpointError(f"{tag_dir} has no {META_DIR}/ (not written by medgpt-ds): pass --base_model "
                                  "to take the config and tokenizer from the model the run started from")
        config = load_config(base_model)
        if (model_kind or "causal_lm") != "causal_lm":  # a reward / value head on the base model's config
            config.num_labels = 1
            config.architectures = None
        meta = {"format_version": META_VERSION, "model_kind": model_kind or "causal_lm", "use_peft": False,
                "base_model": base_model, "torch_dtype": canonical_dtype(getattr(config, "dtype", None) or "fp32")}
    kind_of_model = model_kind or meta["model_kind"]
    if kind_of_model not in MODEL_KINDS:
        raise UserError(f"model_kind must be one of {MODEL_KINDS}, got {kind_of_model!r}")
    out_dtype_name = out_dtype_name or meta.get("torch_dtype") or "float32"
    out_dtype = getattr(torch, out_dtype_name)
    if merge_lora and peft_config is None:
        raise CheckpointError(f"--merge_lora: {tag_dir} is a full-model checkpoint (no LoRA adapter in it)")

    base_vocab = meta.get("base_vocab_size")
    if peft_config is not None and base_model and os.path.isfile(os.path.join(base_model, "config.json")):
        base_config = load_config(base_model)
        check_same_base(config, base_config, base_model)
        base_vocab = base_config.get_text_config().vocab_size
    vocab = config.get_text_config().vocab_size
    # A vocabulary grown in training (extended tokenizer) is not in the base: the adapter carries it.
    save_embedding_layers = peft_config is not None and not merge_lora and base_vocab not in (None, vocab)
    if save_embedding_layers:
        log(f"vocabulary resized ({base_vocab} -> {vocab}): the adapter carries the embeddings; resize the "
            "base model's embeddings before PeftModel.from_pretrained")

    ckpt = ZeroCheckpoint(tag_dir, trust=trust_checkpoint)
    if kind_of_model == "value" and not os.path.isdir(meta_dir):
        # the PPO critic as ppo.py builds it: one label, no dropout, a score bias only if it has one
        config.classifier_dropout = 0.0
        config.token_classification_bias = any(n.endswith("score.bias") for n in ckpt.names)
    adapter_name = meta.get("adapter_name") or "default"
    model = build_model(config, kind_of_model, peft_config, adapter_name)
    if peft_config is None:
        kind, entries, weights_name = "full", plan_full(ckpt, model), "model"
    elif merge_lora:
        kind, entries, weights_name = "merged", plan_merged(ckpt, model, adapter_name), "model"
    else:
        kind, weights_name = "adapter", "adapter_model"
        entries = plan_adapter(ckpt, model, adapter_name, save_embedding_layers)
    if kind != "adapter":  # the names and per-expert tensors save_pretrained writes (and vLLM reads)
        entries = to_hub_layout(entries, model if peft_config is None else build_model(config, kind_of_model))
    log(f"{tag_dir}: ZeRO-{ckpt.stage}, world size {ckpt.world_size}, {kind_of_model}"
        f"{' + LoRA' if peft_config is not None else ''} -> {kind} export, {len(entries)} tensors, {out_dtype_name}")

    prepare_output_dir(output_dir, tag_dir)
    # PEFT reads one adapter_model.safetensors: adapters are never sharded.
    shard_limit = 2**62 if kind == "adapter" else max_shard_size
    files = write_safetensors(ckpt, entries, output_dir, out_dtype, shard_limit, weights_name)

    # Side files: tokenizer (+ chat template), config, generation config, adapter config, meta.
    if os.path.isdir(meta_dir):
        for name in os.listdir(meta_dir):
            if name not in _SIDE_FILES:
                shutil.copy2(os.path.join(meta_dir, name), os.path.join(output_dir, name))
    elif base_model is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base_model).save_pretrained(output_dir)
    if kind == "adapter":
        cfg = copy.deepcopy(peft_config)
        cfg.base_model_name_or_path = base_model
        cfg.inference_mode = True
        cfg.save_pretrained(output_dir)
    else:
        config = copy.deepcopy(config)
        config.architectures = [type(model.get_base_model() if peft_config is not None else model).__name__]
        config.dtype = out_dtype_name
        config.save_pretrained(output_dir)
        if kind_of_model == "causal_lm":
            gen_src = meta_dir if os.path.isdir(meta_dir) else base_model
            write_generation_config(gen_src, config, output_dir)
    out_meta = dict(meta, export={"kind": kind, "dtype": out_dtype_name, "source": os.path.abspath(tag_dir),
                                  "zero_stage": ckpt.stage, "world_size": ckpt.world_size,
                                  "global_steps": ckpt.global_steps})
    out_meta["base_model"] = base_model
    with open(os.path.join(output_dir, META_FILE), "w", encoding="utf-8") as f:
        json.dump(out_meta, f, indent=2, ensure_ascii=False)
        f.write("\n")

    result = ExportResult(output_dir, kind, files, len(entries), sum(e.shape.numel() for e in entries),
                          out_dtype_name)
    if verify:
        result.verify = verify_export(output_dir, tag_dir, base_model=base_model, log=log,
                                      trust_checkpoint=trust_checkpoint)
        if not result.verify["ok"]:
            raise CheckpointError(f"--verify failed: {result.verify}")
    return result
