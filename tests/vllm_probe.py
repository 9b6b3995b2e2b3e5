"""launch/train.py with ``--rollout_backend vllm_probe``: the real vLLM backend, plus a check after
every weight sync that vLLM serves exactly the trainer's current weights.

After each generate that pushed weights (the first rollout of a run included, so a resumed run is
checked too), every rank asks vLLM for greedy answers to the fixed prompts in $VLLM_PROBE_PROMPTS
(token ids, JSON) at the version just pushed, runs transformers' greedy generate on the trainer's own
weights (ZeRO-3 shards gathered, as the hybrid backend does), scores vLLM's tokens with the trainer
(temperature 1) and appends one JSON line per rank to $VLLM_PROBE_LOG: the version, both token lists,
the largest log-prob difference and the smallest top-2 logit margin on transformers' greedy path (a
near-tie would make an exact comparison ill-posed). Greedy decoding draws no random numbers, so the
run's own rollouts are unchanged. tests/test_vllm_rollout.py launches it.
"""
from __future__ import annotations

import json
import os
import runpy
import sys
from contextlib import nullcontext

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from medgpt_ds import dist, generation  # noqa: E402
from medgpt_ds.vllm_rollout import VLLMBackend  # noqa: E402


class ProbedVLLMBackend(VLLMBackend):
    """VLLMBackend that checks vLLM against transformers after every push."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.probe_prompts = json.loads(os.environ["VLLM_PROBE_PROMPTS"])
        self.probe_log = os.environ["VLLM_PROBE_LOG"]
        self.zero3 = kwargs["zero3"]
        self.probed: object = "never"

    @torch.no_grad()
    def generate(self, prompts):
        gen = super().generate(prompts)
        if self.version != self.probed:
            self.probed = self.version
            self._probe()
        return gen

    def _probe(self) -> None:
        stop = list(self.params.stop_token_ids)
        max_tokens = int(os.environ.get("VLLM_PROBE_TOKENS", "8"))
        client = self.impl.client
        ours = client.generate(self.probe_prompts, max_tokens=max_tokens, temperature=0.0, stop_token_ids=stop,
                               expect_version=self.version)
        vllm_tokens = [o[0].token_ids for o in ours]
        vllm_logps = [o[0].logprobs for o in ours]
        context = generation.gathered_for_generation(self.engine) if self.zero3 else nullcontext(self.engine.module)
        was_training = self.engine.module.training
        self.engine.eval()
        hf_tokens, diffs, margins = [], [], []
        try:
            with context as model:
                for prompt, toks, lps in zip(self.probe_prompts, vllm_tokens, vllm_logps):
                    ids = torch.tensor([prompt], device=dist.device())
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                         do_sample=False, eos_token_id=stop, pad_token_id=self.params.pad_token_id,
                                         temperature=None, top_p=None, top_k=None, use_cache=True)
                    hf = out[0, len(prompt):].tolist()
                    if stop and any(t in stop for t in hf):  # generate pads after the stop token
                        hf = hf[:next(i for i, t in enumerate(hf) if t in stop) + 1]
                    hf_tokens.append(hf)
                    full = torch.tensor([prompt + hf], device=dist.device())
                    logits = model(input_ids=full, use_cache=False).logits[0, len(prompt) - 1:-1].float()
                    top2 = logits.topk(2, dim=-1).values
                    margins.append(float((top2[:, 0] - top2[:, 1]).min()))
                    scored = torch.tensor([prompt + toks], device=dist.device())
                    lp = model(input_ids=scored, use_cache=False).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
                    mine = lp.gather(1, torch.tensor(toks, device=lp.device)[:, None])[:, 0]
                    diffs.append(float((mine - torch.tensor(lps, device=lp.device)).abs().max()))
        finally:
            self.engine.train(was_training)
        with open(f"{self.probe_log}.rank{dist.rank()}", "a") as f:
            f.write(json.dumps({"version": self.version, "vllm": vllm_tokens, "hf": hf_tokens, "max_logprob_diff":
                                max(diffs), "min_margin": min(margins), "adapter": client.adapter}) + "\n")


if __name__ == "__main__":
    generation.BACKENDS["vllm_probe"] = "tests.vllm_probe:ProbedVLLMBackend"
    sys.argv[0] = os.path.join(ROOT, "launch", "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
