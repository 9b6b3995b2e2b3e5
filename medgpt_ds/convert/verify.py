"""--verify: load an export with transformers (and PEFT) and compare its logits with an independent
reference (DeepSpeed's own zero_to_fp32 reader, or PEFT's unmerged adapter)."""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Callable

import torch

from medgpt_ds.convert.hf_meta import META_DIR, META_FILE
from medgpt_ds.convert.plans import build_model, load_config, model_class, tied_duplicates
from medgpt_ds.convert.safe_load import load_pickle
from medgpt_ds.convert.zero import ZeroCheckpoint, resolve_tag_dir
from medgpt_ds.errors import CheckpointError

DEFAULT_PROMPTS = ("What are the common symptoms of influenza?",
                   "高血压患者在饮食上需要注意什么？",
                   "Explain the difference between a virus and a bacterium.")
_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}  # relative to max |logit|


def reference_state_dict(tag_dir: str, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's weights through DeepSpeed's own zero_to_fp32 (an independent reader).

    Whole model in memory: for verification only. ZeRO-0 checkpoints hold plain module weights.
    ZeroCheckpoint vets every file DeepSpeed's reader unpickles (unless ``trust``).
    """
    ckpt = ZeroCheckpoint(tag_dir, trust=trust)
    if ckpt.stage == 0:
        sd = load_pickle(ckpt.model_files[0], trust=trust)["module"]
        return {k: v.clone() for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    parent, tag = os.path.split(os.path.normpath(ckpt.tag_dir))
    with contextlib.redirect_stdout(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag)


def _probe_inputs(tokenizer: Any, prompts: tuple[str, ...]) -> list[torch.Tensor]:
    out = []
    for p in prompts:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True)
        else:
            text = p
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out.append(ids)
    return out


@torch.no_grad()
def verify_export(output_dir: str, tag_dir: str, *, base_model: str | None = None,
                  prompts: tuple[str, ...] = DEFAULT_PROMPTS, log: Callable[[str], None] = print,
                  trust_checkpoint: bool = False) -> dict:
    """Load the export with transformers (and PEFT) and compare its logits with a model built from
    the checkpoint's config holding the checkpoint's weights (read by DeepSpeed's zero_to_fp32)."""
    from transformers import AutoTokenizer

    tag_dir = resolve_tag_dir(tag_dir)
    meta_dir = os.path.join(tag_dir, META_DIR)
    with open(os.path.join(output_dir, META_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    export = meta["export"]
    kind_of_model = meta["model_kind"]
    config = load_config(meta_dir if os.path.isdir(meta_dir) else output_dir)
    peft_config = None
    if meta.get("use_peft"):
        from peft import PeftConfig

        peft_config = PeftConfig.from_pretrained(meta_dir)
    adapter_name = meta.get("adapter_name") or "default"

    ref = build_model(config, kind_of_model, peft_config, adapter_name, device="cpu").float()
    sd = reference_state_dict(tag_dir, trust=trust_checkpoint)
    result = ref.load_state_dict(sd, strict=False)
    dups = tied_duplicates(ref)
    missing = [k for k in result.missing_keys if k not in dups]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"reference load failed: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    del sd
    if export["kind"] == "full":  # the export holds the weights rounded to its dtype: compare like with like
        for p in ref.parameters():
            p.data = p.data.to(getattr(torch, export["dtype"])).float()
    ref.eval()

    cls = model_class((config.architectures or [None])[0], kind_of_model, config)
    if export["kind"] == "adapter":
        from medgpt_ds.model import load_adapter

        if not base_model:
            raise CheckpointError("--verify of an adapter export needs the base model (--base_model)")
        base = cls.from_pretrained(base_model, dtype=torch.float32)
        vocab = config.get_text_config().vocab_size
        if base.get_input_embeddings().weight.shape[0] != vocab:
            base.resize_token_embeddings(vocab)
        got = load_adapter(base, output_dir, adapter_name=adapter_name)
    else:  # with its own config: our value head's class would read it as its base class's config type
        got = cls.from_pretrained(output_dir, config=load_config(output_dir), dtype=torch.float32)
    got.eval()

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    diffs, agree, scale = [], 0, 1.0
    inputs = _probe_inputs(tokenizer, prompts)
    for ids in inputs:
        kw = {"use_cache": False} if kind_of_model == "causal_lm" else {}
        a = ref(input_ids=ids, **kw).logits.float()
        b = got(input_ids=ids, **kw).logits.float()
        diffs.append((a - b).abs().max().item())
        scale = max(scale, a.abs().max().item())
        agree += int(torch.equal(a.argmax(-1), b.argmax(-1)))
    tol = _TOLERANCE[export["dtype"]] * scale
    report = {"ok": max(diffs) <= tol, "max_abs_diff": max(diffs), "tolerance": tol,
              "argmax_agree": f"{agree}/{len(inputs)}", "prompts": len(inputs), "kind": export["kind"]}
    log(f"verify: max |logits diff| {report['max_abs_diff']:.3g} (tolerance {tol:.3g}), "
        f"argmax agree on {report['argmax_agree']} prompts -> {'OK' if report['ok'] else 'FAILED'}")
    return report


@torch.no_grad()
def verify_merge(output_dir: str, base_model: str, adapter_dir: str, model_kind: str,
                 prompts: tuple[str, ...] = DEFAULT_PROMPTS, log: Callable[[str], None] = print) -> dict:
    """Merged folder vs PeftModel.from_pretrained(base, adapter) (PEFT's own, unmerged), in fp32."""
    from transformers import AutoConfig, AutoTokenizer

    from medgpt_ds.model import load_adapter

    config = AutoConfig.from_pretrained(output_dir)
    cls = model_class((config.architectures or [None])[0], model_kind, config)
    got = cls.from_pretrained(output_dir, config=config, dtype=torch.float32).eval()
    base_config = AutoConfig.from_pretrained(base_model)
    if model_kind != "causal_lm":
        base_config.num_labels = 1
    base = cls.from_pretrained(base_model, config=base_config, dtype=torch.float32)
    vocab = got.get_input_embeddings().weight.shape[0]
    if base.get_input_embeddings().weight.shape[0] != vocab:
        base.resize_token_embeddings(vocab)
    if model_kind != "causal_lm":
        base.config.pad_token_id = got.config.pad_token_id
    ref = load_adapter(base, adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    diffs, scale = [], 1.0
    for ids in _probe_inputs(tokenizer, prompts):
        a, b = ref(input_ids=ids).logits.float(), got(input_ids=ids).logits.float()
        diffs.append((a - b).abs().max().item())
        scale = max(scale, a.abs().max().item())
    with open(os.path.join(output_dir, META_FILE), encoding="utf-8") as f:
        tol = _TOLERANCE[json.load(f)["torch_dtype"]] * scale
    report = {"ok": max(diffs) <= tol, "max_abs_diff": max(diffs), "tolerance": tol, "prompts": len(diffs)}
    log(f"verify: max |logits diff| {report['max_abs_diff']:.3g} (tolerance {tol:.3g}) -> "
        f"{'OK' if report['ok'] else 'FAILED'}")
    return report
