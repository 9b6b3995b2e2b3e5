"""``--report_to`` backends: where training metrics go besides stdout and ``logs/metrics.jsonl``.

The names the HF Trainer takes: tensorboard, wandb, swanlab, mlflow (several comma- or
space-separated), none, all (= every one whose package is installed). Each backend is one file
here with one class implementing ``ReportBackend``, and one line in ``BACKENDS``. All of them run
offline and write under the run's logging dir (``<output_dir>/logs`` by default) unless the user's
environment points them elsewhere (WANDB_MODE, SWANLAB_MODE, MLFLOW_TRACKING_URI).
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Optional, Protocol

from medgpt_ds.errors import UserError


class ReportBackend(Protocol):
    """One experiment tracker. Constructed on rank 0 only, once per run."""

    def __init__(self, log_dir: str, run_name: str, config: Optional[dict] = None) -> None: ...

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Finite scalars named ``<split>/<metric>`` (train/loss, eval/loss, ...) at optimizer step ``step``."""

    def close(self) -> None:
        """Flush and finish the run (called once, at the end)."""


# --report_to name -> (class "module:Name", the package it needs, the setup.py extra that installs it)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "tensorboard": ("medgpt_ds.report.tensorboard:TensorBoardBackend", "tensorboard", "tensorboard"),
    "wandb": ("medgpt_ds.report.wandb:WandbBackend", "wandb", "wandb"),
    "swanlab": ("medgpt_ds.report.swanlab:SwanLabBackend", "swanlab", "swanlab"),
    "mlflow": ("medgpt_ds.report.mlflow:MlflowBackend", "mlflow", "mlflow"),
}
NO_BACKEND = ("none", "jsonl")  # jsonl and stdout are always written


def installed(name: str) -> bool:
    """Whether the package backend ``name`` needs can be imported."""
    return importlib.util.find_spec(BACKENDS[name][1]) is not None


def parse_report_to(value: Optional[str]) -> list[str]:
    """--report_to as a list of backend names ("all" kept as is); ValueError on an unknown name."""
    names = [n.strip().lower() for n in (value or "none").replace(" ", ",").split(",") if n.strip()]
    for n in names:
        if n not in BACKENDS and n not in NO_BACKEND and n != "all":
            raise ValueError(f"--report_to {n!r} is not one of {', '.join([*BACKENDS, 'none', 'all'])}")
    if len(names) > 1 and any(n in NO_BACKEND or n == "all" for n in names):
        raise ValueError(f"--report_to {value!r}: none and all stand alone")
    return names


def resolve_report_to(value: Optional[str]) -> list[str]:
    """The backends a run reports to: "all" = every installed one; a named backend whose package is
    missing is a UserError naming the extra that installs it."""
    names = parse_report_to(value)
    if names == ["all"]:
        return [n for n in BACKENDS if installed(n)]
    out = [n for n in names if n not in NO_BACKEND]
    for n in out:
        if not installed(n):
            raise UserError(f"--report_to {n}: the {BACKENDS[n][1]} package is not installed "
                            f"(pip install 'medgpt-ds[{BACKENDS[n][2]}]'), or pick another of "
                            f"{', '.join(BACKENDS)}, none")
    return out


def open_backends(names: list[str], log_dir: str, run_name: str, config: Optional[dict] = None) -> list:
    """One started backend per name (rank 0 calls this)."""
    out = []
    for n in names:
        module, cls = BACKENDS[n][0].split(":")
        out.append(getattr(importlib.import_module(module), cls)(log_dir, run_name, config))
    return out


def flatten(config: Optional[dict], prefix: str = "") -> dict[str, object]:
    """{"train": {"learning_rate": 1e-5}} -> {"train.learning_rate": 1e-5} (for trackers with flat params)."""
    out: dict[str, object] = {}
    for k, v in (config or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
