"""Run many trainer runs in ONE multi-rank launch (the `families` tier): a warm 2-rank launch costs
15-30 s of imports, so the tier batches every family's runs here instead of launching each.

    deepspeed --num_gpus 2 tests/families_launch.py RUNS.json

RUNS.json is a list of {"name": ..., "argv": [launch/train.py flags]}; each run goes through the
same parse_args + stage.run as launch/train.py, one after the other in this process. Rank 0 appends
{"name", "seconds"} to RUNS.json + ".done" after each run. Any failure ends the launch (the
launcher then stops every rank), so a broken family shows as that run's traceback.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from medgpt_ds import dist  # noqa: E402
from medgpt_ds.cli import STAGE_MODULES, _shutdown  # noqa: E402
from medgpt_ds.config import _split_stage, parse_args  # noqa: E402


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
        state = module.run(cfg)
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
