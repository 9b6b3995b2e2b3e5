"""--report_to tensorboard: event files in the logging dir (``tensorboard --logdir <output_dir>/logs``)."""
from __future__ import annotations

from typing import Optional


class TensorBoardBackend:
    def __init__(self, log_dir: str, run_name: str, config: Optional[dict] = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency (the tensorboard package)

        self.writer = SummaryWriter(log_dir=log_dir)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
