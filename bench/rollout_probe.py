#!/usr/bin/env python
"""launch/train.py with every rollout recorded: the prompt and response token ids of each
generate() call go to $MEDGPT_BENCH_TOKENS/rank<R>.jsonl, so bench_rollout.py can check that
backends produce identical greedy tokens. Launched in place of launch/train.py (same flags)."""
import json
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

try:  # the backends' home (rollout.py is being split into generation.py / advantages.py)
    from medgpt_ds import generation as backends
except ImportError:
    from medgpt_ds import rollout as backends

_generate = backends.HFGenerateBackend.generate
_out = os.path.join(os.environ["MEDGPT_BENCH_TOKENS"], f"rank{os.environ.get('RANK', '0')}.jsonl")


def generate(self, prompts):
    gen = _generate(self, prompts)
    with open(_out, "a") as f:
        f.write(json.dumps({"prompts": [list(map(int, p)) for p in prompts], "responses": gen.responses()}) + "\n")
    return gen


backends.HFGenerateBackend.generate = generate  # subclasses (ds_hybrid) inherit it
sys.argv[0] = os.path.join(ROOT, "launch", "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
