"""The offline training loop shared by pt / sft / rm / dpo / orpo.

A stage hands over its tokenized items, a collator and a loss function that returns the SUM of
its loss over the batch's units (label tokens for LM losses, pairs for preference losses). The
loop divides by the number of units in the whole optimizer step across all ranks and micro
batches, so the update is the exact global mean whatever the micro batch / grad accumulation /
world size split (engine.backward scales by 1/grad_accum and DeepSpeed averages over ranks; we
multiply both back).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from medgpt_ds import dist, engine as eng
from medgpt_ds.errors import UserError
from medgpt_ds.metrics import Throughput
from medgpt_ds.run_state import RunState, TrainState, debug_fault

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


def _to_device(batch: dict) -> dict:
    dev = dist.device()
    return {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def evaluate(engine, items: list, collate: Callable, loss_fn: LossFn, micro: int, unit_key: str) -> dict:
    """Global mean eval loss (+ metrics, perplexity) over all ranks. Every rank runs the same number
    of forwards (ZeRO-3 gathers are collective); padding slots contribute zero weight. Items are split
    over data-parallel ranks (the ranks of a sequence-parallel group share theirs)."""
    world, rank = dist.dp_world_size(), dist.dp_rank()
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
    tot = dist.all_reduce_dict({"loss": loss_sum.item(), "units": units.item(), **sums})
    denom = max(tot["units"], 1.0)
    out = {k: v / denom for k, v in tot.items() if k != "units"}
    if unit_key == "num_label_tokens":
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    out["units"] = int(tot["units"])
    return out


def train(*, cfg, engine, model, tokenizer, ds_config: dict, train_items: list, eval_items: list,
          collate: Callable, eval_collate: Optional[Callable] = None, loss_fn: LossFn, unit_key: str,
          total_steps: int, hf_meta: Callable, num_params: int, resume_dir: Optional[str]) -> TrainState:
    """Run the offline loop to ``total_steps``; checkpoint, evaluate, log; export HF at the end."""
    t = cfg.train
    # data-parallel layout: the ranks of a sequence-parallel group take the same items (each its own
    # slice of their tokens, whose unit counts and loss sums add up over the group)
    world, rank = dist.dp_world_size(), dist.dp_rank()
    micro, ga = t.per_device_train_batch_size, t.gradient_accumulation_steps
    steps_per_epoch, leftover = epoch_layout(len(train_items), micro, ga, world)
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_items)} training items cannot fill one optimizer step of "
                        f"{micro} x {ga} x {world} = {micro * ga * world}; lower the batch size or add data")
    run = RunState(cfg, engine, tokenizer, ds_config=ds_config, total_steps=total_steps,
                   steps_per_epoch=steps_per_epoch, resume_dir=resume_dir, hf_meta=hf_meta)
    state = run.resume()
    if leftover:
        run.logger.info(f"data: {leftover} of {len(train_items)} items per epoch do not fill a whole optimizer step "
                        f"of {micro * ga * world} and are left out of that epoch (a different set each epoch)")
    grad_average = eng.gradient_average_size(ds_config)  # engine.step divides summed gradients by it
    thr = Throughput.for_model(model, ds_config, num_params)  # tokens/s, TFLOP/s, MFU (metrics.py)

    def run_eval() -> None:
        if eval_items:
            res = evaluate(engine, eval_items, eval_collate or collate, loss_fn, t.per_device_eval_batch_size, unit_key)
            run.logger.log(state.global_step, res, prefix="eval")

    # the loss and metric sums of the steps since the last log, reduced over ranks when it is due
    window = {"loss": 0.0, "units": 0.0}
    win_metrics: dict[str, float] = {}

    def record() -> dict:
        nonlocal window, win_metrics
        red = dist.all_reduce_dict({"loss": window["loss"], **win_metrics})
        denom = max(window["units"], 1.0)
        rec = {k: v / denom for k, v in red.items()}
        rec["lr"] = engine.get_lr()[0]
        rec["epoch"] = state.epoch + state.step_in_epoch / steps_per_epoch
        gn = engine.get_global_grad_norm()
        if gn is not None:
            rec["grad_norm"] = float(gn)
        rec.update(thr.read())
        window, win_metrics = {"loss": 0.0, "units": 0.0}, {}
        return rec

    batches, batches_epoch = [], None
    engine.train()
    while state.global_step < total_steps:
        if batches_epoch != state.epoch:
            batches = rank_micro_batches(len(train_items), state.epoch, t.seed, micro, ga, rank, world)
            batches_epoch = state.epoch
        debug_fault(state.global_step + 1)
        start = state.step_in_epoch * ga
        step_batches = [collate([train_items[i] for i in idx]) for idx in batches[start:start + ga]]
        counts = torch.tensor([sum(float(b[unit_key]) for b in step_batches),
                               sum(float(b["num_tokens"]) for b in step_batches),
                               sum(float(b["input_ids"].numel()) for b in step_batches)],
                              dtype=torch.float64, device=dist.device())
        dist.all_reduce_sum(counts)
        global_units = max(counts[0].item(), 1.0)
        scale = ga * grad_average / global_units
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
        thr.add(int(counts[1].item()), int(counts[2].item()), step_batches)
        window["loss"] += step_loss
        window["units"] += counts[0].item()
        for k, v in step_metrics.items():
            win_metrics[k] = win_metrics.get(k, 0.0) + v
        run.after_step(micro * ga * world, record)
        if t.eval_steps and state.global_step % t.eval_steps == 0:
            run_eval()
        if run.should_stop():
            return state

    if (t.eval_steps or t.do_eval) and not (t.eval_steps and state.global_step % t.eval_steps == 0):
        run_eval()
    return run.finish()
