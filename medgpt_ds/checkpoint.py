"""Checkpoints: DeepSpeed state + our client state (step, epoch, data position, RNG per rank),
written so that ``latest`` moves only after every rank finished; rotation; final HF export.

Layout (output_dir):
    checkpoint-<step>/    DeepSpeed tag dir + trainer_state.json, rng_state_<rank>.pth,
                          run_config.json, ds_config.json, hf_meta/ (see convert.write_hf_meta)
    latest                the tag of the newest COMPLETE checkpoint (atomic rename)
    zero_to_fp32.py       DeepSpeed's converter (still works on these checkpoints)
"""
from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
from typing import Any, Optional

import deepspeed
import numpy as np
import torch

from medgpt_ds import dist
from medgpt_ds.convert.safe_load import load_pickle, pickle_files, vet_checkpoint_files
from medgpt_ds.convert.zero import check_fits
from medgpt_ds.errors import CheckpointError, PathNotFound, UserError, writing
from medgpt_ds.generation import stop_at_end_of_turn

STATE_FILE = "trainer_state.json"
_TAG_RE = re.compile(r"^checkpoint-(\d+)$")


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_latest(output_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint in output_dir, or None."""
    path = os.path.join(output_dir, "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    ckpt = os.path.join(output_dir, tag)
    if not os.path.isfile(os.path.join(ckpt, STATE_FILE)):
        raise CheckpointError(f"{path} points to {tag}, which has no {STATE_FILE}: the checkpoint is damaged")
    return ckpt


def save(engine, output_dir: str, state: dict, *, run_config: dict, ds_config: dict,
         hf_meta: Optional[callable] = None, save_total_limit: Optional[int] = None,
         extra_engines: Optional[dict] = None) -> str:
    """Save a complete checkpoint on all ranks, then move ``latest`` to it (rank 0).

    ``state`` (step, epoch, data position, ...) goes to trainer_state.json; RNG states are saved
    per rank. ``hf_meta(tag_dir)`` writes the metadata an HF export needs (rank 0).
    ``extra_engines`` (name -> engine) are saved under the same tag (e.g. a PPO critic).
    """
    tag = f"checkpoint-{state['global_step']}"
    tag_dir = os.path.join(output_dir, tag)
    with writing(tag_dir):  # a full disk: one error line, and `latest` keeps naming the previous checkpoint
        engine.save_checkpoint(output_dir, tag=tag, client_state={"medgpt_state": state}, save_latest=False)
        for name, other in (extra_engines or {}).items():
            other.save_checkpoint(os.path.join(tag_dir, name), tag="state", save_latest=False)
        torch.save(_rng_state(), os.path.join(tag_dir, f"rng_state_{dist.rank()}.pth"))
        dist.barrier()
        if dist.is_main():
            with open(os.path.join(tag_dir, "run_config.json"), "w") as f:
                json.dump(run_config, f, indent=2, sort_keys=True)
            with open(os.path.join(tag_dir, "ds_config.json"), "w") as f:
                json.dump(ds_config, f, indent=2)
            if hf_meta is not None:
                hf_meta(tag_dir)
            # written last: its presence marks the tag dir as complete
            _atomic_write(os.path.join(tag_dir, STATE_FILE), json.dumps({**state, "world_size": dist.world_size()}, indent=2))
            _atomic_write(os.path.join(output_dir, "latest"), tag)
            if save_total_limit:
                rotate(output_dir, save_total_limit, keep=tag)
    dist.barrier()
    return tag_dir


def rotate(output_dir: str, limit: int, keep: str) -> list[str]:
    """Delete the oldest checkpoints beyond ``limit`` (never ``keep``, the latest)."""
    tags = sorted((int(m.group(1)), d) for d in os.listdir(output_dir) if (m := _TAG_RE.match(d)))
    removed = []
    excess = len(tags) - limit
    for _, d in tags:
        if excess <= 0:
            break
        if d == keep:
            continue
        shutil.rmtree(os.path.join(output_dir, d), ignore_errors=True)
        removed.append(d)
        excess -= 1
    if removed:
        dist.print0(f"save_total_limit={limit}: removed {', '.join(removed)}")
    return removed


def resolve_resume_path(resume: Optional[str], output_dir: str) -> Optional[str]:
    """``auto`` -> latest complete checkpoint in output_dir (None if there is none)."""
    if not resume:
        return None
    if resume == "auto":
        return read_latest(output_dir) if os.path.isdir(output_dir) else None
    if not os.path.isdir(resume):
        raise PathNotFound(f"--resume_from_checkpoint {resume}: no such directory")
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        latest = read_latest(resume)  # an output_dir was given
        if latest is None:
            raise CheckpointError(f"--resume_from_checkpoint {resume}: not a complete checkpoint "
                                  f"(no {STATE_FILE}) and no 'latest' inside")
        return latest
    return resume


def load(engine, ckpt_dir: str, *, load_universal: bool = False, extra_engines: Optional[dict] = None) -> dict:
    """Restore engine (model, optimizer, scheduler) and this rank's RNG; returns trainer state."""
    load_dir, tag = os.path.split(ckpt_dir.rstrip("/"))
    if load_universal:
        engine._config.load_universal_checkpoint = True
    else:
        # DeepSpeed's own report of a checkpoint of another model is a 56-line size-mismatch dump. The
        # files were vetted by prepare_output_dir (and DeepSpeed unpickles them without a check anyway).
        check_fits(ckpt_dir, engine.module, flag="--resume_from_checkpoint", trust=True)
    # a universal checkpoint re-partitions the optimizer, whose param groups the saved LR-scheduler
    # state no longer matches: rebuild the schedule and fast-forward it to the saved step instead
    # a 4-bit / 8-bit base saves its quantization state (absmax, quant_map, SCB, ...) beside each weight,
    # which bitsandbytes' layers do not read back through load_state_dict; every parameter of the model
    # was checked to be in the checkpoint above (or is re-partitioned by the universal loader)
    quantized = any(type(p).__name__ in ("Params4bit", "Int8Params") for p in engine.module.parameters())
    path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=not load_universal,
                                          load_module_strict=not quantized)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint {ckpt_dir}")
    for name, other in (extra_engines or {}).items():
        p, _ = other.load_checkpoint(os.path.join(ckpt_dir, name), tag="state")
        if p is None:
            raise RuntimeError(f"could not load the {name} engine from {ckpt_dir}/{name}")
    with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
        state = json.load(f)
    if load_universal and engine.lr_scheduler is not None:
        for _ in range(state["global_step"]):
            engine.lr_scheduler.step()
    rng_file = os.path.join(ckpt_dir, f"rng_state_{dist.rank()}.pth")
    saved_world = state.pop("world_size", None)
    if saved_world == dist.world_size() and os.path.isfile(rng_file):
        _set_rng_state(load_pickle(rng_file))  # numpy RNG state: allowed by safe_load's list
    else:
        dist.print0(f"warning: world size changed ({saved_world} -> {dist.world_size()}): "
                    "RNG streams restart from the seed; data order is still restored")
    return state


def export_hf(engine, model, tokenizer, out_dir: str, *, is_peft: bool, zero3: bool) -> None:
    """Write the trained model as a Hugging Face folder: full weights (safetensors) or the LoRA
    adapter, plus the tokenizer (with its chat template). Collective under ZeRO-3: all ranks call."""
    with writing(out_dir):
        if is_peft:
            trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            if zero3:
                # a plain rank-0 save under ZeRO-3 writes empty (0,) tensors: gather the adapter first
                with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
                    state = {n: p.detach().cpu().clone() for n, p in trainable} if dist.is_main() else None
            else:
                state = {n: p.detach().cpu().clone() for n, p in trainable} if dist.is_main() else None
            if dist.is_main():
                model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        else:
            state = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
            if dist.is_main():
                stop_at_end_of_turn(getattr(model, "generation_config", None), tokenizer)
                model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        if dist.is_main():
            tokenizer.save_pretrained(out_dir)
    dist.barrier()


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)


def prepare_output_dir(cfg) -> Optional[str]:
    """Check output_dir against --overwrite_output_dir / --resume_from_checkpoint, write the run
    manifest, and return the checkpoint to resume from (or None). Call on all ranks."""
    t = cfg.train
    resume = resolve_resume_path(t.resume_from_checkpoint, t.output_dir)
    if resume:  # every pickle DeepSpeed and we will load, through the allow-list (unless --trust_checkpoint)
        vet_checkpoint_files(pickle_files(resume), trust=t.trust_checkpoint)
    if t.resume_from_checkpoint == "auto" and resume is None:
        dist.print0(f"--resume_from_checkpoint auto: no complete checkpoint in {t.output_dir}, starting fresh")
    if dist.is_main():
        # a run that failed on bad input leaves only its manifest: that must not block the re-run
        manifest = ("logs", ".cache", "run_config.json", "versions.json", "ds_config.json")
        existing = [d for d in os.listdir(t.output_dir) if d not in manifest] if os.path.isdir(t.output_dir) else []
        if existing and resume is None:
            if not t.overwrite_output_dir and t.resume_from_checkpoint != "auto":
                raise UserError(f"output_dir {t.output_dir} is not empty; pass --overwrite_output_dir to "
                                "start over or --resume_from_checkpoint auto to continue")
            for d in existing:  # stale checkpoints would confuse rotation and `latest`
                if _TAG_RE.match(d) or d in ("latest", "PREEMPTED"):
                    p = os.path.join(t.output_dir, d)
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        os.makedirs(t.output_dir, exist_ok=True)
        cfg.save(os.path.join(t.output_dir, "run_config.json"))
        write_json(os.path.join(t.output_dir, "versions.json"), _versions())
    dist.barrier()
    return resume


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "deepspeed", "transformers", "peft", "datasets", "trl", "bitsandbytes", "flash_attn"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages may be missing or broken
            out[mod] = None
    return out
