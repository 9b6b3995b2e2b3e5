"""Per-step bookkeeping of every training loop (the offline loop.py, ppo, grpo): resume, advance
the data position, log, checkpoint, stop on request (SIGTERM / SIGUSR1 / a stop file), export.

    run = RunState(cfg, engine, tokenizer, ds_config=..., total_steps=..., steps_per_epoch=...,
                   resume_dir=resume, hf_meta=hf_meta)
    state = run.resume()
    while state.global_step < run.total_steps:
        debug_fault(state.global_step + 1)
        ...  # one optimizer step
        run.after_step(items, record)
        if run.should_stop():
            return state
    return run.finish()
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from medgpt_ds import checkpoint, dist
from medgpt_ds.metrics import MetricsLogger


@dataclass
class TrainState:
    """The resumable position of a run (saved as trainer_state.json with every checkpoint)."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    consumed_items: int = 0
    best_eval_loss: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class StopSignal:
    """SIGTERM / SIGUSR1 (what SLURM sends before a time limit or preemption) or a stop file:
    finish the step, checkpoint, exit."""

    def __init__(self, stop_file: str):
        self.stop_file = stop_file
        self.received: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not in the main thread (e.g. under a test runner thread)
                pass

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        local = 1 if (self.received is not None or (dist.is_main() and os.path.exists(self.stop_file))) else 0
        flag = dist.all_reduce_max(torch.tensor([local], device=dist.device()))
        return bool(flag.item())


def debug_fault(step: int) -> None:
    """Fault injection for the cluster tests: MEDGPT_DEBUG_FAIL_RANK / MEDGPT_DEBUG_FAIL_STEP."""
    r, s = os.environ.get("MEDGPT_DEBUG_FAIL_RANK"), os.environ.get("MEDGPT_DEBUG_FAIL_STEP")
    if r is not None and s is not None and int(r) == dist.rank() and int(s) == step:
        raise RuntimeError(f"MEDGPT_DEBUG_FAIL: rank {dist.rank()} fails at step {step} (fault injection)")


Record = Union[dict, Callable[[], dict]]


class RunState:
    """Resume, per-step bookkeeping, stop and finish of one training run around a DeepSpeed engine.

    ``extra_engines`` (name -> engine, e.g. the PPO critic) are checkpointed and restored with the
    engine; ``extra`` seeds ``state.extra`` of a fresh run (a resume restores the saved one);
    ``export_name`` names the exported model in the log ("model", "actor").
    """

    def __init__(self, cfg, engine, tokenizer, *, ds_config: dict, total_steps: int, steps_per_epoch: int,
                 resume_dir: Optional[str], hf_meta: Callable[[str], None], extra_engines: Optional[dict] = None,
                 extra: Optional[dict] = None, export_name: str = "model"):
        self.cfg, self.engine, self.tokenizer, self.ds_config = cfg, engine, tokenizer, ds_config
        self.total_steps, self.steps_per_epoch, self.resume_dir = total_steps, steps_per_epoch, resume_dir
        self.hf_meta, self.extra_engines, self.export_name = hf_meta, extra_engines or {}, export_name
        self.state = TrainState(extra=dict(extra or {}))
        self.run_config = cfg.to_dict()
        self.logger: Optional[MetricsLogger] = None
        self.stopper = StopSignal(os.path.join(cfg.train.output_dir, ".stop"))
        self.last_saved = -1
        self._window: dict[str, float] = {}
        self._window_steps = 0

    def resume(self) -> TrainState:
        """Load ``resume_dir`` (engine, extra engines, this rank's RNG, the data position) when given,
        and open the metrics log at the resumed step. Returns the run's TrainState."""
        if self.resume_dir:
            saved = checkpoint.load(self.engine, self.resume_dir, load_universal=self.cfg.train.load_universal,
                                    extra_engines=self.extra_engines)
            self.state = TrainState(**{k: v for k, v in saved.items() if k in TrainState.__dataclass_fields__})
            if self.state.step_in_epoch >= self.steps_per_epoch:  # saved at the end of an epoch
                self.state.epoch, self.state.step_in_epoch = self.state.epoch + 1, 0
            self.last_saved = self.state.global_step
            dist.print0(f"resumed from {self.resume_dir} at step {self.state.global_step} (epoch {self.state.epoch}, "
                        f"step {self.state.step_in_epoch} of {self.steps_per_epoch} in the epoch)")
        t = self.cfg.train
        self.logger = MetricsLogger(t.output_dir, t.report_to, t.logging_dir, self.total_steps, self.state.global_step,
                                    config=self.cfg.to_dict())
        return self.state

    def save(self) -> None:
        """Checkpoint now (collective: every rank calls it)."""
        t = self.cfg.train
        checkpoint.save(self.engine, t.output_dir, self.state.to_dict(), run_config=self.run_config,
                        ds_config=self.ds_config, hf_meta=self.hf_meta, save_total_limit=t.save_total_limit,
                        extra_engines=self.extra_engines)
        self.last_saved = self.state.global_step

    def after_step(self, items: int, record: Record) -> None:
        """One optimizer step is done over ``items`` items (all ranks): advance the data position, log
        every --logging_steps and at the last step, checkpoint every --save_steps.

        ``record`` is either this step's metrics (already reduced over ranks; the log shows their mean
        over the steps since the last log) or a callable that returns the record to log, called only
        when a log is due (the offline loop reduces its unit-weighted window there).
        """
        s, t = self.state, self.cfg.train
        s.global_step += 1
        s.step_in_epoch += 1
        s.consumed_items += items
        if s.step_in_epoch >= self.steps_per_epoch:
            s.epoch, s.step_in_epoch = s.epoch + 1, 0
        self.logger.advance()
        if not callable(record):
            for k, v in record.items():
                self._window[k] = self._window.get(k, 0.0) + v
            self._window_steps += 1
        if s.global_step % t.logging_steps == 0 or s.global_step == self.total_steps:
            if callable(record):
                self.logger.log(s.global_step, record())
            else:
                self.logger.log(s.global_step, {k: v / self._window_steps for k, v in self._window.items()})
                self._window, self._window_steps = {}, 0
        if t.save_steps and s.global_step % t.save_steps == 0:
            self.save()

    def should_stop(self) -> bool:
        """A stop was requested on any rank (collective): checkpoint unless this step already is, mark
        the output dir PREEMPTED, close the log and return True; the caller returns ``state``."""
        if not self.stopper.should_stop():
            return False
        if self.last_saved != self.state.global_step:
            self.save()
        out = self.cfg.train.output_dir
        if dist.is_main():
            with open(os.path.join(out, "PREEMPTED"), "w") as f:
                json.dump({"step": self.state.global_step, "time": time.time()}, f)
            if os.path.exists(self.stopper.stop_file):
                os.remove(self.stopper.stop_file)
        self.logger.info(f"stop requested: checkpoint at step {self.state.global_step} written; exiting "
                         "(resume with --resume_from_checkpoint auto)")
        self.logger.close()
        dist.barrier()
        self.state.extra["preempted"] = True
        return True

    def finish(self) -> TrainState:
        """The end of the run: checkpoint the last step, export the model (or LoRA adapter) + tokenizer
        to output_dir (--export_hf), clear a PREEMPTED mark, close the log."""
        t = self.cfg.train
        if self.last_saved != self.state.global_step:
            self.save()
        if t.export_hf:
            is_peft = self.cfg.lora.use_peft
            checkpoint.export_hf(self.engine, self.engine.module, self.tokenizer, t.output_dir, is_peft=is_peft,
                                 zero3=self.ds_config.get("zero_optimization", {}).get("stage") == 3)
            self.logger.info(f"exported {'LoRA adapter' if is_peft else self.export_name} + tokenizer to {t.output_dir}")
        if dist.is_main() and os.path.exists(os.path.join(t.output_dir, "PREEMPTED")):
            os.remove(os.path.join(t.output_dir, "PREEMPTED"))
        self.logger.close()
        return self.state
