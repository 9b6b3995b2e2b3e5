"""A generation backend written the way docs/architecture.md tells a newcomer to add one: one file
with a class implementing generation.GenerationBackend, registered with one line in
generation.BACKENDS. tests/test_rollout_backend.py drives it through --stage grpo.

It does not sample: row i of every call answers " yes" (i even) or "no" (i odd) and ends its turn,
so the rule reward ``starts_with_space`` is exactly 0.5 in every group. Every call of the protocol is
appended to the JSON-lines file named by $FAKE_ROLLOUT_LOG.
"""
from __future__ import annotations

import json
import os

import torch

from medgpt_ds import dist
from medgpt_ds.generation import Generation, SamplingParams, left_pad


class EchoBackend:
    """Fixed answers, weight versions reported back, every call logged."""

    def __init__(self, engine, tokenizer, params: SamplingParams, *, zero3: bool, args=None):
        end = params.stop_token_ids[-1]  # the template's end of turn (<|im_end|> for chatml)
        self.answers = [tokenizer(" yes", add_special_tokens=False)["input_ids"] + [end],
                        tokenizer("no", add_special_tokens=False)["input_ids"] + [end]]
        self.pad = params.pad_token_id
        self.version = -1
        self.log_path = os.environ["FAKE_ROLLOUT_LOG"]

    def _log(self, **event) -> None:
        if dist.is_main():
            with open(self.log_path, "a") as f:
                f.write(json.dumps(event) + "\n")

    def generate(self, prompts: list[list[int]]) -> Generation:
        ids, mask = left_pad(prompts, self.pad, dist.device())
        rows = [self.answers[i % 2] for i in range(len(prompts))]
        width = max(len(r) for r in rows)
        responses = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows], device=ids.device)  # (B, R)
        response_mask = torch.tensor([[j < len(r) for j in range(width)] for r in rows], device=ids.device)
        self._log(call="generate", prompts=[list(p) for p in prompts], weight_version=self.version)
        return Generation(torch.cat([ids, responses], dim=1), mask, response_mask,
                          torch.ones(len(prompts), dtype=torch.bool, device=ids.device), steps=width,
                          weight_version=self.version)

    def update_weights(self, step: int) -> None:
        self.version = step
        self._log(call="update_weights", step=step)

    def close(self) -> None:
        self._log(call="close")
