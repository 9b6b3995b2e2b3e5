"""Training losses for every stage: pure functions, tensors in, ``(loss, metrics)`` out.

Rules for this module: no engine, no device moves, no collectives; ``metrics`` holds detached
0-dim tensors (the caller decides when to sync them to host). Each loss cites its equation.

Token-level reductions take ``num_tokens``: when given, ``loss = masked_sum / num_tokens``, else the
local masked mean. Pass a count computed across ranks and micro-batches to make the reduction
data-parallel invariant. DeepSpeed AVERAGES gradients over the ``dp`` ranks and ``engine.backward``
scales by ``1/GA``, so to get ``sum over the window / tokens in the window`` pass
``num_tokens = tokens_in_window / (dp * GA)`` (the mean token count per micro-batch).
Sequence-level losses (rm, dpo, orpo, simpo) are a mean over the local batch, which is invariant
when every micro-batch has the same number of pairs.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from medgpt_ds.logprobs import IGNORE_INDEX, scored_logprobs

Metrics = dict[str, torch.Tensor]


def _masked_reduce(x: torch.Tensor, mask: torch.Tensor, num_tokens: float | torch.Tensor | None) -> torch.Tensor:
    """``sum(x * mask) / num_tokens`` when given, else the masked mean (0 for an empty mask)."""
    mask = mask.to(x.dtype)
    total = (x * mask).sum()
    if num_tokens is None:
        return total / mask.sum().clamp(min=1.0)
    return total / num_tokens


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached local masked mean, for metrics."""
    return _masked_reduce(x.detach().to(torch.float32), mask, None)


# --- pt / sft ---------------------------------------------------------------------------------


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_tokens: float | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, Metrics]:
    """Next-token cross entropy ``-1/N sum_t log p(x_{t+1} | x_<=t)`` (Radford et al. 2018, eq. 1).

    Args:
        logits: (B, T, V); labels: (B, T) with ``ignore_index`` on unscored positions. The shift is done
            here (logits[:, :-1] predict labels[:, 1:]); packed rows must carry ``ignore_index`` on the
            first token of each sample so no sample is scored from its neighbour.
        num_tokens: global scored-token count (see module docstring); default: the local count.

    Metrics: ``nll`` (local token mean, detached), ``num_tokens`` (local scored-token count).
    """
    shift_logits = logits[:, :-1].flatten(0, 1).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].flatten()  # (B*(T-1),)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    count = (shift_labels != ignore_index).sum()
    local_mean = total / count.clamp(min=1)
    loss = local_mean if num_tokens is None else total / num_tokens
    return loss, {"nll": local_mean.detach(), "num_tokens": count.detach()}


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor | None = None,
    num_tokens: float | torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    chunk_size: int = 1024,
    frozen_head: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, Metrics]:
    """:func:`causal_lm_loss` of ``head(hidden)`` without ever holding the (tokens x vocab) logits.

    Only the scored positions go through ``head``, ``chunk_size`` tokens at a time
    (logprobs.scored_logprobs: checkpointed chunks, or per-token gradients for a frozen head), so the
    loss's memory is one chunk's fp32 logits whatever the sequence length. Values and gradients equal
    the plain loss up to the order of the fp32 sums.

    Args:
        hidden: (B, T, H) final hidden states; ``head`` maps (N, H) -> (N, V) logits exactly as the
            model does (output embedding plus any logit scaling or soft-capping).
        labels: (B, T), shifted here like :func:`causal_lm_loss`; or ``shift_labels`` (B, T) already
            shifted (position t is scored against ``shift_labels[:, t]``, as a sequence-parallel shard is).
        num_tokens: see the module docstring.
        frozen_head: the head's weights take no gradient (LoRA).

    Metrics: ``nll`` (local token mean, detached), ``num_tokens`` (local scored-token count).
    """
    if (labels is None) == (shift_labels is None):
        raise ValueError("pass exactly one of labels and shift_labels")
    if shift_labels is None:
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # (B, T)
    flat_hidden = hidden.reshape(-1, hidden.size(-1))  # (B*T, H)
    flat_labels = shift_labels.reshape(-1)  # (B*T,)
    keep = (flat_labels != ignore_index).nonzero().squeeze(-1)  # (N,)
    logps = scored_logprobs(flat_hidden.index_select(0, keep), flat_labels.index_select(0, keep), head, chunk_size,
                            frozen_head)  # (N,)
    total = -logps.float().sum()
    count = keep.new_tensor(keep.numel())
    local_mean = total / count.clamp(min=1)
    loss = local_mean if num_tokens is None else total / num_tokens
    return loss, {"nll": local_mean.detach(), "num_tokens": count}


# --- reward model -----------------------------------------------------------------------------


def rm_pairwise_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_rewards_coef: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry pairwise loss ``-log sigmoid(r_c - r_r - m)`` (InstructGPT, Ouyang et al. 2022, eq. 1).

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards.
        margin: optional (B,) or scalar preference margin (Llama 2, Touvron et al. 2023, eq. 2).
        center_rewards_coef: adds ``coef * mean((r_c + r_r)^2)`` to keep rewards centred (Eisenstein et al. 2023),
            as TRL's ``center_rewards_coefficient``.

    Metrics: ``accuracy``, ``margin`` (mean r_c - r_r), ``rewards/chosen``, ``rewards/rejected``.
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    if center_rewards_coef:
        loss = loss + center_rewards_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    diff = diff.detach().float()
    metrics = {
        "accuracy": (diff > 0).float().mean(),
        "margin": diff.mean(),
        "rewards/chosen": chosen_rewards.detach().float().mean(),
        "rewards/rejected": rejected_rewards.detach().float().mean(),
    }
    return loss, metrics


# --- offline preference optimisation ----------------------------------------------------------


def _preference_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> Metrics:
    chosen_rewards, rejected_rewards = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().float().mean(),
        "logps/rejected": rejected_logps.detach().float().mean(),
    }


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """DPO ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` (Rafailov et al. 2023, eq. 7), batch mean.

    Args:
        *_logps: (B,) sequence log-probs of the completions (summed over completion tokens), except for
            ``ipo``: pass per-token MEAN log-probs (``sequence_logprobs(..., average=True)``) for policy AND
            reference; this reproduces TRL 1.16, which divides each log-ratio by its completion length.
        loss_type:
            ``sigmoid`` — with ``label_smoothing = eps`` the conservative cDPO form
            ``-(1-eps) log s(bh) - eps log s(-bh)`` (Mitchell 2023). NOTE: TRL 1.16's ``sigmoid`` ignores
            label_smoothing; its ``aot`` loss uses this same expression on sorted log-ratios.
            ``ipo`` — ``(h - 1/(2 beta))^2`` (Azar et al. 2023, eq. 17; beta is tau).
            ``hinge`` — ``relu(1 - beta h)`` (SLiC, Zhao et al. 2023, eq. 3).
            ``robust`` — ``((1-eps)(-log s(bh)) + eps log s(-bh)) / (1 - 2 eps)`` (rDPO, Chowdhury et al. 2024, eq. 8).

    Metrics (as TRL, with rewards = beta * log-ratio): ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        losses = (
            -(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)
        ) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"unknown dpo loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    metrics = _preference_metrics(
        beta * chosen_logratios, beta * rejected_logratios, policy_chosen_logps, policy_rejected_logps
    )
    return losses.mean(), metrics


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, stable on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_logps_avg: torch.Tensor,
    rejected_logps_avg: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """ORPO ``L_SFT - beta * mean log sigmoid(log odds(y_c) - log odds(y_r))`` (Hong et al. 2024, eq. 6-7).

    Args:
        chosen_logps_avg, rejected_logps_avg: (B,) per-token MEAN log-probs of the completions
            (``sequence_logprobs(..., average=True)``), as TRL; must be < 0.
        chosen_nll: scalar SFT loss on the chosen sequences (e.g. :func:`causal_lm_loss` on the chosen half).
        beta: lambda of the paper.

    Metrics: the preference metrics with rewards = beta * avg log-prob (as TRL), plus ``nll_loss``,
    ``log_odds_ratio`` (mean log sigmoid) and ``log_odds_chosen`` (mean log odds ratio).
    """
    dtype = torch.promote_types(chosen_logps_avg.dtype, torch.float32)  # log1mexp needs at least float32
    chosen = chosen_logps_avg.to(dtype)
    rejected = rejected_logps_avg.to(dtype)
    # log odds(p) = log p - log(1 - p), computed from log p
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))  # (B,)
    ratio = F.logsigmoid(log_odds)  # (B,)
    loss = chosen_nll - beta * ratio.mean()
    metrics = _preference_metrics(beta * chosen, beta * rejected, chosen, rejected)
    metrics.update(
        nll_loss=chosen_nll.detach().float(),
        log_odds_ratio=ratio.detach().mean(),
        log_odds_chosen=log_odds.detach().mean(),
    )
    return loss, metrics


def simpo_loss(
    chosen_logps_avg: torch.Tensor,
    rejected_logps_avg: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[torch.Tensor, Metrics]:
    """SimPO ``-log sigmoid(beta * (avg_c - avg_r) - gamma)`` (Meng et al. 2024, eq. 6), batch mean.

    ``*_logps_avg`` are (B,) per-token mean log-probs. Equals TRL's CPO ``simpo`` with
    ``simpo_gamma = gamma``. Metrics: the preference metrics with rewards = beta * avg log-prob.
    """
    losses = -F.logsigmoid(beta * (chosen_logps_avg - rejected_logps_avg) - gamma)  # (B,)
    metrics = _preference_metrics(
        beta * chosen_logps_avg, beta * rejected_logps_avg, chosen_logps_avg, rejected_logps_avg
    )
    return losses.mean(), metrics


# --- online RL --------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    num_tokens: float | torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate ``-min(r A, clip(r, 1-eps, 1+eps) A)``, r = exp(logp - old) (Schulman et al. 2017, eq. 7).

    Args: logprobs, old_logprobs, advantages, mask: (B, T); reduced with ``num_tokens`` (module docstring).
    ``is_weights`` (B, T), detached: per-token truncated importance weights of a rollout engine that
    sampled from a slightly different policy (``advantages.truncated_importance_weights``); they scale
    the surrogate, as verl's and TRL's vLLM correction does.

    Metrics: ``clipfrac`` (tokens where the clipped term is active), ``approx_kl`` (mean 0.5 (logp - old)^2),
    ``ratio`` (mean r); all local masked means.
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.max(pg1, pg2)
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = _masked_reduce(per_token, mask, num_tokens)
    metrics = {
        "clipfrac": _masked_mean((pg2 > pg1).float(), mask),
        "approx_kl": _masked_mean(0.5 * log_ratio**2, mask),
        "ratio": _masked_mean(ratio, mask),
    }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss ``0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)`` (PPO2, Dhariwal et al. 2017).

    Args: values, old_values, returns, mask: (B, T); reduced with ``num_tokens``.
    Metrics: ``vf_clipfrac`` (tokens where the clipped term is larger), ``value_mean`` (local masked means).
    """
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)  # (B, T)
    vf1 = (values - returns) ** 2
    vf2 = (clipped - returns) ** 2
    loss = 0.5 * _masked_reduce(torch.max(vf1, vf2), mask, num_tokens)
    metrics = {"vf_clipfrac": _masked_mean((vf2 > vf1).float(), mask), "value_mean": _masked_mean(values, mask)}
    return loss, metrics


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_tokens: float | torch.Tensor | None = None,
    num_sequences: float | torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO clipped surrogate plus ``beta * k3`` KL to the reference (Shao et al. 2024, DeepSeekMath eq. 3-4).

    Per token: ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A) + beta (exp(ref - logp) - (ref - logp) - 1)``,
    r = exp(logp - old). Equals TRL 1.16 ``GRPOTrainer._compute_loss`` (token-level importance sampling,
    gradient accumulation 1) for every ``loss_type``:

    - ``grpo``: mean over sequences of each sequence's token mean; with ``num_sequences``, sum / num_sequences.
    - ``bnpo``: token mean over the batch; with ``num_tokens``, sum / num_tokens.
    - ``dr_grpo``: sum / (B * L), L = ``max_completion_length`` (default T) (Liu et al. 2025, Dr. GRPO);
      with ``num_sequences``, sum / (num_sequences * L).
    - ``dapo``: sum / num_tokens, num_tokens = tokens of the whole generation batch (Yu et al. 2025, DAPO eq. 8),
      default the local count (TRL's ``num_items_in_batch``).

    Args:
        logprobs, old_logprobs, ref_logprobs, mask: (B, T). ``old_logprobs`` None means on-policy (logprobs
            detached); ``ref_logprobs`` may be None when ``beta == 0``.
        advantages: (B,) one per completion, or (B, T).
        is_weights: (B, T) detached truncated importance weights of the rollout engine (or None); they
            scale the clipped surrogate, not the KL term (TRL's ``importance_sampling_ratio``).

    Metrics (local masked means): ``kl`` (when beta != 0), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
    ``clip_ratio/region_mean``.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown grpo loss_type {loss_type!r}; expected one of {GRPO_LOSS_TYPES}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1)
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)  # (B, T)
    if is_weights is not None:
        per_token = per_token * is_weights
    metrics: Metrics = {}
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("grpo_loss needs ref_logprobs when beta != 0")
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1  # (B, T) Schulman's k3, >= 0
        per_token = per_token + beta * kl
        metrics["kl"] = _masked_mean(kl, mask)

    fmask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        per_seq = (per_token * fmask).sum(-1) / fmask.sum(-1).clamp(min=1.0)  # (B,)
        loss = per_seq.mean() if num_sequences is None else per_seq.sum() / num_sequences
    elif loss_type in ("bnpo", "dapo"):
        loss = _masked_reduce(per_token, fmask, num_tokens)
    else:  # dr_grpo
        length = max_completion_length or per_token.size(1)
        n_seq = per_token.size(0) if num_sequences is None else num_sequences
        loss = (per_token * fmask).sum() / (n_seq * length)

    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (advantages < 0)
        high = (ratio > 1 + eps_high) & (advantages > 0)
        metrics["clip_ratio/low_mean"] = _masked_mean(low.float(), mask)
        metrics["clip_ratio/high_mean"] = _masked_mean(high.float(), mask)
        metrics["clip_ratio/region_mean"] = _masked_mean((low | high).float(), mask)
    return loss, metrics


# --- distillation -----------------------------------------------------------------------------


def _gjsd_per_token(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD of each row of (N, V) float logits (already divided by the temperature): (N,)."""
    s, t = F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1)  # (N, V)
    if beta == 0.0:  # forward KL(t || s)
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1.0:  # reverse KL(s || t)
        return (s.exp() * (s - t)).sum(-1)
    # log of the mixture m = (1 - beta) s + beta t, as TRL computes it
    m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), dim=0)  # (N, V)
    return beta * (t.exp() * (t - m)).sum(-1) + (1.0 - beta) * (s.exp() * (s - m)).sum(-1)


class _ChunkedGJSD(torch.autograd.Function):
    """The summed divergence over the masked rows, ``chunk_size`` rows at a time in float32; each
    chunk's gradient is taken in the forward and written into one buffer of the input's dtype, so
    neither the fp32 (N, V) intermediates nor a full-size gradient per chunk ever exist at once.
    With ``teacher_head`` the teacher's logits are made from its hidden states one chunk at a time; with
    ``student_head`` (no trainable weight: LoRA) the student's too, and the gradient is the one with respect
    to its hidden states (a token's divergence depends only on its own row)."""

    @staticmethod
    def forward(ctx, student, teacher, mask, beta, temperature, chunk_size, need_grad, teacher_head, student_head):
        rows, cols = mask.nonzero(as_tuple=True)  # (N,) each: the scored positions, indexed without a copy of all
        grad = torch.zeros_like(student) if need_grad else None  # (B, T, V or H) in the input's dtype
        dtype = torch.promote_types(student.dtype, torch.float32)  # bf16 / fp16 -> fp32, fp64 stays
        total = torch.zeros((), dtype=dtype, device=student.device)
        agree = torch.zeros((), dtype=dtype, device=student.device)
        for start in range(0, rows.numel(), chunk_size):
            r, c = rows[start:start + chunk_size], cols[start:start + chunk_size]
            x = student[r, c] if student_head is not None else student[r, c].to(dtype)  # (chunk, H or V): a copy
            with torch.enable_grad() if need_grad else contextlib.nullcontext():  # no graph in evaluation
                x.requires_grad_(need_grad)
                per_token, hits = _gjsd_chunk(x, teacher, r, c, student_head, teacher_head, beta, temperature)
                if need_grad:
                    (g,) = torch.autograd.grad(per_token, x)
                    grad[r, c] = g.to(grad.dtype)
            total += per_token.detach()
            agree += hits
        ctx.save_for_backward(grad)
        return total, agree

    @staticmethod
    def backward(ctx, grad_total, grad_agree):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return (None,) * 9
        return (grad * grad_total.to(grad.dtype),) + (None,) * 8


def _gjsd_chunk(x: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, student_head,
                teacher_head, beta: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed divergence, top-1 agreements) of one chunk: ``x`` (n, V) student logits, or (n, H) hidden states
    ``student_head`` maps to them; the teacher's rows ``teacher[rows, cols]`` (logits, or hidden states for
    ``teacher_head``). Float32 at least."""
    s = x if student_head is None else student_head(x)  # (n, V)
    t = teacher[rows, cols] if teacher_head is None else teacher_head(teacher[rows, cols])  # (n, V)
    if t.shape != s.shape:
        raise ValueError(f"teacher logits {tuple(t.shape)} and student logits {tuple(s.shape)} differ in shape")
    dtype = torch.promote_types(s.dtype, torch.float32)
    s, t = s.to(dtype), t.detach().to(dtype)
    hits = (s.detach().argmax(-1) == t.argmax(-1)).sum().to(dtype)
    return _gjsd_per_token(s / temperature, t / temperature, beta).sum(), hits


def generalized_jsd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    num_tokens: float | torch.Tensor | None = None,
    chunk_size: int = 1024,
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    student_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    frozen_student_head: bool = False,
) -> tuple[torch.Tensor, Metrics]:
    """GKD's generalized Jensen-Shannon divergence per token, ``beta KL(t || m) + (1 - beta) KL(s || m)`` with
    ``m = beta t + (1 - beta) s`` (Agarwal et al. 2024, eq. 1; as TRL's ``GKDTrainer.generalized_jsd_loss``): beta 0
    is the forward KL(t || s), beta 1 the reverse KL(s || t).

    Args:
        student: (B, T, V) logits (any float dtype), or with ``student_head`` (B, T, H) final hidden states that
            ``student_head`` maps (N, H) -> (N, V) a chunk at a time (the student's (B, T, V) logits never exist).
            A trainable head's chunks are checkpointed (recomputed in backward, one autograd graph: its weight
            gets its gradient, ``teacher_head`` must still work then); ``frozen_student_head`` (LoRA): each
            row's gradient is taken with its chunk instead (``student_head`` is only called inside this function).
        teacher: (B, T, V) logits over the same positions, or with ``teacher_head`` (B, T, H) final hidden
            states that ``teacher_head`` maps (N, H) -> (N, V) a chunk at a time (the teacher's (B, T, V) logits
            never exist). Not differentiated. Both distributions are divided by ``temperature`` before the softmax.
        mask: (B, T) the scored positions (response tokens).
        num_tokens: reduced as ``sum / num_tokens`` (module docstring); default the local masked mean.
        chunk_size: rows upcast to float32 at a time (the divergence never holds (B, T, V) in fp32).

    Metrics: ``jsd`` (local token mean), ``top1_agreement`` (share of scored positions where the student's and the
    teacher's most likely token agree), ``num_tokens`` (local scored-token count).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized JSD needs 0 <= beta <= 1, got {beta}")
    if student.shape[:2] != teacher.shape[:2] or (teacher_head is None and student_head is None
                                                  and student.shape != teacher.shape):
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")
    mask = mask.bool()
    teacher = teacher.detach()
    need_grad = student.requires_grad and torch.is_grad_enabled()  # no gradient buffer in evaluation
    rows, cols = mask.nonzero(as_tuple=True)  # (N,) each
    if student_head is not None and not frozen_student_head and need_grad and rows.numel():
        hidden = student[rows, cols]  # (N, H)
        parts = [torch.utils.checkpoint.checkpoint(
            _gjsd_chunk, hidden[i:i + chunk_size], teacher, rows[i:i + chunk_size], cols[i:i + chunk_size],
            student_head, teacher_head, float(beta), float(temperature), use_reentrant=False)
            for i in range(0, rows.numel(), chunk_size)]
        total, agree = sum(p[0] for p in parts), sum(p[1] for p in parts)
    else:
        total, agree = _ChunkedGJSD.apply(student, teacher, mask, float(beta), float(temperature), int(chunk_size),
                                          need_grad, teacher_head, student_head)
    count = mask.sum()
    local = count.clamp(min=1).to(total.dtype)
    loss = total / local if num_tokens is None else total / num_tokens
    metrics = {"jsd": (total.detach() / local), "top1_agreement": agree.detach() / local, "num_tokens": count.detach()}
    return loss, metrics
