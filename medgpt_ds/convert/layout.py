"""The hub layout: a model type's weights named and shaped as its checkpoints are published and as
transformers' ``save_pretrained`` writes them.

transformers 5 converts some of them on load (a MoE layer's per-expert ``experts.{i}.gate_proj.weight``
stacked into 3-D ``experts.gate_up_proj``, a Gemma3 composite's ``language_model.model.*`` renamed
``model.language_model.*``) with the model type's conversion mapping, and reverts that in
``save_pretrained``; vLLM and transformers 4 read only the hub layout. Exports write it (``to_hub_layout``)
and merge_lora reads it (``HubReader``), one conversion unit at a time: one tensor for a rename, all
experts of one layer for a MoE layer, never the whole model.

Units are planned with transformers' own transforms and key matching (``revert_weight_conversion`` for
saving, ``from_pretrained``'s renaming for loading) on meta tensors, so shapes are known before any
weight is read; each unit is then converted with the same transform on the real tensors.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from medgpt_ds.errors import CheckpointError


@dataclass
class Unit:
    """Source keys converted together into target keys. ``transform`` is None for a plain rename
    (one source, one target, the same tensor)."""

    key: str  # the unit's name in transformers' grouping (its first target, before renamings)
    sources: list[tuple[str, str]]  # (source key, the transform's source pattern it matched)
    targets: dict[str, torch.Size] = field(default_factory=dict)
    transform: Any = None


def _transforms(model: torch.nn.Module, to_hub: bool) -> tuple[list, list]:
    """(renamings, converters) that ``save_pretrained`` (``to_hub``) or ``from_pretrained`` applies to
    ``model`` (a model built from its config, as the trainer's ZeRO-3 export and our meta models are)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming
    except ImportError:  # transformers 4: checkpoints hold the model's own names
        return [], []
    if to_hub:
        # as revert_weight_conversion for a model without a load record: no legacy renames, no prefix
        # changes, every transform reversed, in reverse order
        forward = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
        transforms = [t.reverse_transform() for t in forward[::-1]]
    else:
        transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def _convert(unit: Unit, tensors: dict[str, torch.Tensor], model: torch.nn.Module, renamings: list,
             to_hub: bool) -> dict[str, torch.Tensor]:
    """Run ``unit``'s transform on its source tensors (a fresh copy of the transform each time, as
    transformers does); renamings follow a converter when saving (revert_weight_conversion's order)."""
    from transformers.core_model_loading import apply_renamings

    transform = copy.deepcopy(unit.transform)
    for source, pattern in unit.sources:
        transform.add_tensor(unit.key, source, pattern, tensors[source])
    out = transform.convert(unit.key, model=model, config=model.config)
    return {(apply_renamings(k, renamings) if to_hub else k): (v[0] if isinstance(v, list) else v)
            for k, v in out.items()}


class Layout:
    """The conversion units between ``model``'s own state_dict keys and the hub layout, for a set of
    source keys and shapes (``to_hub``: model keys -> hub keys; else hub keys -> model keys)."""

    def __init__(self, model: torch.nn.Module, shapes: dict[str, torch.Size], *, to_hub: bool):
        self.model, self.to_hub = model, to_hub
        self.renamings, converters = _transforms(model, to_hub)
        self.unexpected: list[str] = []
        if not self.renamings and not converters:
            self.units = [Unit(k, [(k, k)], {k: torch.Size(s)}) for k, s in shapes.items()]
            return
        from transformers.core_model_loading import apply_converters, apply_renamings, dot_natural_key, rename_source_key

        by_pattern = {p: c for c in converters for p in c.source_patterns}
        model_keys = None if to_hub else model.state_dict()
        units: dict[str, Unit] = {}
        for key in sorted(shapes, key=dot_natural_key):
            if to_hub:  # revert_weight_conversion: at most one converter, else every renaming
                renamed, pattern = apply_converters(key, converters)
                if pattern is None:
                    renamed = apply_renamings(key, self.renamings)
            else:  # from_pretrained: every renaming, then at most one converter; a key the model has stays
                renamed, pattern = rename_source_key(key, self.renamings, converters, model.base_model_prefix,
                                                     model_keys)
                if renamed not in model_keys and key in model_keys:
                    renamed, pattern = key, None
                if renamed not in model_keys:
                    self.unexpected.append(key)
                    continue
            unit = units.setdefault(renamed, Unit(renamed, [], transform=by_pattern[pattern] if pattern else None))
            if (pattern is None) != (unit.transform is None) or (pattern is None and unit.sources):
                raise CheckpointError(f"weight names {unit.sources[0][0]} and {key} both become {renamed} "
                                      f"in {type(model).__name__}'s {'hub' if to_hub else 'own'} layout")
            unit.sources.append((key, pattern or key))
        for unit in units.values():
            if unit.transform is None:
                unit.targets = {unit.key: torch.Size(shapes[unit.sources[0][0]])}
            else:  # shapes from the transform itself, on meta tensors (nothing is read)
                meta = {s: torch.empty(shapes[s], device="meta") for s, _ in unit.sources}
                unit.targets = {k: v.shape for k, v in _convert(unit, meta, model, self.renamings, to_hub).items()}
        self.units = list(units.values())

    def convert(self, unit: Unit, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``unit``'s targets from its sources' tensors."""
        if unit.transform is None:
            return {unit.key: tensors[unit.sources[0][0]]}
        return _convert(unit, tensors, self.model, self.renamings, self.to_hub)


class _UnitCache:
    """The converted tensors of one unit, kept until each target was taken once (the writer takes a
    unit's targets one after another), so a layer's experts are read and converted once."""

    def __init__(self):
        self.unit: Unit | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def take(self, unit: Unit, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> torch.Tensor:
        if self.unit is not unit or key not in self.tensors:
            self.unit, self.tensors = None, {}  # free the previous unit before computing the next
            self.tensors, self.unit = compute(), unit
        return self.tensors.pop(key)


def to_hub_layout(entries: list, model: torch.nn.Module) -> list:
    """Export entries named as ``model``'s state_dict -> entries in the hub layout (the keys, shapes and
    tensors ``save_pretrained`` writes for this model). A converted unit is produced when its first
    target is written and held until its last one is."""
    from medgpt_ds.convert.plans import Entry

    by_key = {e.key: e for e in entries}
    layout = Layout(model, {e.key: e.shape for e in entries}, to_hub=True)
    cache = _UnitCache()
    out = []
    for unit in layout.units:
        first = by_key[unit.sources[0][0]]
        if unit.transform is None:
            out.append(Entry(unit.key, first.shape, first.dtype, first.produce))
            continue

        def compute(files, unit=unit):
            return layout.convert(unit, {s: by_key[s].produce(files) for s, _ in unit.sources})

        for key, shape in unit.targets.items():
            out.append(Entry(key, shape, first.dtype,
                             lambda files, u=unit, k=key, c=compute: cache.take(u, k, lambda: c(files))))
    return out


class HubReader:
    """Tensors of a model folder in the hub layout, addressed by ``model``'s own state_dict keys and
    converted one unit at a time."""

    def __init__(self, shapes: dict[str, torch.Size], dtypes: dict[str, torch.dtype], model: torch.nn.Module):
        self.layout = Layout(model, shapes, to_hub=False)
        self.where = {k: u for u in self.layout.units for k in u.targets}
        self.shapes = {k: s for u in self.layout.units for k, s in u.targets.items()}
        self.dtypes = {k: dtypes[u.sources[0][0]] for u in self.layout.units for k in u.targets}
        self._cache = _UnitCache()

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def tensor(self, key: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The tensor of model key ``key``; ``read(source key)`` reads one tensor of the folder."""
        unit = self.where[key]
        if unit.transform is None:
            return read(unit.sources[0][0])
        return self._cache.take(unit, key, lambda: self.layout.convert(unit, {s: read(s) for s, _ in unit.sources}))
