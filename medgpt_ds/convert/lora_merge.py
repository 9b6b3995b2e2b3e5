"""Base model folder + PEFT adapter folder -> merged model (tools/merge_lora.py), one layer at a time."""
from __future__ import annotations

import copy
import json
import os
import re
import warnings
from typing import Any, Callable

import torch

from medgpt_ds.convert.export import ExportResult, prepare_output_dir, write_generation_config
from medgpt_ds.convert.layout import HubReader, to_hub_layout
from medgpt_ds.convert.hf_meta import META_FILE, META_VERSION, canonical_dtype
from medgpt_ds.convert.plans import build_model, load_config, plan_merged, tied_duplicates
from medgpt_ds.convert.verify import verify_merge
from medgpt_ds.convert.writer import ST_DTYPES, write_safetensors
from medgpt_ds.convert.zero import TensorSource
from medgpt_ds.errors import CheckpointError, PathNotFound

_ST_TORCH = {v: k for k, v in ST_DTYPES.items()}


class _SafeFiles:
    """safe_open handles, opened on first use (the same role as OpenFiles for DeepSpeed files)."""

    def __init__(self):
        self.touched = 0
        self._handles: dict[str, Any] = {}

    def get(self, path: str, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path].get_tensor(key)

    def close(self) -> None:
        self._handles.clear()
        self.__dict__.pop("_merged", None)


def _safetensors_index(folder: str, stem: str) -> dict[str, str]:
    """key -> file for ``stem``.safetensors or its sharded form (with index) in ``folder``."""
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(folder, f"{stem}.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    return {}


class LoraFolders:
    """A base model folder (safetensors, in the hub layout: see ``layout``) and a PEFT adapter folder,
    read lazily and addressed by the PeftModel's own state_dict keys, so the DeepSpeed-checkpoint plans
    (plan_merged) apply as is. ``base_model`` is the plain model (no LoRA) the base folder holds."""

    def __init__(self, base_dir: str, adapter_dir: str, peft_model: torch.nn.Module, adapter_name: str,
                 base_model: torch.nn.Module):
        from peft import get_peft_model_state_dict

        self.base_files = _safetensors_index(base_dir, "model")
        if not self.base_files:
            raise PathNotFound(f"{base_dir}: no model*.safetensors (convert .bin weights with "
                               "transformers' save_pretrained(safe_serialization=True) first)")
        adapter = _safetensors_index(adapter_dir, "adapter_model")
        if not adapter:
            raise PathNotFound(f"{adapter_dir}: no adapter_model.safetensors")
        shapes, dtypes = _headers(self.base_files)
        self.base = HubReader(shapes, dtypes, base_model)  # hub names -> the model's own
        self.loc: dict[str, tuple[str, str]] = {}  # key -> (adapter file, its key) | ("", base model key)
        self.sources: dict[str, TensorSource] = {}
        self.aliases: dict[str, str] = {}
        placeholders = {k: torch.empty(v.shape, device="meta") for k, v in peft_model.state_dict().items()}
        back = {id(t): k for k, t in placeholders.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved = get_peft_model_state_dict(peft_model, state_dict=placeholders, adapter_name=adapter_name,
                                              save_embedding_layers=False)
        owned = {back[id(t)]: k for k, t in saved.items()}  # model key -> adapter file key
        dups = tied_duplicates(peft_model)
        adapter_shapes, adapter_dtypes = _headers(adapter)
        for key in placeholders:
            if key in dups:
                continue
            if key in owned and owned[key] in adapter:
                self.loc[key] = (adapter[owned[key]], owned[key])
            elif key in adapter:  # e.g. resized embeddings saved whole in the adapter
                self.loc[key] = (adapter[key], key)
            else:  # a base weight: the name without peft's prefix and (nested) wrapper levels
                base_key = re.sub(r"\.(base_layer|original_module)(?=\.)", "", key.removeprefix("base_model.model."))
                if base_key in self.base:
                    self.loc[key] = ("", base_key)
                    self.sources[key] = TensorSource("hf", self.base.shapes[base_key], self.base.dtypes[base_key])
                continue
            _, k = self.loc[key]
            self.sources[key] = TensorSource("hf", adapter_shapes[k], adapter_dtypes[k])
        self.names = list(self.loc)
        self.trainable = {k for k in self.loc if k in owned}

    def shape(self, name: str) -> torch.Size:
        return self.sources[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.sources[name].dtype

    def open_files(self) -> _SafeFiles:
        return _SafeFiles()

    def tensor(self, name: str, files: _SafeFiles) -> torch.Tensor:
        path, key = self.loc[name]
        files.touched += self.sources[name].shape.numel() * self.sources[name].dtype.itemsize
        if path:
            return files.get(path, key)
        return self.base.tensor(key, lambda k: files.get(self.base_files[k], k))


def _headers(index: dict[str, str]) -> tuple[dict[str, torch.Size], dict[str, torch.dtype]]:
    """Shapes and dtypes of every tensor of a safetensors index, from the file headers only."""
    from safetensors import safe_open

    shapes, dtypes = {}, {}
    for path in sorted(set(index.values())):
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                shapes[k], dtypes[k] = torch.Size(sl.get_shape()), _ST_TORCH[sl.get_dtype()]
    return shapes, dtypes


def check_adapter_fits_base(adapter_dir: str, base_model: torch.nn.Module, base_name: str) -> None:
    """One clear error when the adapter's LoRA matrices do not fit the base model's layers."""
    from safetensors import safe_open

    problems = []
    for key, path in _safetensors_index(adapter_dir, "adapter_model").items():
        m = re.match(r"^base_model\.model\.(.+)\.lora_(A|B|embedding_A|embedding_B)(?:\.weight)?$", key)
        if not m:
            continue
        # peft nests one wrapper per adapted stacked weight: experts.base_layer.lora_A adapts experts
        module_name, which = re.sub(r"\.base_layer(?=\.|$)", "", m.group(1)), m.group(2)
        try:
            module = base_model.get_submodule(module_name)
        except AttributeError:
            problems.append(f"{module_name}: no such module in the base")
            continue
        with safe_open(path, framework="pt") as f:
            shape = f.get_slice(key).get_shape()
        w = getattr(module, "weight", None)
        if w is None:
            continue
        out_f, in_f = w.shape[0], w.shape[1]
        if isinstance(module, torch.nn.Embedding):
            out_f, in_f = in_f, out_f
        if which == "A" and shape[1] != in_f:
            problems.append(f"{module_name}: lora_A expects {shape[1]} inputs, the base layer has {in_f}")
        if which == "B" and shape[0] != out_f:
            problems.append(f"{module_name}: lora_B gives {shape[0]} outputs, the base layer has {out_f}")
        if len(problems) >= 3:
            break
    if problems:
        raise CheckpointError(f"the adapter {adapter_dir} was trained on a different base model than {base_name}: "
                              + "; ".join(problems))


def _adapter_kind(adapter_dir: str, peft_config: Any) -> str:
    meta_path = os.path.join(adapter_dir, META_FILE)
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            return json.load(f).get("model_kind", "causal_lm")
    task = str(getattr(peft_config, "task_type", ""))
    return "reward" if task.endswith("SEQ_CLS") else "value" if task.endswith("TOKEN_CLS") else "causal_lm"


def merge_lora_folders(
    base_model: str,
    adapter_dir: str,
    output_dir: str,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    model_kind: str | None = None,
    verify: bool = False,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Base model folder + LoRA adapter folder -> merged model folder, one layer at a time.

    Reward/value adapters (task SEQ_CLS) give a sequence-classification model with the trained
    score head (PEFT's modules_to_save). The tokenizer (with chat template) comes from the adapter
    folder when it has one, else from the base; the generation config from the base.
    """
    from peft import PeftConfig
    from transformers import AutoTokenizer

    out_dtype_name = canonical_dtype(dtype) if dtype is not None else None
    for path, what in ((base_model, "base model"), (adapter_dir, "adapter")):
        if not os.path.isdir(path):
            raise PathNotFound(f"{what} folder not found: {path}")
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise PathNotFound(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    peft_config = PeftConfig.from_pretrained(adapter_dir)
    kind_of_model = model_kind or _adapter_kind(adapter_dir, peft_config)
    config = load_config(base_model)
    out_dtype_name = out_dtype_name or canonical_dtype(getattr(config, "dtype", None) or "float32")
    tok_dir = adapter_dir if any(os.path.isfile(os.path.join(adapter_dir, n))
                                 for n in ("tokenizer.json", "tokenizer_config.json")) else base_model
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if kind_of_model != "causal_lm":
        config.num_labels = 1
        config.architectures = None  # the base's *ForCausalLM is not what we build
        if config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id
    # A vocabulary resized in training travels in the adapter as whole embedding matrices.
    for key, path in _safetensors_index(adapter_dir, "adapter_model").items():
        if key.endswith("embed_tokens.weight") and "lora_" not in key:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                rows = f.get_slice(key).get_shape()[0]
            if rows != config.get_text_config().vocab_size:
                log(f"adapter carries resized embeddings: vocab {config.get_text_config().vocab_size} -> {rows}")
                config.get_text_config().vocab_size = rows
    plain = build_model(config, kind_of_model)
    check_adapter_fits_base(adapter_dir, plain, base_model)
    peft_model = build_model(config, kind_of_model, peft_config)
    source = LoraFolders(base_model, adapter_dir, peft_model, "default", plain)
    entries = to_hub_layout(plan_merged(source, peft_model, "default"), plain)
    log(f"{base_model} + {adapter_dir} ({kind_of_model}) -> merged, {len(entries)} tensors, {out_dtype_name}")

    os.makedirs(output_dir, exist_ok=True)
    prepare_output_dir(output_dir, adapter_dir)
    files = write_safetensors(source, entries, output_dir, getattr(torch, out_dtype_name), max_shard_size)
    merged_config = copy.deepcopy(config)
    merged_config.architectures = [type(peft_model.get_base_model()).__name__]
    merged_config.dtype = out_dtype_name
    merged_config.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    if kind_of_model == "causal_lm":
        write_generation_config(base_model, config, output_dir)
    with open(os.path.join(output_dir, META_FILE), "w", encoding="utf-8") as f:
        json.dump({"format_version": META_VERSION, "model_kind": kind_of_model, "use_peft": False,
                   "base_model": base_model, "torch_dtype": out_dtype_name,
                   "export": {"kind": "merged", "dtype": out_dtype_name, "adapter": os.path.abspath(adapter_dir)}},
                  f, indent=2, ensure_ascii=False)
        f.write("\n")
    result = ExportResult(output_dir, "merged", files, len(entries), sum(e.shape.numel() for e in entries),
                          out_dtype_name)
    if verify:
        result.verify = verify_merge(output_dir, base_model, adapter_dir, kind_of_model, log=log)
        if not result.verify["ok"]:
            raise CheckpointError(f"--verify failed: {result.verify}")
    return result
