"""Advantage and KL math of the RL stages: GAE, whitening, group advantages, the critic-free
estimators (RLOO, REINFORCE++), KL estimators and controllers, reward shaping, and the truncated
importance weights that correct for a rollout engine whose log-probs differ from the trainer's.

Pure tensor functions and tiny stateful controllers: no engine, no device moves, no collectives
(the stages reduce across ranks: ``normalize`` takes the global statistics they reduced). Each
estimator has a CPU test against hand-derived numbers (tests/test_rollout_math.py).
"""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), right to left over valid tokens.

    ``delta_t = r_t + gamma V_next - V_t``, ``A_t = delta_t + gamma lam A_next``, where "next" is the next
    VALID token of the row (masked positions are skipped, so padding anywhere is harmless) and
    ``V_next = A_next = 0`` after the last one.

    Args: rewards, values, mask: (B, T). Returns ``(advantages, returns)``, both (B, T), zero where masked;
    ``returns = advantages + values``. No gradient flows (values are treated as constants).
    """
    rewards, values = rewards.detach(), values.detach()
    valid = mask.bool()
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_adv = torch.zeros_like(values[:, 0])  # (B,)
    advantages = torch.zeros_like(values)  # (B, T)
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid[:, t], adv, 0.0)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_adv = torch.where(valid[:, t], adv, next_adv)
    returns = (advantages + values).masked_fill(~valid, 0.0)
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to zero mean, unit variance over the masked entries (unbiased variance, as TRL).

    With ``shift_mean=False`` the mean is added back (scale only, used for rewards). Masked-out entries
    are returned as 0. Statistics are local to the given tensor.
    """
    fmask = mask.to(x.dtype)
    n = fmask.sum()
    mean = (x * fmask).sum() / n.clamp(min=1.0)
    var = (((x - mean) ** 2) * fmask).sum() / (n - 1).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * fmask


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO outcome advantages ``(r - mean_group) / (std_group + eps)`` (Shao et al. 2024, DeepSeekMath eq. 4 area).

    ``rewards`` is (N,) with the ``group_size`` completions of each prompt adjacent. ``scale_std=False`` keeps
    only the mean shift (Dr. GRPO, Liu et al. 2025). The std is unbiased, as TRL's. Returns (N,).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N,) with N divisible by group_size={group_size}, got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)  # (N/G, G)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_std:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(adv[:, :1])
        adv = adv / (std + eps)
    return adv.reshape(-1)


def rloo_scores(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each score minus the mean of the OTHER ``group_size - 1`` scores of its prompt's group
    (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740, eq. 9; Kool et al. 2019).

    ``scores`` is (N,) with each group's samples adjacent. ``r_i - (sum_group - r_i) / (k - 1)`` equals
    ``k / (k - 1) * (r_i - mean_group)``: an unbiased baseline, since it does not depend on sample i.
    Returns (N,).
    """
    if scores.dim() != 1 or scores.numel() % group_size or group_size < 2:
        raise ValueError(f"scores must be (N,) with N divisible by group_size={group_size} >= 2, got {tuple(scores.shape)}")
    grouped = scores.view(-1, group_size)  # (N/k, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted return from each valid token to the end of its response, ``G_t = r_t + gamma G_next``
    (REINFORCE; "next" is the next valid token, as in ``gae``). With per-token rewards from
    ``shape_rewards`` this is the critic-free advantage of RLOO / REINFORCE++ (OpenRLHF's
    ``get_cumulative_returns``). (B, T) in, (B, T) out, zero where masked; no gradient.
    """
    rewards = rewards.detach()
    valid = mask.bool()
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    out = torch.zeros_like(rewards)
    for t in reversed(range(rewards.size(1))):
        step = rewards[:, t] + gamma * running
        out[:, t] = torch.where(valid[:, t], step, 0.0)
        running = torch.where(valid[:, t], step, running)
    return out


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"n", "sum", "sum_sq"} of ``x`` over the masked entries: what the stages all-reduce (by name) to
    normalise over the global batch with ``normalize``."""
    fmask = mask.to(x.dtype)
    return {"n": fmask.sum(), "sum": (x * fmask).sum(), "sum_sq": (x * x * fmask).sum()}


def normalize(x: torch.Tensor, mask: torch.Tensor, n: float, total: float, total_sq: float,
              eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` with the mean and (population) variance of ``n`` entries summing to ``total``
    and ``total_sq`` (``masked_moments`` summed over every rank): REINFORCE++'s advantage normalisation
    over the global batch (Hu 2025, https://arxiv.org/abs/2501.03262, sec. 3; OpenRLHF). Zero where masked."""
    n = max(float(n), 1.0)
    mean = float(total) / n
    var = max(float(total_sq) / n - mean * mean, 0.0)
    return ((x - mean) / (var + eps) ** 0.5) * mask.to(x.dtype)


def truncated_importance_weights(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """Truncated importance sampling for a rollout engine whose sampling distribution differs from the
    trainer's (vLLM kernels, precision): ``w = min(exp(logp_trainer - logp_engine), cap)`` per token,
    detached, zero where masked (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"; verl's ``tis_imp_ratio_cap``, TRL's ``vllm_importance_sampling_correction``
    in token_truncate mode). The engine's sampled-token log-probs are the behaviour policy, the
    trainer's recomputed ones the old policy; the stage multiplies the clipped surrogate by ``w``.
    """
    log_w = (trainer_logprobs - engine_logprobs).detach().clamp(max=20.0)  # (B, T); exp(20) ~ 5e8, capped below
    return torch.exp(log_w).clamp(max=cap) * mask.to(log_w.dtype)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating KL divergence").

    With ``log r = ref_logprobs - logprobs``: ``k1 = -log r`` (unbiased, can be negative),
    ``k2 = 0.5 (log r)^2``, ``k3 = (r - 1) - log r`` (unbiased, always >= 0). Shapes are kept.
    """
    log_r = ref_logprobs - logprobs
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2): steer the measured KL towards ``target``.

    ``value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update from the KL measured over the last ``n_steps`` samples; returns the new coefficient."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op kept for the same call site as the adaptive one."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


def shape_rewards(
    score: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    missing_eos_penalty: float | None = None,
    has_eos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token PPO rewards: ``-kl_coef * kl`` on every valid token plus ``score`` on the last valid one
    (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022, eq. 2).

    Args:
        score: (B,) sequence score from the reward model or rule; kl: (B, T) per-token KL estimate;
        mask: (B, T) valid completion tokens.
        missing_eos_penalty: subtracted from ``score`` where ``has_eos`` (B,) bool is False (truncated
            completions), as TRL's ``missing_eos_penalty``.

    Returns (B, T) rewards, zero where masked. A row with no valid token gets no score.
    """
    valid = mask.bool()
    score = score.to(kl.dtype)
    if missing_eos_penalty is not None:
        if has_eos is None:
            raise ValueError("missing_eos_penalty needs has_eos (B,) bool")
        score = score - missing_eos_penalty * (~has_eos.bool()).to(score.dtype)
    rewards = (-kl_coef * kl).masked_fill(~valid, 0.0)  # (B, T)
    positions = torch.arange(valid.size(1), device=valid.device).expand_as(valid)  # (B, T)
    last = torch.where(valid, positions, -1).max(dim=1).values  # (B,), -1 for an empty row
    has_any = last >= 0
    rewards = rewards.scatter_add(1, last.clamp(min=0).unsqueeze(1), (score * has_any).unsqueeze(1))
    return rewards
