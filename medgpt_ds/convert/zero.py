"""Reading DeepSpeed checkpoints lazily: where every tensor of a ZeRO 0/1/2/3 tag dir lives, and
single tensors materialized on demand from memory-mapped files (never the whole model at once)."""
from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from medgpt_ds.convert.safe_load import load_pickle, vet_checkpoint_files
from medgpt_ds.errors import CheckpointError, PathNotFound

_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL3_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")


def resolve_tag_dir(path: str) -> str:
    """``output_dir/checkpoint-N`` -> itself; ``output_dir`` -> the tag named in ``output_dir/latest``."""
    if not os.path.isdir(path):
        raise PathNotFound(f"checkpoint dir not found: {path}")
    names = os.listdir(path)
    if any(n.endswith("_model_states.pt") for n in names):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
        tag_dir = os.path.join(path, tag)
        if not os.path.isdir(tag_dir):
            raise PathNotFound(f"{latest} names tag {tag!r} but {tag_dir} does not exist")
        return resolve_tag_dir(tag_dir)
    tags = sorted(n for n in names if os.path.isdir(os.path.join(path, n)) and n.startswith("checkpoint-"))
    hint = f" (it holds {', '.join(tags)}: pass one of them)" if tags else ""
    raise PathNotFound(
        f"{path} is not a DeepSpeed checkpoint: no *_model_states.pt and no 'latest' file{hint}")


@dataclass
class TensorSource:
    """Where one full tensor lives in the checkpoint files."""

    kind: str  # "module" | "z12" | "z3" | "frozen3"
    shape: torch.Size
    dtype: torch.dtype
    group: int = 0
    offset: int = 0
    partitioned_numel: int = 0


class OpenFiles:
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
            self._cache[path] = load_pickle(path, trust=self.ckpt.trust, mmap=True)
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
    parameters (e.g. a LoRA base) and buffers from the model-state files. Every file is unpickled
    through the allow-list of ``safe_load`` unless ``trust`` (``--trust_checkpoint``).
    """

    def __init__(self, tag_dir: str, *, trust: bool = False):
        self.tag_dir = tag_dir = resolve_tag_dir(tag_dir)
        self.trust = trust
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
            raise PathNotFound(f"{tag_dir}: no *_model_states.pt file")

        if not self.optim_files and os.path.isdir(os.path.join(tag_dir, "zero")):
            raise CheckpointError(f"{tag_dir} is a DeepSpeed universal checkpoint (made for resuming at another "
                                  "topology): export the tag dir it was converted from")
        # DeepSpeed's readers (zero_to_fp32 in --verify, ds_to_universal) unpickle these files too
        vet_checkpoint_files(self.model_files + self.optim_files, trust=trust)
        files = OpenFiles(self)
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
        self.sources: dict[str, TensorSource] = {}
        self.trainable: set[str] = set()
        fp32 = torch.float32

        if self.stage in (1, 2):
            paddings = osd.get("param_alignment_paddings")
            for g, shapes in enumerate(ms0["param_shapes"]):
                offset = 0
                for i, (name, shape) in enumerate(shapes.items()):
                    shape = torch.Size(shape)
                    self.sources[name] = TensorSource("z12", shape, fp32, group=g, offset=offset)
                    offset += shape.numel() + (paddings[g][i] if paddings is not None else 0)
            self._partition_numel = [t.numel() for t in osd["single_partition_of_fp32_groups"]]
            self.trainable = set(self.sources)
        elif self.stage == 3:
            offset = 0
            for shapes in ms0["param_shapes"]:
                for name, shape in shapes.items():
                    shape = torch.Size(shape)
                    pn = math.ceil(shape.numel() / self.world_size)
                    self.sources[name] = TensorSource("z3", shape, fp32, offset=offset, partitioned_numel=pn)
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
                self.sources[name] = TensorSource("frozen3", torch.Size(shape), frag.dtype)
        # Everything else (frozen params at ZeRO<=2, all params at ZeRO-0, buffers) is in "module".
        for name, t in module.items():
            if name in self.sources or name in self.aliases:
                continue
            if self.stage == 3 and name not in self.buffer_names:
                continue
            self.sources[name] = TensorSource("module", t.shape, t.dtype)
        missing_alias = [a for a, src in self.aliases.items() if src not in self.sources]
        if missing_alias:
            raise CheckpointError(f"{tag_dir}: shared parameters {missing_alias} point at missing tensors")
        # Keep the model's own state_dict order (nice shards, readable indexes).
        order = {n: i for i, n in enumerate(module)}
        self.names = sorted(self.sources, key=lambda n: order.get(n, len(order)))
        files.close()

    def open_files(self) -> OpenFiles:
        return OpenFiles(self)

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

    def tensor(self, name: str, files: OpenFiles) -> torch.Tensor:
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


def check_fits(tag_dir: str, model: torch.nn.Module, *, flag: str = "--resume_from_checkpoint",
               trust: bool = False) -> None:
    """CheckpointError naming the checkpoint and its first tensor that ``model`` (the module a
    DeepSpeed engine wraps; ZeRO-3 shapes read from ``ds_shape``) does not have, or has in another
    shape: a resume with the wrong --model_name_or_path / --model_config, told in one line."""
    ckpt = ZeroCheckpoint(tag_dir, trust=trust)
    params = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    for name, shape in params.items():
        if name in ckpt.sources or name in ckpt.aliases:
            saved = tuple(ckpt.shape(name))
            if saved != shape:
                raise CheckpointError(f"{flag} {ckpt.tag_dir} was saved from a different model: {name} is {saved} "
                                      f"in the checkpoint but {shape} in this model (resume with the model the "
                                      "run was started with)")
    missing = [n for n in params if n not in ckpt.sources and n not in ckpt.aliases]
    if missing:
        raise CheckpointError(f"{flag} {ckpt.tag_dir} was saved from a different model: it has no {missing[0]} "
                              f"({len(missing)} of this model's {len(params)} parameters are not in it)")
