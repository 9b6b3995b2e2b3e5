#!/usr/bin/env python
"""Single entrypoint for every stage.

    python launch/train.py --stage sft ...                       # one rank
    deepspeed --num_gpus 8 launch/train.py --stage dpo ...       # one node
    deepspeed --hostfile hostfiles/a100x16 launch/train.py ...   # several nodes
    torchrun --nproc_per_node 8 launch/train.py --stage pt ...
    python launch/train.py recipe.yaml --learning_rate 1e-4      # YAML recipe + overrides
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# DeepSpeed JIT-builds its CPU comm op with the first `ninja` on PATH; a different ninja version
# hashes the build differently and rebuilds it (1-2 min) in the shared extensions dir: use ours.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

from medgpt_ds.cli import main  # noqa: E402

if __name__ == "__main__":
    rc = main()  # a user mistake: one `error: ...` line on stderr and 2 (--debug / MEDGPT_DEBUG=1: traceback)
    # A finished run has written, flushed and closed everything (checkpoints, export, metrics) and
    # torn its process group down. Skip the interpreter's teardown: there, torch/gloo/DeepSpeed C++
    # objects are destroyed in arbitrary order and a finished multi-node run occasionally died with
    # SIGABRT ("terminate called without an active exception"), turning a COMPLETED job FAILED.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
