"""--report_to wandb: a Weights & Biases run, offline by default, under ``<logging dir>/wandb``.

``wandb sync <logging dir>/wandb/offline-run-*`` uploads it later; WANDB_MODE=online (and
WANDB_PROJECT, WANDB_ENTITY, WANDB_API_KEY) in the environment report live instead.
"""
from __future__ import annotations

import os
from typing import Optional


class WandbBackend:
    def __init__(self, log_dir: str, run_name: str, config: Optional[dict] = None) -> None:
        import wandb  # optional dependency: pip install 'medgpt-ds[wandb]'

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "medgpt-ds"), name=run_name, dir=log_dir,
                              mode=os.environ.get("WANDB_MODE", "offline"), config=config or {}, reinit="create_new")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()
