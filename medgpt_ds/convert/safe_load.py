"""Loading the pickles of a checkpoint folder the user hands us without running code from it.

DeepSpeed checkpoints (``*_model_states.pt``, ``*_optim_states.pt``, universal ``zero/*/*.pt``) and
our ``rng_state_<rank>.pth`` are pickles. ``torch.load(weights_only=False)`` on a hostile one runs
whatever it names. Here they are loaded with ``weights_only=True`` and an allow-list of exactly the
non-tensor classes those files contain (measured on ZeRO-0/1/2/3 checkpoints, with and without
offload, bf16, LoRA, universal conversions); anything else is refused with the file named, unless the
user passes ``--trust_checkpoint`` for a checkpoint whose origin they trust.

DeepSpeed's own readers (``engine.load_checkpoint``, ``zero_to_fp32``, ``ds_to_universal``) always
unpickle with ``weights_only=False``: ``vet_checkpoint_files`` loads every pickle of a folder through
the allow-list first, so nothing reaches them that was not checked.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any

import torch

from medgpt_ds.errors import CheckpointError

TRUST_FLAG = "--trust_checkpoint"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")


def allowed_globals() -> list:
    """The classes (besides tensors and plain containers) that our checkpoints really hold."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    return [
        LossScaler, DynamicLossScaler,  # ZeRO / bf16 optimizer state (fp16 runs: the dynamic one)
        ZeroStageEnum,  # optimizer_state_dict["zero_stage"]
        fragment_address,  # ZeRO-1/2 optimizer state: where each parameter sits in the flat groups
        core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)),  # numpy RNG state
    ]


def load_pickle(path: str, *, trust: bool = False, mmap: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load`` a checkpoint file with ``weights_only=True`` and the allow-list (any pickle
    with ``trust``). A refused or damaged file is a CheckpointError naming it."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:
        if trust:
            return torch.load(path, map_location=map_location, mmap=mmap and is_zip, weights_only=False)
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, mmap=mmap and is_zip, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):  # a damaged legacy pickle, not a refused one
            raise _damaged(path, e) from None
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        what = f"it references {found.group(1)}, which" if found else "it holds objects that"
        raise CheckpointError(
            f"{path}: refused to load: {what} no DeepSpeed or medgpt-ds checkpoint holds, and loading it could run "
            f"code. If you trust where this checkpoint comes from, pass {TRUST_FLAG}") from None
    except (EOFError, zipfile.BadZipFile) as e:
        raise _damaged(path, e) from None
    except RuntimeError as e:
        if "zip archive" not in str(e) and "PytorchStreamReader" not in str(e):
            raise
        raise _damaged(path, e) from None


def _damaged(path: str, e: BaseException) -> CheckpointError:
    first = (str(e).splitlines() or [type(e).__name__])[0][:160]
    return CheckpointError(f"{path}: truncated or damaged ({os.path.getsize(path)} bytes; {first}): the save did "
                           "not finish or the copy is incomplete")


def pickle_files(folder: str) -> list[str]:
    """Every file under ``folder`` (recursively) that a DeepSpeed or medgpt-ds loader unpickles."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith(PICKLE_SUFFIXES)]
    return out


def vet_checkpoint_files(paths: list[str], *, trust: bool = False) -> None:
    """Load each file through the allow-list (memory-mapped: only the pickle is read), so a hostile
    file is refused before DeepSpeed's own readers unpickle it with ``weights_only=False``."""
    if trust:
        return
    for path in paths:
        load_pickle(path, mmap=True)
