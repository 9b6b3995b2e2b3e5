"""DeepSpeed config resolution and engine construction.

DeepSpeed silently DROPS "auto" values (bf16 "auto" becomes False); only the HF Trainer resolves
them. We resolve every "auto" from the run's arguments here, reject anything we cannot resolve,
and check micro batch x grad accumulation x data-parallel size = global batch.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Callable, Optional

import torch

from medgpt_ds import dist
from medgpt_ds.errors import UserError

# ZeRO-0, used when --deepspeed is not given (plain `python launch/train.py` on a laptop).
DEFAULT_DS_CONFIG: dict = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "zero_optimization": {"stage": 0},
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
}


class DSConfigError(UserError):
    pass


def load_ds_config(path: Optional[str]) -> dict:
    """Read a DeepSpeed JSON config (or the built-in ZeRO-0 default) with a clear error."""
    if not path:
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DSConfigError(f"--deepspeed {path}: no such file")
    except json.JSONDecodeError as e:
        raise DSConfigError(f"--deepspeed {path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _resolve(block: dict, key: str, value: Any, where: str) -> None:
    """Fill "auto" (or a missing key) with ``value``; an explicit different value is an error."""
    cur = block.get(key, "auto")
    if cur == "auto":
        block[key] = value
    elif key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps") and cur != value:
        raise DSConfigError(f"DeepSpeed config {where}{key}={cur} disagrees with the run's value {value}; "
                            f"set it to \"auto\" or pass the same value on the command line")


def resolve_ds_config(ds_config: dict, train_args, *, world_size: int, hidden_size: Optional[int] = None,
                      num_training_steps: Optional[int] = None, source: str = "config") -> dict:
    """Return a copy of ``ds_config`` with every "auto" resolved from ``train_args``.

    Checks the batch arithmetic and raises DSConfigError on anything unresolvable. ``world_size`` is
    the data-parallel size (world / sequence-parallel size).
    """
    cfg = copy.deepcopy(ds_config)
    t = train_args
    micro, ga = t.per_device_train_batch_size, t.gradient_accumulation_steps
    _resolve(cfg, "train_micro_batch_size_per_gpu", micro, "")
    _resolve(cfg, "gradient_accumulation_steps", ga, "")
    micro, ga = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    global_batch = micro * ga * world_size
    ranks = "data-parallel" if cfg.get("sequence_parallel_size", 1) > 1 else "world"
    tbs = cfg.get("train_batch_size", "auto")
    if tbs == "auto":
        cfg["train_batch_size"] = global_batch
    elif int(tbs) != global_batch:
        if int(tbs) % (micro * world_size) == 0:
            raise DSConfigError(
                f"{source}: train_batch_size={tbs} but micro {micro} x grad_accum {ga} x {ranks} {world_size} = "
                f"{global_batch}; use --gradient_accumulation_steps {int(tbs) // (micro * world_size)} or \"auto\"")
        raise DSConfigError(
            f"{source}: train_batch_size={tbs} is not divisible by micro batch {micro} x {ranks} size {world_size}")
    if cfg.get("gradient_clipping", "auto") == "auto":
        cfg["gradient_clipping"] = float(t.max_grad_norm)

    for key, flag in (("bf16", t.bf16), ("fp16", t.fp16)):
        block = cfg.setdefault(key, {})
        if block.get("enabled", "auto") == "auto":
            block["enabled"] = bool(flag)
        elif bool(block["enabled"]) != bool(flag):
            raise DSConfigError(f"{source}: {key}.enabled={block['enabled']} but --{key} is {flag}; pass --{key} "
                                f"{block['enabled']} or set it to \"auto\"")
    if cfg["bf16"]["enabled"] and cfg["fp16"]["enabled"]:
        raise DSConfigError(f"{source}: bf16 and fp16 both enabled")

    opt = cfg.get("optimizer")
    if opt is not None:
        p = opt.setdefault("params", {})
        for key, value in (("lr", t.learning_rate), ("betas", [t.adam_beta1, t.adam_beta2]),
                           ("eps", t.adam_epsilon), ("weight_decay", t.weight_decay)):
            if p.get(key, "auto") == "auto":
                p[key] = value
        if "torch_adam" not in p:
            # DeepSpeed's fused/cpu Adam are JIT-compiled C++/CUDA ops (minutes on first launch, and a
            # CUDA toolkit on GPU). torch's AdamW (fused on CUDA) is as fast without the build.
            offload = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
            if offload in ("none", None) or dist.device().type == "cpu":
                p["torch_adam"] = True
                if dist.device().type == "cuda":
                    p["fused"] = True
                if offload not in ("none", None):
                    cfg["zero_force_ds_cpu_optimizer"] = False

    sched = cfg.get("scheduler")
    if sched is not None:
        p = sched.setdefault("params", {})
        warmup = warmup_steps(t, num_training_steps or 0)
        for key, value in (("warmup_min_lr", 0.0), ("warmup_max_lr", t.learning_rate),
                           ("warmup_num_steps", warmup), ("total_num_steps", num_training_steps)):
            if p.get(key) == "auto":
                if value is None:
                    raise DSConfigError(f"{source}: scheduler.params.{key} is auto but the run length is unknown")
                p[key] = value

    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    for key, value in (("reduce_bucket_size", (hidden_size or 1024) ** 2),
                       ("stage3_prefetch_bucket_size", int(0.9 * (hidden_size or 1024) ** 2)),
                       ("stage3_param_persistence_threshold", 10 * (hidden_size or 1024))):
        if zero.get(key) == "auto":
            zero[key] = value
    if zero_stage(cfg) == 3:
        # needed to export a consolidated HF model from partitioned weights
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
        if cfg.get("sequence_parallel_size", 1) > 1 and zero.get("reduce_scatter", True) is False:
            # ZeRO-3 then averages some buckets over the data-parallel size and others over the world
            raise DSConfigError(f"{source}: zero_optimization.reduce_scatter=false with --sequence_parallel_size "
                                "averages ZeRO-3 gradients inconsistently in DeepSpeed; remove the key")
    cfg.setdefault("steps_per_print", 1_000_000_000)

    left = _find_auto(cfg)
    if left:
        raise DSConfigError(f"{source}: cannot resolve \"auto\" for {', '.join(left)}; give explicit values")
    return cfg


def _find_auto(obj: Any, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out += _find_auto(v, f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if obj == "auto" else []


def gradient_average_size(ds_config: dict) -> int:
    """How many ranks DeepSpeed divides the summed gradients by (the loop multiplies the loss by it).

    The data-parallel size (world / sequence-parallel size) for ZeRO-0/1/2; ZeRO-3's reduce-scatter
    averages over its partition group, the whole world, even under sequence parallelism (deepspeed
    0.19.8 stage3.__avg_scatter_grads; tests/test_sequence_parallel.py compares gradient norms)."""
    if zero_stage(ds_config) == 3 and ds_config.get("sequence_parallel_size", 1) > 1:
        return dist.world_size()
    return dist.dp_world_size()


def warmup_steps(train_args, num_training_steps: int) -> int:
    if train_args.warmup_steps > 0:
        return train_args.warmup_steps
    return int(round(train_args.warmup_ratio * num_training_steps))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases and norm weights (as the HF Trainer does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def init_train_engine(model: torch.nn.Module, ds_config: dict, train_args, num_training_steps: int):
    """deepspeed.initialize with our optimizer groups and a transformers LR schedule."""
    import deepspeed
    from transformers import get_scheduler

    scheduler: Optional[Callable] = None
    if "scheduler" not in ds_config:
        def scheduler(optimizer):  # noqa: E306 - DeepSpeed calls this with the optimizer it built
            return get_scheduler(train_args.lr_scheduler_type, optimizer,
                                 num_warmup_steps=warmup_steps(train_args, num_training_steps),
                                 num_training_steps=num_training_steps)
    if "optimizer" not in ds_config:
        raise DSConfigError("the DeepSpeed config needs an optimizer block (e.g. AdamW with \"auto\" params)")
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, train_args.weight_decay), config=ds_config,
        lr_scheduler=scheduler, mpu=dist.sp_mpu())
    return engine, optimizer, lr_scheduler


def frozen_ds_config(train_ds_config: dict, offload_params: bool = False) -> dict:
    """Optimizer-free config for a frozen model (reference / reward): ZeRO-3 partitioned when
    training is ZeRO-3 (optionally params offloaded to CPU), else plain (stage 0) replicas."""
    cfg = {k: copy.deepcopy(train_ds_config[k]) for k in
           ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "bf16", "fp16",
            "sequence_parallel_size")
           if k in train_ds_config}
    if zero_stage(train_ds_config) == 3:
        z = train_ds_config["zero_optimization"]
        cfg["zero_optimization"] = {
            "stage": 3,
            "stage3_param_persistence_threshold": z.get("stage3_param_persistence_threshold", 100000),
        }
        if offload_params:
            cfg["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": dist.on_cuda()}
    else:
        cfg["zero_optimization"] = {"stage": 0}
    cfg["steps_per_print"] = 1_000_000_000
    return cfg


def init_frozen_engine(model: torch.nn.Module, ds_config: dict):
    """An optimizer-free DeepSpeed engine for inference-only models."""
    import deepspeed

    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, mpu=dist.sp_mpu())
    engine.eval()
    return engine


def build_ds_config(cfg, *, hidden_size: Optional[int], num_training_steps: int) -> dict:
    """Load --deepspeed (or the ZeRO-0 default), resolve it, write it to output_dir (rank 0).

    With sequence parallelism (dist.init_sequence_parallel first) the batch arithmetic uses the
    data-parallel size world / N, and ``sequence_parallel_size`` tells DeepSpeed (zero.Init and every
    engine) the same."""
    raw = load_ds_config(cfg.train.deepspeed)
    if cfg.train.load_universal:  # must be known at initialize time, not only at load
        raw.setdefault("checkpoint", {})["load_universal"] = True
    if dist.sp_size() > 1:
        raw["sequence_parallel_size"] = dist.sp_size()
    resolved = resolve_ds_config(raw, cfg.train, world_size=dist.dp_world_size(), hidden_size=hidden_size,
                                 num_training_steps=num_training_steps, source=cfg.train.deepspeed or "default config")
    if dist.is_main():
        with open(f"{cfg.train.output_dir}/ds_config.json", "w") as f:
            json.dump(resolved, f, indent=2)
    return resolved
