"""DeepSpeed checkpoints -> Hugging Face models.

The trainer writes, inside every DeepSpeed tag dir, an ``hf_meta/`` folder (``write_hf_meta``):
everything except the weights that a Hugging Face export needs (config, generation config,
tokenizer with chat template, adapter config, and ``medgpt_meta.json``). The weights stay in
DeepSpeed's own files, so DeepSpeed's ``zero_to_fp32.py`` keeps working on our checkpoints.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import re
import shutil
import struct
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from medgpt_ds.errors import UserError

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
    """'bf16' / 'torch.bfloat16' / torch.bfloat16 -> 'bfloat16'; anything else is a ValueError."""
    key = str(name).removeprefix("torch.").lower()
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}: use one of bf16, fp16, fp32")
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
        raise ValueError(f"model_kind must be one of {MODEL_KINDS}, got {model_kind!r}")
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
        raise FileNotFoundError(
            f"{tag_dir} has no {META_DIR}/{META_FILE}: it was not written by medgpt-ds "
            "(pass --base_model to take config and tokenizer from a base model instead)"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Reading DeepSpeed checkpoints lazily
# ---------------------------------------------------------------------------------------------

_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL3_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")


class CheckpointError(UserError):
    """A checkpoint (or its combination with other inputs) that cannot be converted."""


def resolve_tag_dir(path: str) -> str:
    """``output_dir/checkpoint-N`` -> itself; ``output_dir`` -> the tag named in ``output_dir/latest``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint dir not found: {path}")
    names = os.listdir(path)
    if any(n.endswith("_model_states.pt") for n in names):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
        tag_dir = os.path.join(path, tag)
        if not os.path.isdir(tag_dir):
            raise FileNotFoundError(f"{latest} names tag {tag!r} but {tag_dir} does not exist")
        return resolve_tag_dir(tag_dir)
    tags = sorted(n for n in names if os.path.isdir(os.path.join(path, n)) and n.startswith("checkpoint-"))
    hint = f" (it holds {', '.join(tags)}: pass one of them)" if tags else ""
    raise FileNotFoundError(
        f"{path} is not a DeepSpeed checkpoint: no *_model_states.pt and no 'latest' file{hint}")


@dataclass
class _Source:
    """Where one full tensor lives in the checkpoint files."""

    kind: str  # "module" | "z12" | "z3" | "frozen3"
    shape: torch.Size
    dtype: torch.dtype
    group: int = 0
    offset: int = 0
    partitioned_numel: int = 0


class _OpenFiles:
    """The checkpoint's files, memory-mapped on first use; dropping the object unmaps them.

    Pages of a memory-mapped file that were read stay resident (and count in RSS) for as long as
    the mapping exists, so writers re-open the files every few hundred MB read.
    """

    def __init__(self, ckpt: "ZeroCheckpoint"):
        self.ckpt = ckpt
        self.touched = 0  # bytes read through the mappings since opening
        self._cache: dict[str, Any] = {}

    def load(self, path: str) -> Any:
        if path not in self._cache:
            self._cache[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        return self._cache[path]

    def model(self, rank: int = 0) -> dict:
        return self.load(self.ckpt.model_files[rank])

    def optim_groups(self, rank: int) -> list[torch.Tensor]:
        osd = self.load(self.ckpt.optim_files[rank])["optimizer_state_dict"]
        return osd["fp32_flat_groups" if self.ckpt.stage == 3 else "single_partition_of_fp32_groups"]

    def close(self) -> None:
        self._cache.clear()
        self.__dict__.pop("_merged", None)


class ZeroCheckpoint:
    """Index of one DeepSpeed tag dir (ZeRO 0/1/2/3, any data-parallel world size).

    Builds, from the metadata only, where every parameter and buffer lives, so single tensors
    can be materialized on demand: ``with ckpt.open() as files: ckpt.tensor(name, files)``.
    Trainable parameters come from the fp32 master partitions in the optimizer files; frozen
    parameters (e.g. a LoRA base) and buffers from the model-state files.
    """

    def __init__(self, tag_dir: str):
        self.tag_dir = tag_dir = resolve_tag_dir(tag_dir)
        names = os.listdir(tag_dir)
        optim = {}
        for n in names:
            m = _OPTIM_RE.match(n)
            if m:
                if m.group(2) != "00":
                    raise CheckpointError(f"{tag_dir}: tensor/model-parallel checkpoints (mp_rank {m.group(2)}) "
                                          "are not supported; convert them with ds_to_universal first")
                optim[int(m.group(1))] = os.path.join(tag_dir, n)
        model3 = {int(m.group(1)): os.path.join(tag_dir, n) for n in names if (m := _MODEL3_RE.match(n))}
        self.optim_files = [optim[r] for r in sorted(optim)]
        if model3:
            self.model_files = [model3[r] for r in sorted(model3)]
        elif "mp_rank_00_model_states.pt" in names:
            self.model_files = [os.path.join(tag_dir, "mp_rank_00_model_states.pt")]
        else:
            raise FileNotFoundError(f"{tag_dir}: no *_model_states.pt file")

        if not self.optim_files and os.path.isdir(os.path.join(tag_dir, "zero")):
            raise CheckpointError(f"{tag_dir} is a DeepSpeed universal checkpoint (made for resuming at another "
                                  "topology): export the tag dir it was converted from")
        files = _OpenFiles(self)
        ms0 = files.model(0)
        if not self.optim_files and ms0.get("param_shapes") is not None:
            raise CheckpointError(f"{tag_dir}: no *_optim_states.pt files, where a ZeRO checkpoint keeps its fp32 "
                                  "weights (incomplete copy or save?)")
        self.stage = 0
        self.world_size = int(ms0.get("dp_world_size") or 1)
        osd = None
        if self.optim_files and ms0.get("param_shapes") is not None:
            osd = files.load(self.optim_files[0])["optimizer_state_dict"]
            if "zero_stage" in osd:
                self.stage = int(osd["zero_stage"])
                pc = osd["partition_count"]
                self.world_size = max(pc) if isinstance(pc, list) else int(pc)
        if self.stage and len(self.optim_files) != self.world_size:
            raise CheckpointError(f"{tag_dir}: ZeRO-{self.stage} checkpoint of world size {self.world_size} "
                                  f"but {len(self.optim_files)} *_optim_states.pt files (incomplete save?)")
        if self.stage == 3 and len(self.model_files) != self.world_size:
            raise CheckpointError(f"{tag_dir}: expected {self.world_size} ZeRO-3 model-state files, "
                                  f"found {len(self.model_files)}")
        self.ds_version = ms0.get("ds_version")
        self.global_steps = ms0.get("global_steps")
        module = ms0["module"] or {}
        self.aliases: dict[str, str] = dict(ms0.get("shared_params") or {})
        self.buffer_names = list(ms0.get("buffer_names") or [])
        self.sources: dict[str, _Source] = {}
        self.trainable: set[str] = set()
        fp32 = torch.float32

        if self.stage in (1, 2):
            paddings = osd.get("param_alignment_paddings")
            for g, shapes in enumerate(ms0["param_shapes"]):
                offset = 0
                for i, (name, shape) in enumerate(shapes.items()):
                    shape = torch.Size(shape)
                    self.sources[name] = _Source("z12", shape, fp32, group=g, offset=offset)
                    offset += shape.numel() + (paddings[g][i] if paddings is not None else 0)
            self._partition_numel = [t.numel() for t in osd["single_partition_of_fp32_groups"]]
            self.trainable = set(self.sources)
        elif self.stage == 3:
            offset = 0
            for shapes in ms0["param_shapes"]:
                for name, shape in shapes.items():
                    shape = torch.Size(shape)
                    pn = math.ceil(shape.numel() / self.world_size)
                    self.sources[name] = _Source("z3", shape, fp32, offset=offset, partitioned_numel=pn)
                    offset += pn
            self._group_offsets = [0]
            for t in osd["fp32_flat_groups"]:
                self._group_offsets.append(self._group_offsets[-1] + t.numel())
            if offset != self._group_offsets[-1]:
                raise CheckpointError(f"{tag_dir}: ZeRO-3 partitions hold {self._group_offsets[-1]} elements, "
                                      f"the parameter shapes need {offset}")
            self.trainable = set(self.sources)
            for name, shape in (ms0.get("frozen_param_shapes") or {}).items():
                frag = ms0["frozen_param_fragments"][name]
                self.sources[name] = _Source("frozen3", torch.Size(shape), frag.dtype)
        # Everything else (frozen params at ZeRO<=2, all params at ZeRO-0, buffers) is in "module".
        for name, t in module.items():
            if name in self.sources or name in self.aliases:
                continue
            if self.stage == 3 and name not in self.buffer_names:
                continue
            self.sources[name] = _Source("module", t.shape, t.dtype)
        missing_alias = [a for a, src in self.aliases.items() if src not in self.sources]
        if missing_alias:
            raise CheckpointError(f"{tag_dir}: shared parameters {missing_alias} point at missing tensors")
        # Keep the model's own state_dict order (nice shards, readable indexes).
        order = {n: i for i, n in enumerate(module)}
        self.names = sorted(self.sources, key=lambda n: order.get(n, len(order)))
        files.close()

    def open_files(self) -> _OpenFiles:
        return _OpenFiles(self)

    @contextlib.contextmanager
    def open(self):
        files = self.open_files()
        try:
            yield files
        finally:
            files.close()

    def shape(self, name: str) -> torch.Size:
        return self.sources[self.aliases.get(name, name)].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.sources[self.aliases.get(name, name)].dtype

    def tensor(self, name: str, files: _OpenFiles) -> torch.Tensor:
        """Materialize one full tensor (a fresh copy, independent of the mapped files)."""
        name = self.aliases.get(name, name)
        src = self.sources[name]
        numel = src.shape.numel()
        files.touched += numel * src.dtype.itemsize
        if src.kind == "module":
            return files.model(0)["module"][name].clone()
        pieces = []
        if src.kind == "frozen3":
            pieces = [files.model(r)["frozen_param_fragments"][name].reshape(-1) for r in range(self.world_size)]
        elif src.kind == "z12":
            # The group's flat vector is the concatenation of the ranks' equal-sized partitions.
            size = self._partition_numel[src.group]
            pos, end = src.offset, src.offset + numel
            while pos < end:
                rank, local = divmod(pos, size)
                take = min(end - pos, size - local)
                pieces.append(files.optim_groups(rank)[src.group][local:local + take])
                pos += take
        else:
            # z3: each rank holds `partitioned_numel` elements at `offset` of its (sub-group
            # concatenated) flat fp32 buffer; the last rank's tail is padding.
            for rank in range(self.world_size):
                groups = files.optim_groups(rank)
                pos, end = src.offset, src.offset + src.partitioned_numel
                for g in range(len(groups)):
                    lo, hi = self._group_offsets[g], self._group_offsets[g + 1]
                    if pos < hi and end > lo:
                        pieces.append(groups[g][max(pos, lo) - lo:min(end, hi) - lo])
        if not pieces:
            return torch.empty(src.shape, dtype=src.dtype)
        return torch.cat(pieces)[:numel].view(src.shape)  # cat copies out of the mapped files


# ---------------------------------------------------------------------------------------------
# Export plans: output key -> how to compute it from the checkpoint
# ---------------------------------------------------------------------------------------------

Producer = Callable[[_OpenFiles], torch.Tensor]


@dataclass
class _Entry:
    key: str
    shape: torch.Size
    dtype: torch.dtype  # source dtype (floating tensors are cast to the export dtype)
    produce: Producer


def _model_class(arch: str | None, model_kind: str):
    import transformers

    if arch and hasattr(transformers, arch):
        return getattr(transformers, arch)
    # reward: one score per sequence; value (PPO critic): one value per token.
    return {"causal_lm": transformers.AutoModelForCausalLM,
            "reward": transformers.AutoModelForSequenceClassification,
            "value": transformers.AutoModelForTokenClassification}[model_kind]


def build_model(config: Any, model_kind: str, peft_config: Any = None, adapter_name: str = "default",
                device: str = "meta") -> torch.nn.Module:
    """The model the checkpoint was saved from, built from its config (on ``device``, no weights)."""
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = _model_class(arch, model_kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device(device):
            model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
            if peft_config is not None:
                from peft import get_peft_model

                peft_config = copy.deepcopy(peft_config)
                model = get_peft_model(model, peft_config, adapter_name=adapter_name)
    return model


def _tied_duplicates(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are the same tensor as an earlier one (tied embeddings)."""
    seen: dict[int, str] = {}
    dups = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            dups.add(name)
        else:
            seen[id(p)] = name
    return dups


def _expected_keys(model: torch.nn.Module) -> dict[str, torch.Size]:
    dups = _tied_duplicates(model)
    return {k: v.shape for k, v in model.state_dict().items() if k not in dups}


def _source_entry(ckpt: ZeroCheckpoint, out_key: str, src: str) -> _Entry:
    return _Entry(out_key, ckpt.shape(src), ckpt.dtype(src), lambda files, s=src: ckpt.tensor(s, files))


def _check_against(expected: dict[str, torch.Size], entries: list[_Entry], what: str) -> None:
    got = {e.key: e.shape for e in entries}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k]))
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: checkpoint {tuple(got[k])} vs config {tuple(expected[k])}" for k in wrong[:3]))
        raise CheckpointError(f"the checkpoint does not match {what}: " + "; ".join(parts))


def plan_full(ckpt: ZeroCheckpoint, model: torch.nn.Module) -> list[_Entry]:
    """Full model: checkpoint names are already the model's state_dict keys."""
    expected = _expected_keys(model)
    entries = [_source_entry(ckpt, k, k) for k in expected if k in ckpt.sources or k in ckpt.aliases]
    entries += [_source_entry(ckpt, k, k) for k in ckpt.names if k not in expected]
    _check_against(expected, entries, f"the model config ({type(model).__name__})")
    return entries


def plan_adapter(ckpt: ZeroCheckpoint, peft_model: torch.nn.Module, adapter_name: str,
                 save_embedding_layers: bool) -> list[_Entry]:
    """LoRA adapter in PEFT's on-disk naming (what PeftModel.from_pretrained reads)."""
    from peft import get_peft_model_state_dict

    placeholders = {n: torch.empty(ckpt.shape(n), device="meta") for n in list(ckpt.names) + list(ckpt.aliases)}
    back = {id(t): n for n, t in placeholders.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter_sd = get_peft_model_state_dict(peft_model, state_dict=placeholders, adapter_name=adapter_name,
                                               save_embedding_layers=save_embedding_layers)
    if not adapter_sd:
        raise CheckpointError(f"{ckpt.tag_dir}: no adapter weights found for adapter {adapter_name!r}")
    # The adapter's own tensors must all be in the checkpoint (else it was saved from another model).
    wanted = {n for n, p in peft_model.named_parameters() if f".{adapter_name}" in n and n not in ckpt.sources}
    if wanted:
        raise CheckpointError(f"the checkpoint does not match the adapter config: missing {sorted(wanted)[:5]}")
    return [_source_entry(ckpt, k, back[id(t)]) for k, t in adapter_sd.items()]


def plan_merged(ckpt: ZeroCheckpoint, peft_model: torch.nn.Module, adapter_name: str) -> list[_Entry]:
    """LoRA merged into the base weights, one LoRA layer at a time with PEFT's own ``merge``."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    prefix = "base_model.model."
    merged_meta = copy.deepcopy(peft_model).merge_and_unload()
    expected = _expected_keys(merged_meta)
    handled: dict[str, tuple[str, str]] = {}  # out key -> (kind, peft module name)
    for name, module in peft_model.named_modules():
        if not name.startswith(prefix):
            continue
        out_prefix = name[len(prefix):]
        if isinstance(module, BaseTunerLayer):
            for pname, _ in module.get_base_layer().named_parameters():
                handled[f"{out_prefix}.{pname}"] = ("lora", name)
        elif isinstance(module, AuxiliaryTrainingWrapper):
            inner = f"{name}.modules_to_save.{adapter_name}"
            for pname, _ in module.get_submodule(f"modules_to_save.{adapter_name}").named_parameters():
                handled[f"{out_prefix}.{pname}"] = ("copy", f"{inner}.{pname}")

    entries = []
    for key, shape in expected.items():
        kind, src = handled.get(key, ("copy", prefix + key))
        if kind == "copy":
            if src not in ckpt.sources and src not in ckpt.aliases:
                continue  # reported by _check_against
            entries.append(_source_entry(ckpt, key, src))
        else:
            param = key[len(src) - len(prefix) + 1:]
            entries.append(_Entry(key, shape, torch.float32,
                                  lambda files, m=src, p=param: _merged_param(ckpt, peft_model, m, p,
                                                                              adapter_name, files)))
    _check_against(expected, entries, "the base model with the adapter merged")
    return entries


def _merged_param(ckpt: ZeroCheckpoint, peft_model: torch.nn.Module, module_name: str, param: str,
                  adapter_name: str, files: _OpenFiles) -> torch.Tensor:
    """Materialize one LoRA layer (base weight + A/B) in fp32, merge it with PEFT, return ``param``."""
    cache = files.__dict__.setdefault("_merged", {})
    if module_name not in cache:
        module = copy.deepcopy(peft_model.get_submodule(module_name))
        names = [n for n in module.state_dict()]
        sd = {n: ckpt.tensor(f"{module_name}.{n}", files).float() for n in names}
        module.load_state_dict(sd, assign=True, strict=True)
        module.merge(adapter_names=[adapter_name])
        cache.clear()  # one layer at a time
        cache[module_name] = dict(module.get_base_layer().named_parameters())
    return cache[module_name][param].detach()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _out_dtype(entry: _Entry, dtype: torch.dtype) -> torch.dtype:
    return dtype if entry.dtype.is_floating_point else entry.dtype


def _shard(entries: list[_Entry], dtype: torch.dtype, max_bytes: int) -> list[list[_Entry]]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        nbytes = e.shape.numel() * _out_dtype(e, dtype).itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    return shards


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}


def _write_one_safetensors(path: str, entries: list[_Entry], dtype: torch.dtype, ckpt: ZeroCheckpoint,
                           window_bytes: int) -> int:
    """Write one safetensors file tensor by tensor: the header (offsets known from the shapes)
    first, then each tensor's bytes as soon as it is produced. Peak memory is one tensor, not one
    shard. Returns the bytes of tensor data written."""
    header, offset = {}, 0
    for e in entries:
        dt = _out_dtype(e, dtype)
        nbytes = e.shape.numel() * dt.itemsize
        header[e.key] = {"dtype": _ST_DTYPES[dt], "shape": list(e.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    files = ckpt.open_files()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for e in entries:
            t = e.produce(files).to(_out_dtype(e, dtype)).contiguous()
            if t.shape != e.shape:
                raise CheckpointError(f"{e.key}: produced shape {tuple(t.shape)}, planned {tuple(e.shape)}")
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
            if files.touched > window_bytes:  # unmap what was read so far (see _OpenFiles)
                files.close()
                files = ckpt.open_files()
    files.close()
    return offset


def write_safetensors(ckpt: ZeroCheckpoint, entries: list[_Entry], output_dir: str, dtype: torch.dtype,
                      max_shard_size: int | str = "5GB", weights_name: str = "model",
                      window_bytes: int = 256 * 2**20) -> list[str]:
    """Write ``entries`` as safetensors shards of at most ``max_shard_size`` (+ index when more
    than one), in Hugging Face's file naming. Streams tensor by tensor; the checkpoint's memory-
    mapped files are re-opened every ``window_bytes`` read so their pages do not pile up."""
    from transformers.utils.hub import convert_file_size_to_int

    shards = _shard(entries, dtype, convert_file_size_to_int(max_shard_size))
    n = len(shards)
    files_written, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"{weights_name}.safetensors" if n == 1 else f"{weights_name}-{i:05d}-of-{n:05d}.safetensors"
        total += _write_one_safetensors(os.path.join(output_dir, fname), shard, dtype, ckpt, window_bytes)
        weight_map.update({e.key: fname for e in shard})
        files_written.append(fname)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(output_dir, f"{weights_name}.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
    return files_written


# ---------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------

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


def _load_config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def _prepare_output_dir(output_dir: str, tag_dir: str) -> None:
    out, src = os.path.realpath(output_dir), os.path.realpath(tag_dir)
    if out == src or out.startswith(src + os.sep):
        raise ValueError(f"--output_dir {output_dir} must not be inside the checkpoint {tag_dir}")
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
) -> ExportResult:
    """DeepSpeed checkpoint (tag dir, or output dir with ``latest``) -> Hugging Face folder.

    Full models -> model*.safetensors + config; LoRA -> a PEFT adapter (or, with ``merge_lora``,
    full merged weights); reward/value models keep their score head. Weights are produced one
    output shard at a time. The tokenizer (with chat template) and generation config come from
    the checkpoint's hf_meta, or from ``base_model`` for checkpoints without one.
    """
    out_dtype_name = canonical_dtype(dtype) if dtype is not None else None
    tag_dir = resolve_tag_dir(checkpoint_dir)
    meta_dir = os.path.join(tag_dir, META_DIR)
    peft_config = None
    if os.path.isdir(meta_dir):
        meta = read_hf_meta(tag_dir)
        config = _load_config(meta_dir)
        if meta.get("use_peft"):
            from peft import PeftConfig

            peft_config = PeftConfig.from_pretrained(meta_dir)
        base_model = base_model or meta.get("base_model")
    else:
        if base_model is None:
            raise CheckpointError(f"{tag_dir} has no {META_DIR}/ (not written by medgpt-ds): pass --base_model "
                                  "to take the config and tokenizer from the model the run started from")
        config = _load_config(base_model)
        meta = {"format_version": META_VERSION, "model_kind": model_kind or "causal_lm", "use_peft": False,
                "base_model": base_model, "torch_dtype": canonical_dtype(getattr(config, "dtype", None) or "fp32")}
    kind_of_model = model_kind or meta["model_kind"]
    if kind_of_model not in MODEL_KINDS:
        raise ValueError(f"model_kind must be one of {MODEL_KINDS}, got {kind_of_model!r}")
    out_dtype_name = out_dtype_name or meta.get("torch_dtype") or "float32"
    out_dtype = getattr(torch, out_dtype_name)
    if merge_lora and peft_config is None:
        raise CheckpointError(f"--merge_lora: {tag_dir} is a full-model checkpoint (no LoRA adapter in it)")

    base_vocab = meta.get("base_vocab_size")
    if peft_config is not None and base_model and os.path.isfile(os.path.join(base_model, "config.json")):
        base_config = _load_config(base_model)
        check_same_base(config, base_config, base_model)
        base_vocab = base_config.get_text_config().vocab_size
    vocab = config.get_text_config().vocab_size
    # A vocabulary grown in training (extended tokenizer) is not in the base: the adapter carries it.
    save_embedding_layers = peft_config is not None and not merge_lora and base_vocab not in (None, vocab)
    if save_embedding_layers:
        log(f"vocabulary resized ({base_vocab} -> {vocab}): the adapter carries the embeddings; resize the "
            "base model's embeddings before PeftModel.from_pretrained")

    ckpt = ZeroCheckpoint(tag_dir)
    adapter_name = meta.get("adapter_name") or "default"
    model = build_model(config, kind_of_model, peft_config, adapter_name)
    if peft_config is None:
        kind, entries, weights_name = "full", plan_full(ckpt, model), "model"
    elif merge_lora:
        kind, entries, weights_name = "merged", plan_merged(ckpt, model, adapter_name), "model"
    else:
        kind, weights_name = "adapter", "adapter_model"
        entries = plan_adapter(ckpt, model, adapter_name, save_embedding_layers)
    log(f"{tag_dir}: ZeRO-{ckpt.stage}, world size {ckpt.world_size}, {kind_of_model}"
        f"{' + LoRA' if peft_config is not None else ''} -> {kind} export, {len(entries)} tensors, {out_dtype_name}")

    _prepare_output_dir(output_dir, tag_dir)
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
        result.verify = verify_export(output_dir, tag_dir, base_model=base_model, log=log)
        if not result.verify["ok"]:
            raise CheckpointError(f"--verify failed: {result.verify}")
    return result


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------

DEFAULT_PROMPTS = ("What are the common symptoms of influenza?",
                   "高血压患者在饮食上需要注意什么？",
                   "Explain the difference between a virus and a bacterium.")
_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}  # relative to max |logit|


def reference_state_dict(tag_dir: str) -> dict[str, torch.Tensor]:
    """The checkpoint's weights through DeepSpeed's own zero_to_fp32 (an independent reader).

    Whole model in memory: for verification only. ZeRO-0 checkpoints hold plain module weights.
    """
    ckpt = ZeroCheckpoint(tag_dir)
    if ckpt.stage == 0:
        sd = torch.load(ckpt.model_files[0], map_location="cpu", weights_only=False)["module"]
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
                  prompts: tuple[str, ...] = DEFAULT_PROMPTS, log: Callable[[str], None] = print) -> dict:
    """Load the export with transformers (and PEFT) and compare its logits with a model built from
    the checkpoint's config holding the checkpoint's weights (read by DeepSpeed's zero_to_fp32)."""
    from transformers import AutoTokenizer

    tag_dir = resolve_tag_dir(tag_dir)
    meta_dir = os.path.join(tag_dir, META_DIR)
    with open(os.path.join(output_dir, META_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    export = meta["export"]
    kind_of_model = meta["model_kind"]
    config = _load_config(meta_dir if os.path.isdir(meta_dir) else output_dir)
    peft_config = None
    if meta.get("use_peft"):
        from peft import PeftConfig

        peft_config = PeftConfig.from_pretrained(meta_dir)
    adapter_name = meta.get("adapter_name") or "default"

    ref = build_model(config, kind_of_model, peft_config, adapter_name, device="cpu").float()
    sd = reference_state_dict(tag_dir)
    result = ref.load_state_dict(sd, strict=False)
    dups = _tied_duplicates(ref)
    missing = [k for k in result.missing_keys if k not in dups]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"reference load failed: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    del sd
    if export["kind"] == "full":  # the export holds the weights rounded to its dtype: compare like with like
        for p in ref.parameters():
            p.data = p.data.to(getattr(torch, export["dtype"])).float()
    ref.eval()

    cls = _model_class((config.architectures or [None])[0], kind_of_model)
    if export["kind"] == "adapter":
        from peft import PeftModel

        if not base_model:
            raise CheckpointError("--verify of an adapter export needs the base model (--base_model)")
        base = cls.from_pretrained(base_model, dtype=torch.float32)
        vocab = config.get_text_config().vocab_size
        if base.get_input_embeddings().weight.shape[0] != vocab:
            base.resize_token_embeddings(vocab)
        got = PeftModel.from_pretrained(base, output_dir, adapter_name=adapter_name)
    else:
        got = cls.from_pretrained(output_dir, dtype=torch.float32)
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


# ---------------------------------------------------------------------------------------------
# Changing topology: DeepSpeed universal checkpoints
# ---------------------------------------------------------------------------------------------

def to_universal(checkpoint_dir: str, output_dir: str | None = None, workers: int = 1,
                 log: Callable[[str], None] = print) -> str:
    """Convert a ZeRO-1/2/3 tag dir into a DeepSpeed *universal* checkpoint.

    Default output: ``<run_dir>/<tag>-universal`` beside the tag, with ``<run_dir>/latest_universal``
    naming it, so an engine whose config has ``"checkpoint": {"load_universal": true}`` resumes
    from ``<run_dir>`` at any world size and ZeRO stage (``engine.load_checkpoint(run_dir)``).
    The tag's other files (trainer state, RNG states, ``hf_meta/``) are copied along, so
    ``--resume_from_checkpoint <run_dir>/<tag>-universal --load_universal`` works. Returns the folder.
    """
    from deepspeed.checkpoint import ds_to_universal

    tag_dir = resolve_tag_dir(checkpoint_dir)
    ckpt = ZeroCheckpoint(tag_dir)
    if ckpt.stage == 0:
        raise CheckpointError(f"{tag_dir} is a ZeRO-0 checkpoint: its weights and optimizer state are not "
                              "partitioned, so it loads at any world size as it is (no conversion needed)")
    run_dir, tag = os.path.split(os.path.normpath(tag_dir))
    output_dir = output_dir or os.path.join(run_dir, f"{tag}-universal")
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    args = argparse.Namespace(input_folder=tag_dir, output_folder=output_dir, num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ds_to_universal.main(args)
    _unify_universal_optimizer_state(output_dir, ckpt)
    # A ZeRO-3 engine looks for zero_pp_rank_0_mp_rank_00_model_states.pt, a ZeRO-1/2 engine for
    # mp_rank_00_model_states.pt; with load_universal only their client/scheduler state is read (the
    # weights come from zero/), so either file serves both: provide both names (stage changes).
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    have = [n for n in names if os.path.isfile(os.path.join(output_dir, n))]
    for n in names:
        if have and n not in have:
            src, dst = os.path.join(output_dir, have[0]), os.path.join(output_dir, n)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
    # The trainer's own files (trainer_state.json, rng states, run config, hf_meta/) travel along,
    # so the universal folder is a complete checkpoint for --resume_from_checkpoint.
    for name in os.listdir(tag_dir):
        src, dst = os.path.join(tag_dir, name), os.path.join(output_dir, name)
        if name.endswith(("_model_states.pt", "_optim_states.pt")) or os.path.exists(dst):
            continue
        if os.path.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    log(f"universal checkpoint of {tag_dir} (ZeRO-{ckpt.stage}, world size {ckpt.world_size}) -> {output_dir}; "
        f"{os.path.join(os.path.dirname(output_dir), 'latest_universal')} names it")
    return output_dir


def _unify_universal_optimizer_state(universal_dir: str, ckpt: ZeroCheckpoint) -> None:
    """ds_to_universal writes zero/optimizer_state.pt in the layout of the *source* stage's loader.
    Give it what both loaders read so a ZeRO-1/2 checkpoint resumes under ZeRO-3 and back: the ZeRO-3
    loader wants ``optimizer_state_dict.state[0].step``, the ZeRO-1/2 loader ``ds_version`` and a
    per-parameter ``step.pt``. Partition-sized tensors (rank 0's flat groups) are dropped: unused."""
    zero_dir = os.path.join(universal_dir, "zero")
    path = os.path.join(zero_dir, "optimizer_state.pt")
    sd = torch.load(path, map_location="cpu", weights_only=False)
    sd.setdefault("ds_version", ckpt.ds_version)
    sd.pop("fp32_flat_groups", None)
    step = None
    inner = sd.get("optimizer_state_dict")
    if isinstance(inner, dict) and inner.get("state"):
        step = next(iter(inner["state"].values())).get("step")
    params = [d for d in os.listdir(zero_dir) if os.path.isdir(os.path.join(zero_dir, d))]
    if step is None:
        for d in params:
            f = os.path.join(zero_dir, d, "step.pt")
            if os.path.isfile(f):
                step = torch.load(f, weights_only=False)
                break
    if step is None:
        raise CheckpointError(f"{universal_dir}: no optimizer step found (was the checkpoint saved before any step?)")
    sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": sd["param_groups"]}
    torch.save(sd, path)
    for d in params:
        f = os.path.join(zero_dir, d, "step.pt")
        if not os.path.isfile(f) and os.path.isfile(os.path.join(zero_dir, d, "exp_avg.pt")):
            torch.save(step, f)
        # ZeRO-3 sources store flat tensors, the ZeRO-1/2 loader wants {"param": full-shape tensor}.
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            f = os.path.join(zero_dir, d, f"{state}.pt")
            if os.path.isfile(f):
                t = torch.load(f, map_location="cpu", weights_only=False)
                if torch.is_tensor(t):
                    shape = ckpt.shape(d) if d in ckpt.sources or d in ckpt.aliases else t.shape
                    torch.save({"param": t.reshape(shape), "cat_dim": 0}, f)


# ---------------------------------------------------------------------------------------------
# Base model folder + PEFT adapter folder -> merged model (tools/merge_lora.py)
# ---------------------------------------------------------------------------------------------

_ST_TORCH = {v: k for k, v in _ST_DTYPES.items()}


class _SafeFiles:
    """safe_open handles, opened on first use (the same role as _OpenFiles for DeepSpeed files)."""

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
    """A base model folder (safetensors) and a PEFT adapter folder, read lazily and addressed by the
    PeftModel's own state_dict keys, so the DeepSpeed-checkpoint plans (plan_merged) apply as is."""

    def __init__(self, base_dir: str, adapter_dir: str, peft_model: torch.nn.Module, adapter_name: str):
        from peft import get_peft_model_state_dict
        from safetensors import safe_open

        base = _safetensors_index(base_dir, "model")
        if not base:
            raise FileNotFoundError(f"{base_dir}: no model*.safetensors (convert .bin weights with "
                                    "transformers' save_pretrained(safe_serialization=True) first)")
        adapter = _safetensors_index(adapter_dir, "adapter_model")
        if not adapter:
            raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors")
        self.loc: dict[str, tuple[str, str]] = {}
        self.sources: dict[str, _Source] = {}
        self.aliases: dict[str, str] = {}
        placeholders = {k: torch.empty(v.shape, device="meta") for k, v in peft_model.state_dict().items()}
        back = {id(t): k for k, t in placeholders.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved = get_peft_model_state_dict(peft_model, state_dict=placeholders, adapter_name=adapter_name,
                                              save_embedding_layers=False)
        owned = {back[id(t)]: k for k, t in saved.items()}  # model key -> adapter file key
        dups = _tied_duplicates(peft_model)
        for key in placeholders:
            if key in dups:
                continue
            if key in owned and owned[key] in adapter:
                self.loc[key] = (adapter[owned[key]], owned[key])
            elif key in adapter:  # e.g. resized embeddings saved whole in the adapter
                self.loc[key] = (adapter[key], key)
            else:
                base_key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
                base_key = base_key.replace(".original_module.", ".")
                if base_key in base:
                    self.loc[key] = (base[base_key], base_key)
        for key, (path, k) in self.loc.items():
            with safe_open(path, framework="pt") as f:
                sl = f.get_slice(k)
                self.sources[key] = _Source("hf", torch.Size(sl.get_shape()), _ST_TORCH[sl.get_dtype()])
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
        return files.get(path, key)


def check_adapter_fits_base(adapter_dir: str, base_model: torch.nn.Module, base_name: str) -> None:
    """One clear error when the adapter's LoRA matrices do not fit the base model's layers."""
    from safetensors import safe_open

    problems = []
    for key, path in _safetensors_index(adapter_dir, "adapter_model").items():
        m = re.match(r"^base_model\.model\.(.+)\.lora_(A|B|embedding_A|embedding_B)(?:\.weight)?$", key)
        if not m:
            continue
        module_name, which = m.group(1), m.group(2)
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
            raise FileNotFoundError(f"{what} folder not found: {path}")
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    peft_config = PeftConfig.from_pretrained(adapter_dir)
    kind_of_model = model_kind or _adapter_kind(adapter_dir, peft_config)
    config = _load_config(base_model)
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
    check_adapter_fits_base(adapter_dir, build_model(config, kind_of_model), base_model)
    peft_model = build_model(config, kind_of_model, peft_config)
    source = LoraFolders(base_model, adapter_dir, peft_model, "default")
    entries = plan_merged(source, peft_model, "default")
    log(f"{base_model} + {adapter_dir} ({kind_of_model}) -> merged, {len(entries)} tensors, {out_dtype_name}")

    os.makedirs(output_dir, exist_ok=True)
    _prepare_output_dir(output_dir, adapter_dir)
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


@torch.no_grad()
def verify_merge(output_dir: str, base_model: str, adapter_dir: str, model_kind: str,
                 prompts: tuple[str, ...] = DEFAULT_PROMPTS, log: Callable[[str], None] = print) -> dict:
    """Merged folder vs PeftModel.from_pretrained(base, adapter) (PEFT's own, unmerged), in fp32."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    cls = _model_class(None, model_kind)
    kw = {"num_labels": 1} if model_kind != "causal_lm" else {}
    got = cls.from_pretrained(output_dir, dtype=torch.float32).eval()
    base = cls.from_pretrained(base_model, dtype=torch.float32, **kw)
    vocab = got.get_input_embeddings().weight.shape[0]
    if base.get_input_embeddings().weight.shape[0] != vocab:
        base.resize_token_embeddings(vocab)
    if model_kind != "causal_lm":
        base.config.pad_token_id = got.config.pad_token_id
    ref = PeftModel.from_pretrained(base, adapter_dir).eval()
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
