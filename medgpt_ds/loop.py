"""The offline training loop shared by pt / sft / rm / dpo / orpo.

A stage hands over its tokenized items, a collator and a loss function that returns the SUM of
its loss over the batch's units (label tokens for LM losses, pairs for preference losses). The
loop divides by the number of units in the whole optimizer step across all ranks and micro
batches, so the update is the exact global mean whatever the micro batch / grad accumulation /
world size split (engine.backward scales by 1/grad_accum and DeepSpeed averages over ranks; we
multiply both back).
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from medgpt_ds import checkpoint, dist
from medgpt_ds.metrics import MetricsLogger, Throughput

LossFn = Callable[[object, dict], tuple[torch.Tensor, dict]]


def epoch_order(n_items: int, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
    """The global item order of one epoch (same on every rank)."""
    if not shuffle:
        return list(range(n_items))
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n_items, generator=g).tolist()


def rank_micro_batches(n_items: int, epoch: int, seed: int, micro: int, ga: int, rank: int, world: int,
                       shuffle: bool = True) -> list[list[int]]:
    """This rank's micro batches for one epoch: an equal number on every rank (whole optimizer
    steps), so collectives line up; the remainder is reported by ``epoch_layout``."""
    order = epoch_order(n_items, epoch, seed, shuffle)
    per_step = micro * ga * world
    usable = (n_items // per_step) * per_step
    mine = order[:usable][rank::world]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


def epoch_layout(n_items: int, micro: int, ga: int, world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, items left out of each epoch)."""
    per_step = micro * ga * world
    return n_items // per_step, n_items % per_step


@dataclass
class TrainState:
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


def _debug_fault(step: int) -> None:
    """Fault injection for the cluster tests: MEDGPT_DEBUG_FAIL_RANK / MEDGPT_DEBUG_FAIL_STEP."""
    r, s = os.environ.get("MEDGPT_DEBUG_FAIL_RANK"), os.environ.get("MEDGPT_DEBUG_FAIL_STEP")
    if r is not None and s is not None and int(r) == dist.rank() and int(s) == step:
        raise RuntimeError(f"MEDGPT_DEBUG_FAIL: rank {dist.rank()} fails at step {step} (fault injection)")


def _to_device(batch: dict) -> dict:
    dev = dist.device()
    return {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def evaluate(engine, items: list, collate: Callable, loss_fn: LossFn, micro: int, unit_key: str) -> dict:
    """Global mean eval loss (+ metrics, perplexity) over all ranks. Every rank runs the same number
    of forwards (ZeRO-3 gathers are collective); padding slots contribute zero weight."""
    world, rank = dist.world_size(), dist.rank()
    n = len(items)
    n_batches = math.ceil(n / (world * micro))
    sums: dict[str, float] = {}
    loss_sum = torch.zeros((), dtype=torch.float64)
    units = torch.zeros((), dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        for b in range(n_batches):
            idx = [b * world * micro + rank + world * j for j in range(micro)]
            real = [i for i in idx if i < n]
            batch = _to_device(collate([items[i] for i in (real or [0])]))
            loss, metrics = loss_fn(engine, batch)
            w = 1.0 if real else 0.0
            loss_sum += w * loss.detach().double().cpu()
            units += w * float(batch[unit_key])
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + w * float(v)
    engine.train()
    keys = sorted(sums)
    t = torch.tensor([loss_sum.item(), units.item()] + [sums[k] for k in keys], dtype=torch.float64,
                     device=dist.device())
    dist.all_reduce_sum(t)
    denom = max(t[1].item(), 1.0)
    out = {"loss": t[0].item() / denom}
    out.update({k: t[2 + i].item() / denom for i, k in enumerate(keys)})
    if unit_key == "num_label_tokens":
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    out["units"] = int(t[1].item())
    return out


def train(*, cfg, engine, model, tokenizer, ds_config: dict, train_items: list, eval_items: list,
          collate: Callable, eval_collate: Optional[Callable] = None, loss_fn: LossFn, unit_key: str,
          total_steps: int, hf_meta: Callable, num_params: int, resume_dir: Optional[str]) -> TrainState:
    """Run the offline loop to ``total_steps``; checkpoint, evaluate, log; export HF at the end."""
    t = cfg.train
    world, rank = dist.world_size(), dist.rank()
    micro, ga = t.per_device_train_batch_size, t.gradient_accumulation_steps
    steps_per_epoch, leftover = epoch_layout(len(train_items), micro, ga, world)
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train_items)} training items cannot fill one optimizer step of "
                         f"{micro} x {ga} x {world} = {micro * ga * world}; lower the batch size or add data")
    state = TrainState()
    if resume_dir:
        state = TrainState(**checkpoint.load(engine, resume_dir, load_universal=t.load_universal))
        dist.print0(f"resumed from {resume_dir} at step {state.global_step} (epoch {state.epoch}, "
                    f"step {state.step_in_epoch} of {steps_per_epoch})")
    logger = MetricsLogger(t.output_dir, t.report_to, t.logging_dir, total_steps, state.global_step)
    if leftover:
        logger.info(f"data: {leftover} of {len(train_items)} items per epoch do not fill a whole optimizer step "
                    f"of {micro * ga * world} and are left out of that epoch (a different set each epoch)")
    stopper = StopSignal(os.path.join(t.output_dir, ".stop"))
    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    is_peft = cfg.lora.use_peft
    thr = Throughput.for_model(model, ds_config, num_params)  # tokens/s, TFLOP/s, MFU (metrics.py)
    run_config = cfg.to_dict()

    def save() -> None:
        checkpoint.save(engine, t.output_dir, state.to_dict(), run_config=run_config, ds_config=ds_config,
                        hf_meta=hf_meta, save_total_limit=t.save_total_limit)

    def run_eval() -> None:
        if eval_items:
            res = evaluate(engine, eval_items, eval_collate or collate, loss_fn, t.per_device_eval_batch_size, unit_key)
            logger.log(state.global_step, res, prefix="eval")

    last_saved = state.global_step if resume_dir else -1
    window = {"loss": 0.0, "units": 0.0, "n": 0}
    win_metrics: dict[str, float] = {}
    engine.train()
    while state.global_step < total_steps:
        batches = rank_micro_batches(len(train_items), state.epoch, t.seed, micro, ga, rank, world)
        while state.step_in_epoch < steps_per_epoch and state.global_step < total_steps:
            _debug_fault(state.global_step + 1)
            start = state.step_in_epoch * ga
            step_batches = [collate([train_items[i] for i in idx]) for idx in batches[start:start + ga]]
            counts = torch.tensor([sum(float(b[unit_key]) for b in step_batches),
                                   sum(float(b["num_tokens"]) for b in step_batches),
                                   sum(float(b["input_ids"].numel()) for b in step_batches)],
                                  dtype=torch.float64, device=dist.device())
            dist.all_reduce_sum(counts)
            global_units = max(counts[0].item(), 1.0)
            scale = ga * world / global_units
            step_loss = 0.0
            step_metrics: dict[str, float] = {}
            for batch in step_batches:
                batch = _to_device(batch)
                loss_sum, metrics = loss_fn(engine, batch)
                engine.backward(loss_sum * scale)
                engine.step()
                step_loss += loss_sum.detach().float().item()
                for k, v in metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + float(v)
            state.global_step += 1
            state.step_in_epoch += 1
            state.consumed_items += micro * ga * world
            thr.add(int(counts[1].item()), int(counts[2].item()), step_batches)
            window["loss"] += step_loss
            window["units"] += counts[0].item()
            window["n"] += 1
            for k, v in step_metrics.items():
                win_metrics[k] = win_metrics.get(k, 0.0) + v
            logger.advance()

            if state.global_step % t.logging_steps == 0 or state.global_step == total_steps:
                keys = sorted(win_metrics)
                red = torch.tensor([window["loss"]] + [win_metrics[k] for k in keys], dtype=torch.float64,
                                   device=dist.device())
                dist.all_reduce_sum(red)
                denom = max(window["units"], 1.0)
                rec = {"loss": red[0].item() / denom}
                rec.update({k: red[1 + i].item() / denom for i, k in enumerate(keys)})
                rec["lr"] = engine.get_lr()[0]
                rec["epoch"] = state.epoch + state.step_in_epoch / steps_per_epoch
                gn = engine.get_global_grad_norm()
                if gn is not None:
                    rec["grad_norm"] = float(gn)
                rec.update(thr.read())
                logger.log(state.global_step, rec)
                window = {"loss": 0.0, "units": 0.0, "n": 0}
                win_metrics = {}
            if t.eval_steps and state.global_step % t.eval_steps == 0:
                run_eval()
            if t.save_steps and state.global_step % t.save_steps == 0:
                save()
                last_saved = state.global_step
            if stopper.should_stop():
                if last_saved != state.global_step:
                    save()
                if dist.is_main():
                    with open(os.path.join(t.output_dir, "PREEMPTED"), "w") as f:
                        json.dump({"step": state.global_step, "time": time.time()}, f)
                    if os.path.exists(stopper.stop_file):
                        os.remove(stopper.stop_file)
                logger.info(f"stop requested: checkpoint at step {state.global_step} written; exiting "
                            "(resume with --resume_from_checkpoint auto)")
                logger.close()
                dist.barrier()
                state.extra["preempted"] = True
                return state
        if state.step_in_epoch >= steps_per_epoch:
            state.epoch += 1
            state.step_in_epoch = 0

    if (t.eval_steps or t.do_eval) and not (t.eval_steps and state.global_step % t.eval_steps == 0):
        run_eval()
    if last_saved != state.global_step:
        save()
    if t.export_hf:
        checkpoint.export_hf(engine, engine.module, tokenizer, t.output_dir, is_peft=is_peft, zero3=zero3)
        logger.info(f"exported {'LoRA adapter' if is_peft else 'model'} + tokenizer to {t.output_dir}")
    if dist.is_main() and os.path.exists(os.path.join(t.output_dir, "PREEMPTED")):
        os.remove(os.path.join(t.output_dir, "PREEMPTED"))
    logger.close()
    return state
