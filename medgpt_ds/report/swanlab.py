"""--report_to swanlab: a SwanLab experiment, offline by default, under ``<logging dir>/swanlog``.

``swanlab sync`` uploads it later; SWANLAB_MODE=cloud (and SWANLAB_PROJ_NAME) in the environment
report live instead.
"""
from __future__ import annotations

import os
from typing import Optional


class SwanLabBackend:
    def __init__(self, log_dir: str, run_name: str, config: Optional[dict] = None) -> None:
        import swanlab  # optional dependency: pip install 'medgpt-ds[swanlab]'

        self.swanlab = swanlab
        self.run = swanlab.init(project=os.environ.get("SWANLAB_PROJ_NAME", "medgpt-ds"), experiment_name=run_name,
                                config=config or {}, logdir=os.path.join(log_dir, "swanlog"),
                                mode=os.environ.get("SWANLAB_MODE", "offline"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.swanlab.log(metrics, step=step)

    def close(self) -> None:
        self.swanlab.finish()
