"""A stand-in for launch/train.py that exercises only the multi-node plumbing (no model).

Run by the sbatch templates (TRAIN_SCRIPT=tests/cluster/fake_trainer.py) and by the plain
`deepspeed --no_ssh` test. It follows the trainer's contract where the plumbing depends on it:
prints `rank R/W on host H`, all-reduces over gloo across the nodes, takes `--output_dir`,
`--max_steps`, `--resume_from_checkpoint auto` (reads `<output_dir>/latest`), honours the stop
file and SIGUSR1/SIGTERM (checkpoint + PREEMPTED + exit 0), and MEDGPT_DEBUG_FAIL_RANK/STEP.
Unknown trainer flags are accepted and ignored. Writes `<output_dir>/fake_result.json`.
"""
import argparse
import datetime
import json
import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_steps", type=int, default=3)
    p.add_argument("--resume_from_checkpoint", default=None)
    p.add_argument("--local_rank", type=int, default=0)
    args, _unknown = p.parse_known_args()
    if args.max_steps <= 0:
        args.max_steps = 3
    step_seconds = float(os.environ.get("FAKE_STEP_SECONDS", "0"))

    signalled = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda s, f: signalled.append(s))

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    host = socket.gethostname()
    print(f"rank {rank}/{world} on host {host}", flush=True)

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    hosts = [None] * world
    dist.all_gather_object(hosts, host)

    out = args.output_dir
    latest = os.path.join(out, "latest")
    start = 0
    if args.resume_from_checkpoint == "auto" and os.path.exists(latest):
        start = int(open(latest).read().strip().split("-")[-1])
    fail_rank = int(os.environ.get("MEDGPT_DEBUG_FAIL_RANK", "-1"))
    fail_step = int(os.environ.get("MEDGPT_DEBUG_FAIL_STEP", "-1"))

    step = start
    preempted = False
    while step < args.max_steps:
        step += 1
        if rank == fail_rank and step == fail_step:
            raise RuntimeError(f"MEDGPT_DEBUG_FAIL: rank {rank} fails at step {step}")
        time.sleep(step_seconds)
        if rank == 0:
            print(f"step {step} | loss {1.0 / step:.4f}", flush=True)
        stop = torch.tensor([float(bool(signalled) or (rank == 0 and os.path.exists(os.path.join(out, ".stop"))))])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if stop.item() and step < args.max_steps:
            preempted = True
            break

    dist.barrier()
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        tag = f"checkpoint-{step}"
        os.makedirs(os.path.join(out, tag), exist_ok=True)
        with open(latest, "w") as f:
            f.write(tag)
        if preempted:
            with open(os.path.join(out, "PREEMPTED"), "w") as f:
                json.dump({"step": step}, f)
        else:
            if os.path.exists(os.path.join(out, "PREEMPTED")):
                os.remove(os.path.join(out, "PREEMPTED"))
            with open(os.path.join(out, "fake_result.json"), "w") as f:
                json.dump({"world": world, "sum": t.item(), "hosts": hosts, "start_step": start,
                           "final_step": step, "master": os.environ.get("MASTER_ADDR")}, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
