#!/usr/bin/env python
"""Make a DeepSpeed checkpoint resumable at another world size or ZeRO stage (universal checkpoint).

    python tools/zero_to_universal.py --checkpoint_dir outputs/sft/checkpoint-200
    # -> outputs/sft/checkpoint-200-universal and outputs/sft/latest_universal

Then resume with any number of ranks and ZeRO-1/2/3:
    ... --resume_from_checkpoint outputs/sft/checkpoint-200-universal --load_universal
(DeepSpeed config `"checkpoint": {"load_universal": true}`; `latest_universal` serves a plain
engine.load_checkpoint(outputs/sft)). Parameters, fp32 master weights, Adam moments and step are
re-partitioned; the trainer's state files are copied along. ZeRO-0 checkpoints need no conversion.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medgpt_ds.errors import main_boundary  # noqa: E402


@main_boundary
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint_dir", required=True, help="tag dir (output_dir/checkpoint-N) or output_dir (uses `latest`)")
    ap.add_argument("--output_dir", default=None, help="default: <output_dir>/<tag>-universal")
    ap.add_argument("--workers", type=int, default=1, help="parallel extract/merge processes")
    ap.add_argument("--trust_checkpoint", action="store_true",
                    help="unpickle the checkpoint files without the allow-list of DeepSpeed classes (only for "
                         "checkpoints whose origin you trust)")
    args = ap.parse_args(argv)
    from medgpt_ds.convert import to_universal

    to_universal(args.checkpoint_dir, args.output_dir, workers=args.workers, trust_checkpoint=args.trust_checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
