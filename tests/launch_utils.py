"""Helpers for tests that run the real entrypoint in subprocesses (1 rank or `deepspeed` 2 ranks)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "medicalgpt")
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    e.update(TORCH_EXTENSIONS_DIR=os.path.join(ROOT, ".cache", "torch_extensions"), HF_HUB_OFFLINE="1",
             HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             MEDGPT_NO_PROGRESS="1")
    e["PATH"] = os.path.dirname(PY) + os.pathsep + e.get("PATH", "")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def train(args: list[str], nproc: int = 1, check: bool = True, timeout: int = 600, port: int | None = None,
          **env_extra) -> subprocess.CompletedProcess:
    """Run launch/train.py with 1 rank (plain python) or N ranks (the deepspeed launcher)."""
    if nproc == 1:
        cmd = [PY, os.path.join(ROOT, "launch", "train.py"), *args]
    else:
        cmd = [os.path.join(os.path.dirname(PY), "deepspeed"), "--num_gpus", str(nproc), "--master_port",
               str(port or free_port()), os.path.join(ROOT, "launch", "train.py"), *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train failed (rc {p.returncode}): {' '.join(cmd)}\n--- stdout\n{p.stdout[-6000:]}\n"
                             f"--- stderr\n{p.stderr[-6000:]}")
    return p


def crash_then_resume(args: list[str], *, nproc: int, fail_rank: int, fail_step: int, resumes_from: str):
    """Run ``args`` with rank ``fail_rank`` raising at step ``fail_step`` (the run must fail there),
    then again with ``--resume_from_checkpoint auto``, which must resume from ``resumes_from``."""
    crash = train(args, nproc=nproc, check=False, MEDGPT_DEBUG_FAIL_RANK=str(fail_rank),
                  MEDGPT_DEBUG_FAIL_STEP=str(fail_step))
    assert crash.returncode != 0 and "MEDGPT_DEBUG_FAIL" in crash.stdout + crash.stderr, crash.stderr[-3000:]
    resumed = train([*args, "--resume_from_checkpoint", "auto"], nproc=nproc)
    assert "resumed from" in resumed.stdout and resumes_from in resumed.stdout, resumed.stdout[-3000:]
    return resumed


def metrics(output_dir: str, split: str = "train") -> list[dict]:
    path = os.path.join(output_dir, "logs", "metrics.jsonl")
    with open(path) as f:
        return [r for r in map(json.loads, f) if r.get("split") == split]


def losses(output_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(output_dir)}


def ds_config_copy(tmp_path, name: str, **zero_overrides) -> str:
    """A copy of ds_configs/<name>.json with zero_optimization overrides (e.g. persistence 0)."""
    with open(os.path.join(ROOT, "ds_configs", f"{name}.json")) as f:
        cfg = json.load(f)
    cfg["zero_optimization"].update(zero_overrides)
    path = os.path.join(str(tmp_path), f"{name}_test.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path
