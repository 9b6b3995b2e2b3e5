"""Scoring rollouts for ppo and grpo: response log-probs under a policy (and under the reference),
the same log-probs under the top-k / top-p truncated distribution a rollout engine sampled from,
critic values, reward-model scores, and the sequence reward that combines rule rewards and a reward
model. Every function reads a ``Generation`` (generation.py) as it is, left padding included.
"""

from __future__ import annotations

import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from medgpt_ds import rewards
from medgpt_ds.generation import Generation
from medgpt_ds.logprobs import IGNORE_INDEX, token_logprobs


def policy_logprobs(model, gen: Generation, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens under a causal LM (engine or module), and the logits they
    came from: ``(logps (B, R), logits (B, R, V))``, logps zero outside ``gen.response_mask``.

    Only the last R + 1 positions go through the LM head (``logits_to_keep``); the logits are divided
    by the sampling ``temperature`` so the scores match the distribution that was sampled.
    """
    P, R = gen.prompt_length, gen.response_mask.size(1)
    out = model(input_ids=gen.sequences, attention_mask=gen.attention_mask, position_ids=gen.position_ids,
                use_cache=False, logits_to_keep=R + 1)
    logits = out.logits[:, -(R + 1):]  # (B, R + 1, V): positions P-1 .. P+R-1
    if temperature != 1.0:
        logits = logits / temperature
    labels = gen.sequences[:, P - 1:].masked_fill(
        ~torch.cat([torch.zeros_like(gen.response_mask[:, :1]), gen.response_mask], dim=1), IGNORE_INDEX)
    logps, _ = token_logprobs(logits, labels)  # (B, R)
    return logps, logits[:, :-1]


def truncated_logprobs(logits: torch.Tensor, gen: Generation, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Log-probs (B, R) of the response tokens under the distribution a sampler actually draws from:
    ``logits`` (B, R, V; already divided by the temperature, as ``policy_logprobs`` returns them) with
    top-k, then top-p applied (transformers' warpers: the order and tie rules of ``generate`` and of
    vLLM's sampler) and renormalised. This is what vLLM reports with ``--logprobs-mode
    processed_logprobs``; without top-k / top-p it equals the plain log-probs. A token outside the
    kept set gets -inf. Zero outside ``gen.response_mask``.
    """
    B, R, V = logits.shape
    flat = logits.reshape(B * R, V).float()
    if top_k > 0:
        flat = TopKLogitsWarper(top_k)(None, flat)
    if top_p < 1.0:
        flat = TopPLogitsWarper(top_p)(None, flat)
    labels = gen.response_ids.reshape(-1, 1)
    logps = flat.log_softmax(-1).gather(1, labels).view(B, R)
    return logps.masked_fill(~gen.response_mask, 0.0)


def rollout_logprobs(model, gen: Generation, temperature: float, top_k: int = 0,
                     top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward, two readings: the response log-probs (B, R) the losses use, and those under the
    top-k / top-p truncated distribution the tokens were sampled from (``truncated_logprobs``; the same
    tensor when nothing truncates), which a rollout engine's reported log-probs are compared with."""
    logps, logits = policy_logprobs(model, gen, temperature)
    if top_k <= 0 and top_p >= 1.0:
        return logps, logps
    return logps, truncated_logprobs(logits, gen, top_k, top_p)


def reference_logprobs(actor, ref, gen: Generation, temperature: float) -> torch.Tensor:
    """Response log-probs (B, R) under the frozen reference ``ref``, or, when ``ref`` is None (LoRA
    without --ref_model_path), under the actor with its adapter disabled (no second copy)."""
    if ref is None:
        with actor.module.disable_adapter():
            return policy_logprobs(actor, gen, temperature)[0]
    return policy_logprobs(ref, gen, temperature)[0]


def critic_values(critic, gen: Generation) -> torch.Tensor:
    """V(state before each response token) from a token classifier with one label: (B, R) float32."""
    P = gen.prompt_length
    out = critic(input_ids=gen.sequences, attention_mask=gen.attention_mask, position_ids=gen.position_ids,
                 use_cache=False)
    return out.logits[:, P - 1:-1, 0].float()


class LastTokenScore(torch.nn.Module):
    """A sequence classifier (the rm stage's export, num_labels=1) read where transformers and the rm
    stage read it: the last attended token that is not the config's pad id (a response ending in
    eos == pad is read before its eos, as in rm training). Works on left-padded prompts: (B,) float32."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.head = next((getattr(model, n) for n in ("score", "classifier", "v_head") if hasattr(model, n)), None)
        if self.head is None or not hasattr(model, model.base_model_prefix):
            raise ValueError(f"reward model {type(model).__name__}: no score/classifier head or base model found")

    def forward(self, input_ids, attention_mask, position_ids):
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state  # (B, T, H)
        valid = attention_mask.bool()  # (B, T)
        pad = self.model.config.pad_token_id
        if pad is not None:
            not_pad = valid & (input_ids != pad)
            valid = torch.where(not_pad.any(dim=1, keepdim=True), not_pad, valid)
        positions = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(valid)
        last = torch.where(valid, positions, -1).max(dim=1).values  # (B,)
        picked = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (B, H)
        return self.head(picked)[:, 0].float()


def reward_model_scores(reward_engine, gen: Generation) -> torch.Tensor:
    """Scores (B,) of prompt + response from a LastTokenScore engine."""
    return reward_engine(gen.sequences, gen.attention_mask, gen.position_ids)


@torch.no_grad()
def in_chunks(fn, gen: Generation, size: int):
    """``fn(gen rows)`` in chunks of ``size`` rows, concatenated; every rank runs the same number of
    chunks for the same rollout size (ZeRO-3 forwards are collective)."""
    outs = [fn(gen.select(slice(i, i + size))) for i in range(0, len(gen), size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def sequence_rewards(gen: Generation, answers: list, tokenizer, reward_fns: list, reward_engine,
                     reward_model_weight: float, chunk: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sequence rewards (B,) = the weighted rule rewards (``reward_fns``: [(fn, weight)]) on the decoded
    responses + ``reward_model_weight`` x the reward model's score, and each unweighted part (B,) by
    name for the metrics ("reward_model" for the model)."""
    texts = tokenizer.batch_decode(gen.responses(), skip_special_tokens=True)
    device = gen.sequences.device
    total = torch.zeros(len(gen), dtype=torch.float32, device=device)
    parts: dict[str, torch.Tensor] = {}
    if reward_fns:
        summed, per_fn = rewards.combine_rewards(reward_fns, texts, answers)
        total += torch.tensor(summed, dtype=torch.float32, device=device)
        parts = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in per_fn.items()}
    if reward_engine is not None:
        rm = in_chunks(lambda g: reward_model_scores(reward_engine, g), gen, chunk).float()
        total += reward_model_weight * rm
        parts["reward_model"] = rm
    return total, parts
