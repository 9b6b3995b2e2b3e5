"""Rank-0 logging to stdout, a jsonl file and TensorBoard; a progress bar with ETA; throughput
and MFU. Non-zero ranks get a null logger so call sites stay unconditional.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

import torch

from medgpt_ds import dist

# Dense bf16 peak FLOP/s per device, for MFU (no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
              "L40S": 362e12, "A10": 125e12, "4090": 165e12, "V100": 125e12}


def peak_flops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


class MetricsLogger:
    """log(step, metrics) -> stdout line, logs/metrics.jsonl and TensorBoard (rank 0 only)."""

    def __init__(self, output_dir: str, report_to: str = "tensorboard", logging_dir: Optional[str] = None,
                 total_steps: int = 0, initial_step: int = 0):
        self.enabled = dist.is_main()
        self.tb = None
        self.jsonl = None
        self.bar = None
        if not self.enabled:
            return
        log_dir = logging_dir or os.path.join(output_dir, "logs")
        os.makedirs(log_dir, exist_ok=True)
        self.jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a")
        if report_to in ("tensorboard", "all"):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=log_dir)
        if total_steps:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True,
                            mininterval=2.0, disable=os.environ.get("MEDGPT_NO_PROGRESS") == "1" or not sys.stderr.isatty())

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (float, torch.Tensor)) else v) for k, v in metrics.items()}
        record = {"step": step, "split": prefix, **clean, "time": time.time()}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
            self.tb.flush()
        line = f"{prefix} step {step} | " + " | ".join(f"{k} {fmt(v)}" for k, v in clean.items())
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def info(self, msg: str) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.write(msg)
            else:
                print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


class Throughput:
    """Real (non-pad) tokens/s over a window, and MFU on GPUs with a known peak."""

    def __init__(self, num_params: int):
        self.num_params = num_params
        self.peak = peak_flops()
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.positions = 0
        self.t0 = time.perf_counter()

    def add(self, global_tokens: int, global_positions: int = 0) -> None:
        """Real tokens and total positions (incl. padding) processed, over all ranks."""
        self.tokens += global_tokens
        self.positions += global_positions

    def read(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"tokens_per_s": self.tokens / dt}
        if self.positions:
            out["pad_frac"] = 1.0 - self.tokens / self.positions
        if self.peak:
            # 6 N FLOPs per token for forward + backward (attention FLOPs not counted)
            out["mfu"] = 6 * self.num_params * self.tokens / dt / (self.peak * dist.world_size())
        if torch.cuda.is_available():
            out["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.reset()
        return out
