"""Export plans: for every output key, how to compute it from the checkpoint (full model, PEFT
adapter, or LoRA merged into the base one layer at a time), checked against the model's config."""
from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from medgpt_ds.convert.zero import OpenFiles, ZeroCheckpoint
from medgpt_ds.errors import CheckpointError

Producer = Callable[[OpenFiles], torch.Tensor]


@dataclass
class Entry:
    key: str
    shape: torch.Size
    dtype: torch.dtype  # source dtype (floating tensors are cast to the export dtype)
    produce: Producer


def load_config(path: str):
    """The transformers config of a model folder (or an hf_meta/ folder)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def model_class(arch: str | None, model_kind: str, config: Any = None):
    """The transformers class of a checkpoint: its recorded architecture when that is a transformers
    class of the right kind, else the kind's Auto class (reward: one score per sequence) or, for the
    PPO critic's per-token value head, ``medgpt_ds.model.value_model_class`` (ours where transformers
    has no token classifier for the model type, e.g. qwen3_5_text, gemma3_text)."""
    import transformers

    suffix = {"causal_lm": "", "reward": "ForSequenceClassification", "value": "ForTokenClassification"}[model_kind]
    if arch and hasattr(transformers, arch) and arch.endswith(suffix):
        return getattr(transformers, arch)
    if model_kind == "value" and config is not None:
        from medgpt_ds.model import value_model_class

        return value_model_class(config)
    return {"causal_lm": transformers.AutoModelForCausalLM,
            "reward": transformers.AutoModelForSequenceClassification,
            "value": transformers.AutoModelForTokenClassification}[model_kind]


def native_adapter(model: torch.nn.Module, peft_config: Any) -> bool:
    """Whether ``peft_config`` names ``model``'s transformers-5 modules and parameters as they are (every
    adapter this trainer writes: full module names, stacked experts as target_parameters), so peft's
    transformers-4 MoE rewrite must stay off (``medgpt_ds.model.v5_native_peft``). An adapter of
    transformers-4 era names that are not linear layers here keeps peft's rewrite (as
    ``medgpt_ds.model.load_adapter`` decides)."""
    if getattr(peft_config, "target_parameters", None):
        return True
    targets = getattr(peft_config, "target_modules", None) or []
    if isinstance(targets, str):
        return False
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return all(t in linear or any(n.endswith("." + t) for n in linear) for t in targets)


def build_model(config: Any, model_kind: str, peft_config: Any = None, adapter_name: str = "default",
                device: str = "meta") -> torch.nn.Module:
    """The model the checkpoint was saved from, built from its config (on ``device``, no weights)."""
    from contextlib import nullcontext

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = model_class(arch, model_kind, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device(device):
            model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
            if peft_config is not None:
                from peft import get_peft_model

                from medgpt_ds.model import v5_native_peft

                with v5_native_peft() if native_adapter(model, peft_config) else nullcontext():
                    model = get_peft_model(model, copy.deepcopy(peft_config), adapter_name=adapter_name)
    return model


def tied_duplicates(model: torch.nn.Module) -> set[str]:
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
    dups = tied_duplicates(model)
    return {k: v.shape for k, v in model.state_dict().items() if k not in dups}


def _source_entry(ckpt: ZeroCheckpoint, out_key: str, src: str) -> Entry:
    return Entry(out_key, ckpt.shape(src), ckpt.dtype(src), lambda files, s=src: ckpt.tensor(s, files))


def _check_against(expected: dict[str, torch.Size], entries: list[Entry], what: str) -> None:
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


def plan_full(ckpt: ZeroCheckpoint, model: torch.nn.Module) -> list[Entry]:
    """Full model: checkpoint names are already the model's state_dict keys."""
    expected = _expected_keys(model)
    entries = [_source_entry(ckpt, k, k) for k in expected if k in ckpt.sources or k in ckpt.aliases]
    entries += [_source_entry(ckpt, k, k) for k in ckpt.names if k not in expected]
    _check_against(expected, entries, f"the model config ({type(model).__name__})")
    return entries


def plan_adapter(ckpt: ZeroCheckpoint, peft_model: torch.nn.Module, adapter_name: str,
                 save_embedding_layers: bool) -> list[Entry]:
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


def _innermost(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """The layer under a (possibly nested) LoRA wrapper and its module path."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    while isinstance(module, BaseTunerLayer):
        module, name = module.base_layer, f"{name}.base_layer"
    return module, name


def plan_merged(ckpt: ZeroCheckpoint, peft_model: torch.nn.Module, adapter_name: str) -> list[Entry]:
    """LoRA merged into the base weights, one LoRA layer at a time with PEFT's own ``merge``.

    A stacked expert weight is merged by the wrapper that adapts it: peft nests one ``ParamWrapper``
    per adapted parameter of a module (``experts`` around ``experts.base_layer``), and each merges only
    its own parameter."""
    from peft.tuners.lora import ParamWrapper
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    prefix = "base_model.model."
    merged_meta = copy.deepcopy(peft_model).merge_and_unload()
    expected = _expected_keys(merged_meta)
    handled: dict[str, tuple[str, str, str]] = {}  # out key -> ("lora", peft module, param) | ("copy", source, "")
    for name, module in peft_model.named_modules():
        if not name.startswith(prefix):
            continue
        out_prefix = re.sub(r"\.base_layer(?=\.|$)", "", name[len(prefix):])
        if isinstance(module, BaseTunerLayer):
            base, base_name = _innermost(module, name)
            for pname, _ in base.named_parameters():
                key = f"{out_prefix}.{pname}"
                if not isinstance(module, ParamWrapper):
                    handled[key] = ("lora", name, pname)
                elif pname == module.parameter_name:
                    handled[key] = ("lora", name, pname)
                else:  # adapted by another wrapper of the nest, or by none
                    handled.setdefault(key, ("copy", f"{base_name}.{pname}", ""))
        elif isinstance(module, AuxiliaryTrainingWrapper):
            inner = f"{name}.modules_to_save.{adapter_name}"
            for pname, _ in module.get_submodule(f"modules_to_save.{adapter_name}").named_parameters():
                handled[f"{out_prefix}.{pname}"] = ("copy", f"{inner}.{pname}", "")

    entries = []
    for key, shape in expected.items():
        kind, src, param = handled.get(key, ("copy", prefix + key, ""))
        if kind == "copy":
            if src not in ckpt.sources and src not in ckpt.aliases:
                continue  # reported by _check_against
            entries.append(_source_entry(ckpt, key, src))
        else:
            entries.append(Entry(key, shape, torch.float32,
                                 lambda files, m=src, p=param: _merged_param(ckpt, peft_model, m, p,
                                                                             adapter_name, files)))
    _check_against(expected, entries, "the base model with the adapter merged")
    return entries


def _merged_param(ckpt: ZeroCheckpoint, peft_model: torch.nn.Module, module_name: str, param: str,
                  adapter_name: str, files: OpenFiles) -> torch.Tensor:
    """Materialize one LoRA layer (base weight + A/B) in fp32, merge it with PEFT, return ``param``.
    A ``ParamWrapper`` reads only its own A/B and the one stacked weight it adapts."""
    from peft.tuners.lora import ParamWrapper

    cache = files.__dict__.setdefault("_merged", {})
    if module_name not in cache:
        module = copy.deepcopy(peft_model.get_submodule(module_name))
        names = list(module.state_dict())
        if isinstance(module, ParamWrapper):
            _, base_name = _innermost(module, "")
            names = [n for n in names if not n.startswith("base_layer.")]
            names.append(f"{base_name[1:]}.{module.parameter_name}")
        sd = {n: ckpt.tensor(f"{module_name}.{n}", files).float() for n in names}
        module.load_state_dict(sd, assign=True, strict=not isinstance(module, ParamWrapper))
        module.merge(adapter_names=[adapter_name])
        cache.clear()  # one layer at a time
        cache[module_name] = dict(_innermost(module, "")[0].named_parameters())
    return cache[module_name][param].detach()
