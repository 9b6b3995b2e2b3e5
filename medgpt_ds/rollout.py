"""Rollouts for ppo/grpo, in three sections:

- advantages and KL: pure tensor math (GAE, whitening, group advantages, KL estimators and
  controllers, reward shaping): no engine, no device moves, no collectives;
- generation backends: ``backend.generate(prompt_ids) -> Generation`` ("hybrid" gathers ZeRO-3
  shards once per rollout; "per_token", "ds_hybrid", "vllm"), and scoring of rollouts (log-probs,
  critic values, reward-model scores, rule rewards);
- run setup shared by the ppo and grpo stages (prompts, batch arithmetic, engines, export); their
  rollout/update loops stay in the stage files.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import StoppingCriteria

from medgpt_ds import dist, rewards
from medgpt_ds.logprobs import IGNORE_INDEX, token_logprobs

# --- advantages and KL ------------------------------------------------------------------------


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


# --- generation backends ----------------------------------------------------------------------
# Below: rollouts against models and DeepSpeed engines (not pure). The stages see one boundary,
# ``backend.generate(prompt_ids) -> Generation``; "hybrid" is the default, "per_token" the slow
# ZeRO-3 baseline, "ds_hybrid" DeepSpeed's own Hybrid Engine (CUDA only), "vllm" a stub.

ROLLOUT_BACKENDS = ("hybrid", "per_token", "ds_hybrid", "vllm")
# Decoder families DeepSpeed's Hybrid Engine has inference containers for (old layouts only).
DS_HYBRID_MODEL_TYPES = ("opt", "bloom", "gpt_neox", "llama")
RULE_REWARDS = ("format", "answer_exact", "answer_normalized", "answer_choice")


@dataclass
class RolloutArguments:
    """Flags shared by --stage ppo and --stage grpo: models, rollout backend, sampling, rewards."""

    sft_model_path: Optional[str] = field(
        default=None, metadata={"help": "The policy to start from (the sft stage's export); default --model_name_or_path."})
    ref_model_path: Optional[str] = field(
        default=None, metadata={"help": "Frozen reference policy for the KL term; default the starting policy "
                                        "(with --use_peft: the actor with its adapter disabled, no second copy)."})
    reward_model_path: Optional[str] = field(
        default=None, metadata={"help": "Reward model (the rm stage's HF export, a sequence classifier with one "
                                        "label, read at the last non-pad token as in rm training)."})
    reward_model_weight: float = field(default=1.0, metadata={"help": "Weight of the reward model's score in the reward."})
    reward_funcs: Optional[str] = field(
        default=None, metadata={"help": "Comma-separated rule rewards: format, answer_exact, answer_normalized, "
                                        "answer_choice, or module.path:function (fn(completions, answers) -> floats)."})
    reward_weights: Optional[str] = field(
        default=None, metadata={"help": "Comma-separated weights, one per --reward_funcs entry (default all 1.0)."})
    rollout_backend: str = field(
        default="hybrid", metadata={"help": "hybrid (gather ZeRO-3 shards once per rollout, generate with the KV "
                                            "cache), per_token (no gather, synced_gpus: slow baseline), ds_hybrid "
                                            "(DeepSpeed Hybrid Engine, CUDA + OPT/BLOOM/GPT-NeoX/old Llama), vllm (not yet)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Response length limit (tokens) per rollout."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0: greedy); also scales the "
                                                              "logits when scoring log-probs, as in sampling."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    stop: Optional[str] = field(default=None, metadata={"help": "Comma-separated stop strings, \\n for a newline (the "
                                                                "response ends with the string; eos and the "
                                                                "template's end-of-turn always stop)."})
    generation_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Responses per generate() call on a rank (default: the whole rollout at once; "
                                        "the ZeRO-3 gather still happens once)."})
    rollout_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Prompts per rank per step (default: one optimizer step's worth)."})
    kl_estimator: str = field(default="k1", metadata={"help": "Per-token KL estimator to the reference: k1, k2, k3."})
    offload_frozen: bool = field(
        default=False, metadata={"help": "ZeRO-3: keep the frozen models' (reference, reward) parameters on the CPU."})

    def __post_init__(self):
        if self.rollout_backend not in ROLLOUT_BACKENDS:
            raise ValueError(f"--rollout_backend must be one of {', '.join(ROLLOUT_BACKENDS)}, got {self.rollout_backend!r}")
        if self.max_new_tokens <= 0:
            raise ValueError("--max_new_tokens must be positive")
        if self.temperature < 0:
            raise ValueError("--temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("--top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("--top_k must be >= 0")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"--kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
        for name in ("generation_batch_size", "rollout_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive")
        names = split_list(self.reward_funcs)
        for n in names:
            if n not in RULE_REWARDS and ":" not in n:
                raise ValueError(f"--reward_funcs: unknown reward {n!r}; use {', '.join(RULE_REWARDS)} or module:function")
        if self.reward_weights is not None:
            try:
                weights = [float(w) for w in split_list(self.reward_weights)]
            except ValueError:
                raise ValueError(f"--reward_weights must be comma-separated numbers, got {self.reward_weights!r}")
            if len(weights) != len(names):
                raise ValueError(f"--reward_weights has {len(weights)} values for {len(names)} --reward_funcs")

    def stop_strings(self) -> list[str]:
        """--stop split at commas, kept verbatim (spaces count) except that \\n and \\t are unescaped."""
        items = (self.stop or "").split(",")
        return [s.replace("\\n", "\n").replace("\\t", "\t") for s in items if s]


def split_list(value: Optional[str]) -> list[str]:
    """'a, b' -> ['a', 'b'] (empty items dropped)."""
    return [s.strip() for s in (value or "").split(",") if s.strip()]


@dataclass
class SamplingParams:
    """How responses are sampled; ``stop_token_ids`` (eos, end-of-turn) and ``stop_strings`` end a response."""

    max_new_tokens: int
    pad_token_id: int
    stop_token_ids: list[int]
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: list[str] = field(default_factory=list)

    def generate_kwargs(self) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "pad_token_id": self.pad_token_id,
              "eos_token_id": list(self.stop_token_ids) or None, "use_cache": True}
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    @property
    def logit_temperature(self) -> float:
        """The temperature log-probs are scored at (the sampling one; 1 for greedy)."""
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class Generation:
    """One rollout on one rank: prompts left-padded to P tokens, responses right-padded to R.

    ``response_mask`` marks the response tokens up to and including the one that ended it (a stop
    token, or the last token of a stop string); ``has_eos`` is False for rows cut at max_new_tokens.
    """

    sequences: torch.Tensor  # (B, P + R)
    prompt_mask: torch.Tensor  # (B, P) bool
    response_mask: torch.Tensor  # (B, R) bool
    has_eos: torch.Tensor  # (B,) bool
    steps: int = 0  # decoding steps this rank ran (differs across ranks; logged)

    @property
    def prompt_length(self) -> int:
        return self.prompt_mask.size(1)

    @property
    def response_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]  # (B, R)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1).long()  # (B, P + R)

    @property
    def position_ids(self) -> torch.Tensor:
        # positions count attended tokens only, so left padding does not shift them
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P + R)

    def __len__(self) -> int:
        return self.sequences.size(0)

    def select(self, idx) -> "Generation":
        """The rows ``idx`` (a slice, list or tensor of row indices)."""
        return Generation(self.sequences[idx], self.prompt_mask[idx], self.response_mask[idx], self.has_eos[idx],
                          self.steps)

    def responses(self) -> list[list[int]]:
        """The valid response ids of each row."""
        return [row[m].tolist() for row, m in zip(self.response_ids, self.response_mask)]


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, P), mask (B, P) bool) with every prompt right-aligned at P = the longest prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = True
    return ids.to(device), mask.to(device)


class _EndTracker(StoppingCriteria):
    """Ends a row at a stop token or when its decoded tail contains a stop string, and records
    how many tokens it had then (generate() pads after that, but pad may equal eos)."""

    def __init__(self, tokenizer, prompt_length: int, stop_ids: list[int], stop_strings: list[str], batch: int,
                 device):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length
        self.stop_ids = torch.tensor(stop_ids or [-1], device=device)
        self.stop_strings = stop_strings
        # a stop string spans at most this many tokens (byte-level pieces can be < 1 char)
        self.window = 4 * max((len(s.encode()) for s in stop_strings), default=0) + 4
        self.end = torch.full((batch,), -1, dtype=torch.long, device=device)

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        n = input_ids.size(1) - self.prompt_length  # tokens generated so far
        hit = torch.isin(input_ids[:, -1], self.stop_ids)  # (B,)
        if self.stop_strings:
            for i in (self.end < 0).nonzero().flatten().tolist():
                tail = self.tokenizer.decode(input_ids[i, max(self.prompt_length, input_ids.size(1) - self.window):])
                if any(s in tail for s in self.stop_strings):
                    hit[i] = True
        self.end = torch.where(hit & (self.end < 0), n, self.end)
        return self.end >= 0


def _zero3_offload(engine):
    opt = getattr(engine, "optimizer", None)
    if opt is None:
        raise RuntimeError("gathering ZeRO-3 parameters for generation needs the trained engine (with an optimizer)")
    return opt.parameter_offload if hasattr(opt, "parameter_offload") else opt


@contextmanager
def gathered_for_generation(engine):
    """ZeRO-3: all-gather the engine's parameters ONCE, switch its per-module gather hooks off while
    generating (each decoding step would re-gather every layer), then re-partition and restore them.
    All ranks must enter together; afterwards each rank may decode a different number of steps."""
    import deepspeed

    offload = _zero3_offload(engine)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for p in offload.module.parameters():
            p.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield engine.module
        finally:
            coordinator = offload.get_param_coordinator()
            if not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()  # the generation forwards left a stale fetch trace
            offload._register_deepspeed_module(offload.module)


class HFGenerateBackend:
    """Rollouts with ``model.generate`` (KV cache on) on the actor engine's module.

    ``gather=True`` ("hybrid", the default): under ZeRO-3 the shards are gathered once per rollout
    and every rank decodes on its own, so ranks may stop at different lengths. ``gather=False``
    ("per_token"): the ZeRO-3 hooks gather each layer at every decoding step, so all ranks must run
    the same number of forwards: ``synced_gpus=True`` keeps finished ranks stepping (DESIGN.md:
    without it, ranks that stop at different lengths deadlock). ZeRO-0/1/2: plain generate.
    """

    def __init__(self, engine, tokenizer, params: SamplingParams, *, zero3: bool, gather: bool = True,
                 batch_size: Optional[int] = None):
        self.engine, self.tokenizer, self.params = engine, tokenizer, params
        self.zero3, self.gather, self.batch_size = zero3, gather, batch_size
        self.synced_gpus = zero3 and not gather and dist.world_size() > 1

    def _context(self):
        return gathered_for_generation(self.engine) if self.zero3 and self.gather else nullcontext(self.engine.module)

    def _generate(self, model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tracker = _EndTracker(self.tokenizer, ids.size(1), self.params.stop_token_ids, self.params.stop_strings,
                              ids.size(0), ids.device)
        out = model.generate(input_ids=ids, attention_mask=mask.long(), stopping_criteria=[tracker],
                             synced_gpus=self.synced_gpus, **self.params.generate_kwargs())
        return out[:, ids.size(1):], tracker.end  # (b, r), (b,)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]]) -> Generation:
        ids, mask = left_pad(prompts, self.params.pad_token_id, dist.device())
        size = self.batch_size or len(prompts)
        was_training = self.engine.module.training
        self.engine.eval()
        try:
            with self._context() as model:
                parts = [self._generate(model, ids[i:i + size], mask[i:i + size]) for i in range(0, len(prompts), size)]
        finally:
            self.engine.train(was_training)
        return _assemble(ids, mask, parts, self.params.pad_token_id)


def _assemble(ids, mask, parts: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> Generation:
    """Join generate() chunks into one Generation (responses right-padded to the longest)."""
    width = max(r.size(1) for r, _ in parts)
    responses = torch.cat([torch.nn.functional.pad(r, (0, width - r.size(1)), value=pad_id) for r, _ in parts])
    end = torch.cat([e for _, e in parts])  # (B,), -1: cut by max_new_tokens
    has_eos = end >= 0
    length = torch.where(has_eos, end, torch.tensor([r.size(1) for r, e in parts for _ in e], device=end.device))
    response_mask = torch.arange(width, device=ids.device).unsqueeze(0) < length.unsqueeze(1)  # (B, R)
    responses = responses.masked_fill(~response_mask, pad_id)
    return Generation(torch.cat([ids, responses], dim=1), mask, response_mask, has_eos, steps=width)


class DSHybridBackend(HFGenerateBackend):
    """DeepSpeed's Hybrid Engine (``hybrid_engine`` block, CUDA only): the engine swaps its training
    layout for fused inference containers inside ``engine.generate``. Opt-in; see check_backend."""

    def __init__(self, engine, tokenizer, params: SamplingParams, *, zero3: bool, batch_size: Optional[int] = None):
        from deepspeed.runtime.hybrid_engine import DeepSpeedHybridEngine

        if not isinstance(engine, DeepSpeedHybridEngine):
            raise RuntimeError("--rollout_backend ds_hybrid needs the actor built with a hybrid_engine block "
                               "(ds_hybrid_config)")
        super().__init__(engine, tokenizer, params, zero3=zero3, gather=False, batch_size=batch_size)
        self.synced_gpus = zero3 and dist.world_size() > 1

    def _context(self):
        return nullcontext(self.engine)  # engine.generate gathers and fuses by itself

    def _generate(self, model, ids, mask):
        try:
            return super()._generate(model, ids, mask)
        except Exception as e:  # noqa: BLE001 - re-raised with the way out
            raise RuntimeError(f"DeepSpeed Hybrid Engine generation failed ({type(e).__name__}: {e}); its inference "
                               "kernels lag current transformers. Use --rollout_backend hybrid (the default).") from e


class VLLMBackend:
    """Placeholder for vLLM rollouts: start vLLM engines beside the trainer, push the actor's weights
    after each update (GatheredParameters layer by layer), return a Generation from its outputs."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("--rollout_backend vllm is not implemented yet; use --rollout_backend hybrid "
                                  "(gathers ZeRO-3 shards once per rollout and generates with the KV cache)")


def check_backend(name: str, *, model_type: Optional[str], device_type: str, use_peft: bool) -> None:
    """Refuse backends that cannot run here, before any model is loaded (DSConfigError, clear text)."""
    from medgpt_ds.engine import DSConfigError

    if name == "vllm":
        VLLMBackend()
    if name != "ds_hybrid":
        return
    way_out = "use --rollout_backend hybrid (the default: ZeRO-3 shards gathered once per rollout, KV-cached generate)"
    if device_type != "cuda":
        raise DSConfigError(f"--rollout_backend ds_hybrid: DeepSpeed's Hybrid Engine has CUDA kernels only and "
                            f"fails on the {device_type} backend ('not implemented on CPU backend'); {way_out}")
    if model_type not in DS_HYBRID_MODEL_TYPES:
        raise DSConfigError(f"--rollout_backend ds_hybrid: DeepSpeed's Hybrid Engine has no inference container for "
                            f"model_type {model_type!r} (only {', '.join(DS_HYBRID_MODEL_TYPES)}); {way_out}")
    if use_peft:
        raise DSConfigError(f"--rollout_backend ds_hybrid: the Hybrid Engine fuses only its own LoRA layers, not "
                            f"PEFT adapters; {way_out}")


def ds_hybrid_config(max_out_tokens: int) -> dict:
    """The ``hybrid_engine`` block for the actor's DeepSpeed config."""
    return {"enabled": True, "max_out_tokens": max_out_tokens, "inference_tp_size": 1,
            "release_inference_cache": False, "pin_parameters": True, "tp_gather_partition_size": 8}


def make_backend(name: str, engine, tokenizer, params: SamplingParams, *, zero3: bool,
                 batch_size: Optional[int] = None):
    """The rollout backend called ``name`` (see ROLLOUT_BACKENDS) for the actor ``engine``."""
    if name == "hybrid":
        return HFGenerateBackend(engine, tokenizer, params, zero3=zero3, gather=True, batch_size=batch_size)
    if name == "per_token":
        return HFGenerateBackend(engine, tokenizer, params, zero3=zero3, gather=False, batch_size=batch_size)
    if name == "ds_hybrid":
        return DSHybridBackend(engine, tokenizer, params, zero3=zero3, batch_size=batch_size)
    if name == "vllm":
        return VLLMBackend(engine, tokenizer, params)
    raise ValueError(f"unknown rollout backend {name!r}; expected one of {ROLLOUT_BACKENDS}")


# --- scoring rollouts: log-probs, values, rewards ---------------------------------------------


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
def chunked(fn, gen: Generation, size: int):
    """``fn(gen rows)`` in chunks of ``size`` rows, concatenated; every rank runs the same number of
    chunks for the same rollout size (ZeRO-3 forwards are collective)."""
    outs = [fn(gen.select(slice(i, i + size))) for i in range(0, len(gen), size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def rule_reward_functions(names: list[str], weights: list[float]) -> list:
    """[(fn(completions, answers) -> floats, weight)] for --reward_funcs / --reward_weights; the
    functions carry the given names (metrics are logged per name)."""
    out = []
    for name, weight in zip(names, weights, strict=True):
        if name == "format":
            fn = _named(lambda completions, answers: rewards.format_reward(completions), name)
        elif name.startswith("answer_"):
            fn = _named(functools.partial(rewards.answer_match_reward, mode=name.split("_", 1)[1]), name)
        else:
            fn = rewards.load_reward_function(name)
        out.append((fn, weight))
    return out


def _named(fn, name: str):
    def wrapped(completions, answers):
        return fn(completions, answers)

    wrapped.__name__ = name
    return wrapped


# --- run setup shared by ppo and grpo (their rollout/update loops stay in the stage files) -----


def global_sums(values: list) -> list[float]:
    """Sum each number (float or 0-dim tensor) over all ranks; one collective."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dist.device())
    return dist.all_reduce_sum(t).tolist()


def no_dropout(model) -> None:
    """Set every dropout to 0: rollout log-probs and update log-probs must come from one policy."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def load_prompt_items(data_args, tokenizer, seed: int) -> list[dict]:
    """Prompts (``question``/``answer``, ``prompt``/``answer``, or every user turn of sft conversations)
    rendered with the chat template's generation prompt and left-truncated to max_source_length:
    [{"prompt_ids": [...], "answer": str | None}]."""
    from medgpt_ds.data.loading import load_train_eval
    from medgpt_ds.data.templates import encode_prompt

    records, eval_records, _ = load_train_eval(data_args, "prompt", seed)
    if eval_records:
        dist.print0(f"ppo/grpo: {len(eval_records)} validation records are not used (no evaluation pass in RL stages)")
    limit, truncated, items = data_args.max_source_length, 0, []
    for rec in records:
        ids = encode_prompt(tokenizer, tokenizer.chat_template, rec["prompt"])
        truncated += len(ids) > limit
        items.append({"prompt_ids": ids[-limit:], "answer": rec["answer"]})
    dist.print0(f"prompts: {len(items)} ({truncated} left-truncated to {limit} tokens)")
    return items


class RLSetup:
    """What ppo and grpo share before and around their loops: checks, output dir, tokenizer and
    encoded prompts, the prompt order (resumable: epoch + batch index), batch arithmetic, the actor /
    reference / reward engines and rollout backend, reward scoring, preemption and the HF export."""

    def __init__(self, cfg, a: RolloutArguments, *, default_prompts_per_rank: int, samples_per_prompt: int):
        from transformers import AutoConfig

        from medgpt_ds import checkpoint
        from medgpt_ds.data.templates import get_chat_template, stop_token_ids
        from medgpt_ds.model import load_tokenizer

        t, d = cfg.train, cfg.data
        self.cfg, self.a = cfg, a
        self.policy_path = a.sft_model_path or cfg.model.model_name_or_path
        if not self.policy_path:
            raise SystemExit(f"error: --stage {t.stage} needs --sft_model_path (or --model_name_or_path): the policy to start from")
        if cfg.model.model_config:
            raise SystemExit(f"error: --stage {t.stage} starts from a trained policy (--sft_model_path), not --model_config")
        for flag in ("sft_model_path", "ref_model_path", "reward_model_path", "critic_model_path"):
            path = getattr(a, flag, None)  # a local dir, or a hub id (resolved from the hub cache)
            if path and not os.path.exists(os.path.expanduser(path)) and (
                    path.startswith(("/", ".", "~")) or path.count("/") != 1):
                raise SystemExit(f"error: --{flag} {path}: no such directory")
        if a.reward_model_path and os.path.isfile(os.path.join(a.reward_model_path, "adapter_config.json")):
            raise SystemExit(f"error: --reward_model_path {a.reward_model_path} is a LoRA adapter; merge it into its "
                             "base first (tools/merge_lora.py) and pass the merged dir")
        dist.init(t.ddp_timeout)
        dist.announce()
        self.model_config = AutoConfig.from_pretrained(self.policy_path, trust_remote_code=cfg.model.trust_remote_code)
        try:
            check_backend(a.rollout_backend, model_type=self.model_config.model_type, device_type=dist.device().type,
                          use_peft=cfg.lora.use_peft)
        except NotImplementedError as e:
            raise SystemExit(f"error: {e}")
        self.hidden_size = getattr(self.model_config, "hidden_size", None)
        self.resume = checkpoint.prepare_output_dir(cfg)
        self.model_args = dataclasses.replace(cfg.model, model_name_or_path=self.policy_path)
        self.tokenizer = load_tokenizer(self.model_args)
        try:
            self.tokenizer.chat_template = get_chat_template(d.template_name, self.tokenizer)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        self.items = load_prompt_items(d, self.tokenizer, t.seed)

        micro, ga, world = t.per_device_train_batch_size, t.gradient_accumulation_steps, dist.world_size()
        self.prompts_per_rank = a.rollout_batch_size or default_prompts_per_rank
        per_rank = self.prompts_per_rank * samples_per_prompt
        if per_rank % (micro * ga):
            raise SystemExit(f"error: {per_rank} rollouts per rank per step ({self.prompts_per_rank} prompts x "
                             f"{samples_per_prompt}) must fill whole minibatches of per_device_train_batch_size x "
                             f"gradient_accumulation_steps = {micro * ga}; adjust --rollout_batch_size")
        self.steps_per_epoch = len(self.items) // (self.prompts_per_rank * world)
        if self.steps_per_epoch == 0:
            raise SystemExit(f"error: {len(self.items)} prompts cannot fill one step of {self.prompts_per_rank} prompts "
                             f"x {world} ranks; lower --rollout_batch_size or add data")
        self.total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * self.steps_per_epoch))

        names = split_list(a.reward_funcs)
        weights = [float(w) for w in split_list(a.reward_weights)] if a.reward_weights else [1.0] * len(names)
        self.reward_fns = rule_reward_functions(names, weights)
        if not self.reward_fns and not a.reward_model_path:
            raise SystemExit(f"error: --stage {t.stage} needs a reward: --reward_model_path and/or --reward_funcs")
        stop_ids = stop_token_ids(self.tokenizer, self.tokenizer.chat_template)
        self.params = SamplingParams(max_new_tokens=a.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                     stop_token_ids=stop_ids, temperature=a.temperature, top_p=a.top_p,
                                     top_k=a.top_k, stop_strings=a.stop_strings())
        self.zero3 = False
        self.ref_engine = self.reward_engine = self.backend = None

    # -- engines --------------------------------------------------------------------------------

    def _frozen(self, path: str, model_cls, ds_config: dict):
        from medgpt_ds.config import LoraArguments
        from medgpt_ds.engine import init_frozen_engine
        from medgpt_ds.model import load_model

        args = dataclasses.replace(self.cfg.model, model_name_or_path=path, tokenizer_name_or_path=None,
                                   load_in_4bit=False, load_in_8bit=False)
        train_args = dataclasses.replace(self.cfg.train, gradient_checkpointing=False, neft_alpha=0.0)
        model = load_model(args, train_args, LoraArguments(), self.tokenizer, ds_config, model_cls=model_cls)
        if model_cls.__name__ == "AutoModelForSequenceClassification":
            if getattr(model.config, "num_labels", 1) != 1:
                raise SystemExit(f"error: --reward_model_path {path} has {model.config.num_labels} labels; a reward "
                                 "model has one (the rm stage's export)")
            model = LastTokenScore(model)
        return init_frozen_engine(model, ds_config)

    def build_engines(self, ds_config: dict, total_updates: int, need_reference: bool = True):
        """(actor, reference or None, reward engine or None); also builds ``self.backend``.

        Frozen engines are optimizer-free, ZeRO-3 partitioned when training is ZeRO-3 (optionally
        with parameters on the CPU); with LoRA and no --ref_model_path the reference is the actor
        with its adapter disabled (reference None)."""
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from medgpt_ds import engine as eng
        from medgpt_ds.model import load_model, set_zero3_init

        cfg, a, t = self.cfg, self.a, self.cfg.train
        self.zero3 = eng.zero_stage(ds_config) == 3
        if a.rollout_backend == "ds_hybrid":
            ds_config["hybrid_engine"] = ds_hybrid_config(self.cfg.data.max_source_length + a.max_new_tokens)
        if a.offload_frozen and not self.zero3:
            dist.print0("warning: --offload_frozen needs ZeRO-3 (parameter offload); frozen models stay on the device")
        set_zero3_init(ds_config)
        model = load_model(self.model_args, t, cfg.lora, self.tokenizer, ds_config)
        no_dropout(model)
        actor, _, _ = eng.init_train_engine(model, ds_config, t, total_updates)

        frozen_cfg = eng.frozen_ds_config(ds_config, offload_params=a.offload_frozen)
        set_zero3_init(frozen_cfg)  # zero.Init places the frozen weights as their engines will hold them
        if need_reference and (a.ref_model_path or not cfg.lora.use_peft):
            self.ref_engine = self._frozen(a.ref_model_path or self.policy_path, AutoModelForCausalLM, frozen_cfg)
        if a.reward_model_path:
            self.reward_engine = self._frozen(a.reward_model_path, AutoModelForSequenceClassification, frozen_cfg)
        set_zero3_init(ds_config)
        self.backend = make_backend(a.rollout_backend, actor, self.tokenizer, self.params, zero3=self.zero3,
                                    batch_size=a.generation_batch_size)
        return actor, self.ref_engine, self.reward_engine

    def seed_rollouts(self) -> None:
        """Give every rank its own sampling stream (call after all models are built, before resume:
        same-seeded ranks would draw the same tokens for similar prompts; a resume restores each
        rank's stream from the checkpoint)."""
        from transformers import set_seed

        set_seed(self.cfg.train.seed + dist.rank())

    # -- per step -------------------------------------------------------------------------------

    def prompts_for(self, epoch: int, batch: int) -> list[dict]:
        """This rank's prompts for prompt batch ``batch`` of ``epoch`` (a seeded permutation per epoch)."""
        from medgpt_ds.loop import epoch_order

        n, world = self.prompts_per_rank, dist.world_size()
        order = epoch_order(len(self.items), epoch, self.cfg.train.seed)
        start = batch * n * world + dist.rank() * n
        return [self.items[i] for i in order[start:start + n]]

    def score(self, gen: Generation, answers: list, chunk: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sequence rewards (B,) = sum of weighted rule rewards + weight x reward model score, and each
        unweighted part (B,) by name for the metrics."""
        texts = self.tokenizer.batch_decode(gen.responses(), skip_special_tokens=True)
        device = gen.sequences.device
        total = torch.zeros(len(gen), dtype=torch.float32, device=device)
        parts: dict[str, torch.Tensor] = {}
        if self.reward_fns:
            summed, per_fn = rewards.combine_rewards(self.reward_fns, texts, answers)
            total += torch.tensor(summed, dtype=torch.float32, device=device)
            parts = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in per_fn.items()}
        if self.reward_engine is not None:
            rm = chunked(lambda g: reward_model_scores(self.reward_engine, g), gen, chunk).float()
            total += self.a.reward_model_weight * rm
            parts["reward_model"] = rm
        return total, parts

    @staticmethod
    def timing(generation_s: float, scoring_s: float, training_s: float) -> dict:
        total = max(generation_s + scoring_s + training_s, 1e-9)
        return {"time/generation_s": generation_s, "time/scoring_s": scoring_s, "time/training_s": training_s,
                "time/generation_share": generation_s / total, "time/scoring_share": scoring_s / total,
                "time/training_share": training_s / total}

    # -- checkpoints, stop, export --------------------------------------------------------------

    def hf_meta(self, actor):
        from medgpt_ds.convert import write_hf_meta

        def write(tag_dir: str) -> None:
            write_hf_meta(tag_dir, actor.module, self.tokenizer, model_kind="causal_lm", base_model=self.policy_path,
                          torch_dtype=str(next(actor.module.parameters()).dtype))
        return write

    def preempt(self, state, save, logger, stopper):
        """Stop requested (SIGTERM/SIGUSR1/stop file): checkpoint if needed, mark PREEMPTED, return."""
        import json
        import time

        if save is not None:
            save()
        out = self.cfg.train.output_dir
        if dist.is_main():
            with open(os.path.join(out, "PREEMPTED"), "w") as f:
                json.dump({"step": state.global_step, "time": time.time()}, f)
            if os.path.exists(stopper.stop_file):
                os.remove(stopper.stop_file)
        logger.info(f"stop requested: checkpoint at step {state.global_step} written; exiting "
                    "(resume with --resume_from_checkpoint auto)")
        logger.close()
        dist.barrier()
        state.extra["preempted"] = True
        return state

    def finish(self, actor, logger) -> None:
        """Export the trained actor (full model or LoRA adapter) + tokenizer to output_dir."""
        from medgpt_ds import checkpoint

        out = self.cfg.train.output_dir
        if self.cfg.train.export_hf:
            checkpoint.export_hf(actor, actor.module, self.tokenizer, out, is_peft=self.cfg.lora.use_peft,
                                 zero3=self.zero3)
            logger.info(f"exported {'LoRA adapter' if self.cfg.lora.use_peft else 'actor'} + tokenizer to {out}")
        if dist.is_main() and os.path.exists(os.path.join(out, "PREEMPTED")):
            os.remove(os.path.join(out, "PREEMPTED"))
        logger.close()
