"""Run many trainer runs in ONE multi-rank launch (the `families` tier): a warm 2-rank launch costs
15-30 s of imports, so the tier batches every family's runs here instead of launching each.

    deepspeed --num_gpus 2 tests/families_launch.py RUNS.json

RUNS.json is a list of {"name": ..., "argv": [launch/train.py flags]}; each run goes through the
same parse_args + stage.run as launch/train.py, one after the other in this process. Rank 0 appends
{"name", "seconds"} to RUNS.json + ".done" after each run. Any failure ends the launch (the
launcher then stops every rank), so a broken family shows as that run's traceback. A run with
"engine_report": PATH also writes, per rank, PATH.rank<R>.json about the training engine right after
deepspeed.initialize: "params" {parameter: [class, full numel, numel held by this rank]} (what ZeRO-3
really partitioned) and "checkpointed_layers" (decoder layers that recompute their activations).
Other tiers (gradient checkpointing, QLoRA: tests/test_memory_savers.py) batch their runs here too.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from medgpt_ds import dist, engine  # noqa: E402
from medgpt_ds.cli import STAGE_MODULES, _shutdown  # noqa: E402
from medgpt_ds.config import _split_stage, parse_args  # noqa: E402


def _report(module) -> dict:
    from transformers.modeling_layers import GradientCheckpointingLayer

    params = {}
    for name, p in module.named_parameters():
        local = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        params[name] = [type(p).__name__, int(getattr(p, "ds_numel", p.numel())), int(local)]
    layers = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
    return {"params": params, "checkpointed_layers": sum(bool(m.gradient_checkpointing) for m in layers)}


def _reporting(path):
    """engine.init_train_engine that also writes the report of the engine it built."""
    build = engine.init_train_engine

    def init_train_engine(*args, **kwargs):
        built = build(*args, **kwargs)
        with open(f"{path}.rank{dist.rank()}.json", "w") as f:
            json.dump(_report(built[0].module), f)
        return built

    return init_train_engine


def main() -> int:
    path = sys.argv[-1]
    with open(path) as f:
        runs = json.load(f)
    done = []
    for run in runs:
        stage = _split_stage(list(run["argv"]))
        module = importlib.import_module(STAGE_MODULES[stage])
        cfg = parse_args(list(run["argv"]), {stage: getattr(module, "Arguments", None)})
        start = time.time()
        if os.environ.get("RANK", "0") == "0":
            print(f"=== families: {run['name']}", flush=True)
        plain = engine.init_train_engine
        if run.get("engine_report"):
            engine.init_train_engine = _reporting(run["engine_report"])
        try:
            state = module.run(cfg)
        finally:
            engine.init_train_engine = plain
        if state is None:
            raise RuntimeError(f"{run['name']}: the stage returned no state")
        done.append({"name": run["name"], "seconds": round(time.time() - start, 2)})
        if dist.is_main():
            with open(path + ".done", "w") as f:
                json.dump(done, f, indent=1)
    _shutdown()
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)  # as launch/train.py: skip the interpreter's teardown of gloo / DeepSpeed objects
