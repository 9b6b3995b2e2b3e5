"""Changing topology: DeepSpeed universal checkpoints (resume at another world size / ZeRO stage)."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
from typing import Callable

import torch

from medgpt_ds.convert.safe_load import load_pickle
from medgpt_ds.convert.zero import ZeroCheckpoint, resolve_tag_dir
from medgpt_ds.errors import CheckpointError


def to_universal(checkpoint_dir: str, output_dir: str | None = None, workers: int = 1,
                 log: Callable[[str], None] = print, trust_checkpoint: bool = False) -> str:
    """Convert a ZeRO-1/2/3 tag dir into a DeepSpeed *universal* checkpoint.

    Default output: ``<run_dir>/<tag>-universal`` beside the tag, with ``<run_dir>/latest_universal``
    naming it, so an engine whose config has ``"checkpoint": {"load_universal": true}`` resumes
    from ``<run_dir>`` at any world size and ZeRO stage (``engine.load_checkpoint(run_dir)``).
    The tag's other files (trainer state, RNG states, ``hf_meta/``) are copied along, so
    ``--resume_from_checkpoint <run_dir>/<tag>-universal --load_universal`` works. Returns the folder.
    The source files are unpickled through the allow-list first unless ``trust_checkpoint``.
    """
    from deepspeed.checkpoint import ds_to_universal

    tag_dir = resolve_tag_dir(checkpoint_dir)
    ckpt = ZeroCheckpoint(tag_dir, trust=trust_checkpoint)
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
    sd = load_pickle(path, trust=ckpt.trust)
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
                step = load_pickle(f, trust=ckpt.trust)
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
                t = load_pickle(f, trust=ckpt.trust)
                if torch.is_tensor(t):
                    shape = ckpt.shape(d) if d in ckpt.sources or d in ckpt.aliases else t.shape
                    torch.save({"param": t.reshape(shape), "cat_dim": 0}, f)
