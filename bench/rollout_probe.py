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

from medgpt_ds import generation, vllm_rollout  # noqa: E402

_out = os.path.join(os.environ["MEDGPT_BENCH_TOKENS"], f"rank{os.environ.get('RANK', '0')}.jsonl")


def recorded(generate):
    """``generate`` that also appends its prompts and responses to this rank's token file."""
    def wrapper(self, prompts):
        gen = generate(self, prompts)
        with open(_out, "a") as f:
            f.write(json.dumps({"prompts": [list(map(int, p)) for p in prompts], "responses": gen.responses()}) + "\n")
        return gen
    return wrapper


generation.HFBackend.generate = recorded(generation.HFBackend.generate)  # subclasses (ds_hybrid) inherit it
vllm_rollout.VLLMBackend.generate = recorded(vllm_rollout.VLLMBackend.generate)
sys.argv[0] = os.path.join(ROOT, "launch", "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
