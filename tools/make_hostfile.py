#!/usr/bin/env python
"""Write a DeepSpeed hostfile (`host slots=N` per line) from a SLURM allocation or a node list.

Inside a job (what slurm/common.sh runs):
    python tools/make_hostfile.py --slots 8 --output $OUTPUT_DIR/hostfile
By hand, for `deepspeed --hostfile` on machines you reach by ssh:
    python tools/make_hostfile.py --nodelist "gpu[01-02]" --slots 8 > hostfiles/mycluster

The line order is the node order of SLURM_JOB_NODELIST, which is the order of SLURM_NODEID, so
`deepspeed --no_ssh --node_rank $SLURM_NODEID` on each node agrees with the file. Only the standard
library: it runs before (and without) the training environment.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medgpt_ds.errors import UserError, main_boundary  # noqa: E402


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...]: "a[1-2],b" -> ["a[1-2]", "b"]."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range(spec: str) -> list[str]:
    """"01-03,7" -> ["01", "02", "03", "7"] (zero padding kept, as SLURM does)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"bad range {item!r} in node list")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in node list")
        width = len(lo) if lo.startswith("0") else 0
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist expression: "gpu[01-02,05],login1,r[1-2]n[1-2]" -> host names.

    Same result and order as `scontrol show hostnames`, without needing scontrol.
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        names = [""]
        for literal, bracket in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            if not literal and not bracket:
                continue
            names = [n + literal for n in names]
            if bracket:
                names = [n + r for n in names for r in _expand_range(bracket)]
        hosts.extend(names)
    seen = set()
    dups = [h for h in hosts if h in seen or seen.add(h)]
    if dups:
        raise ValueError(f"node list {nodelist!r} names {dups[0]} twice")
    return hosts


def slots_from_env(env=os.environ) -> int | None:
    """GPUs (= ranks) per node from the usual variables, most explicit first."""
    for var in ("GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(var, "").strip()
        if value:
            # SLURM_GPUS_PER_NODE may be "8" or "a100:8"
            m = re.fullmatch(r"(?:[\w-]+:)?(\d+)", value)
            if not m:
                raise ValueError(f"cannot read a GPU count from {var}={value!r}")
            return int(m.group(1))
    return None


def make_hostfile(hosts: list[str], slots: int) -> str:
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if not hosts:
        raise ValueError("empty node list")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


@main_boundary
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodelist", default=None,
                   help="SLURM hostlist expression (default: $SLURM_JOB_NODELIST, then $SLURM_NODELIST)")
    p.add_argument("--slots", type=int, default=None,
                   help="ranks (GPUs) per node (default: $GPUS_PER_NODE, $SLURM_GPUS_ON_NODE, $SLURM_GPUS_PER_NODE)")
    p.add_argument("--output", "-o", default="-", help="file to write (default: stdout)")
    args = p.parse_args(argv)

    nodelist = args.nodelist or os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        p.error("no --nodelist and no SLURM_JOB_NODELIST: run inside a SLURM job or pass --nodelist")
    slots = args.slots if args.slots is not None else slots_from_env()
    if slots is None:
        p.error("no --slots and none of GPUS_PER_NODE/SLURM_GPUS_ON_NODE/SLURM_GPUS_PER_NODE is set")
    try:
        text = make_hostfile(expand_nodelist(nodelist), slots)
    except ValueError as e:
        raise UserError(f"--nodelist {nodelist!r} / --slots {slots}: {e}") from None
    if args.output == "-":
        sys.stdout.write(text)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
