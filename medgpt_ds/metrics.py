"""Rank-0 logging to stdout, a jsonl file and the --report_to trackers (medgpt_ds/report/); a
progress bar with ETA; throughput, model FLOPs and MFU. Non-zero ranks get a null logger so call sites stay unconditional.

MFU = model FLOPs per second per device / the device's dense peak for the compute dtype. Model
FLOPs come from the architecture config (``model_flops``): 2 per weight per token forward, 2 for
the activation gradient, 2 more for the weight gradient of trained weights (6N full, ~4N + 6N_lora
with LoRA), lm_head in, embeddings out, MoE counted at the active experts, plus attention's
QK^T / AV work over the keys each token attends. Recomputation (gradient checkpointing) is not
counted: that is hardware FLOPs, not model FLOPs.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from medgpt_ds import dist
from medgpt_ds.report import open_backends, resolve_report_to

# Dense (no sparsity) peak tensor-core FLOP/s per device and compute dtype, from the vendors' data
# sheets; MFU is reported against these. "tf32" is fp32 training with TF32 matmuls allowed. Order
# matters: the first pattern that matches torch.cuda.get_device_name() wins (H100 PCIe before H100).
PEAK_TFLOPS: list[tuple[str, dict[str, Optional[float]]]] = [
    (r"H100.*PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"H[12]00 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH20\b", {"bf16": 148.0, "fp16": 148.0, "tf32": 74.0, "fp32": 44.0}),
    (r"GH200|H100|H200|H800", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"B200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1125.0, "fp32": 75.0}),
    (r"A100|A800", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"V100", {"bf16": None, "fp16": 125.0, "tf32": None, "fp32": 15.7}),
    (r"MI300X", {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4}),
]


def peak_flops(dtype: str = "bf16", device_name: Optional[str] = None) -> Optional[float]:
    """Dense peak FLOP/s of one device for ``dtype`` (bf16, fp16, tf32, fp32); None on CPU, on an
    unknown device or for a dtype the device has no tensor cores for (then MFU is not reported)."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for pattern, table in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            value = table.get(dtype)
            return None if value is None else value * 1e12
    return None


def compute_dtype(ds_config: Optional[dict] = None, param_dtype: Optional[torch.dtype] = None) -> str:
    """The matmul precision of a run: bf16 / fp16 from the DeepSpeed config or the weights' dtype,
    else tf32 when torch lets fp32 matmuls use TF32 (``allow_tf32`` / matmul precision), else fp32."""
    ds_config = ds_config or {}
    if ds_config.get("bf16", {}).get("enabled") is True or param_dtype == torch.bfloat16:
        return "bf16"
    if ds_config.get("fp16", {}).get("enabled") is True or param_dtype == torch.float16:
        return "fp16"
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "fp32"


# --- model FLOPs ------------------------------------------------------------------------------

# Decoder families whose matmul shapes the config describes fully: gated MLP (gate, up, down; fused
# or not), q/k/v/o attention, optional MoE blocks. Others (MLA, linear-attention hybrids, remote
# code) are not guessed at: no FLOPs model, no MFU.
DENSE_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3", "glm4",
                  "olmo2", "granite", "qwen2_moe", "qwen3_moe", "mixtral"}


@dataclass(frozen=True)
class ModelFlops:
    """Per-token matmul work of a decoder LM, for model FLOPs (MFU).

    ``matmul_params``: weights one token multiplies through (active MoE experts only; lm_head in,
    embeddings out) incl. adapters; ``trained_params``: those of them whose weight gradient is
    computed. ``attention``: (window or None, layers, query-key width, value width) groups.
    """

    matmul_params: int
    trained_params: int
    attention: tuple[tuple[Optional[int], int, int, int], ...]

    def training_flops(self, tokens: float, keys: dict[Optional[int], float]) -> float:
        """FLOPs of forward + backward over ``tokens`` tokens. ``keys[w]`` = keys attended, summed
        over those tokens, with window w (None: full causal). Every matmul costs 2 FLOPs per weight
        forward and 2 for the activation gradient; trained weights 2 more for the weight gradient
        (full training: 6N; LoRA: 4N + 6 N_adapter). Attention (QK^T and AV, no weights): 3x its
        forward. Recomputation under gradient checkpointing is not model work and is not counted."""
        dense = (4 * self.matmul_params + 2 * self.trained_params) * tokens
        attn = sum(3 * 2 * layers * (qk + v) * keys[window] for window, layers, qk, v in self.attention)
        return float(dense + attn)


def _layer_is_moe(config, i: int) -> bool:
    if getattr(config, "first_k_dense_replace", None) is not None:
        return i >= config.first_k_dense_replace
    if i in (getattr(config, "mlp_only_layers", None) or []):
        return False
    return (i + 1) % (getattr(config, "decoder_sparse_step", 1) or 1) == 0


def config_matmul_params(config, lm_head: bool = True) -> Optional[int]:
    """Weights one token multiplies through, from the architecture config (None: not a family we
    can describe). Attention q,k,v,o (GQA: k,v have num_key_value_heads heads); gated MLP 3 x h x
    intermediate; MoE layers: router h x E + top-k experts + shared experts; lm_head V x h (tied or
    not, it is a matmul); embeddings and norms excluded."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "model_type", None) not in DENSE_FAMILIES:
        return None
    h, n_layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or h // heads
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0
    total = 0
    for i in range(n_layers):
        total += attn
        if experts and _layer_is_moe(config, i):
            inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
            total += h * experts + config.num_experts_per_tok * 3 * h * inter
            shared = getattr(config, "shared_expert_intermediate_size", None) or 0
            if shared:
                total += 3 * h * shared + h  # the shared expert and its sigmoid gate
        else:
            total += 3 * h * config.intermediate_size
    if lm_head:
        total += config.vocab_size * h
    return total


def attention_groups(config) -> tuple[tuple[Optional[int], int, int, int], ...]:
    """(window, layers, query-key width, value width): every query head attends (GQA shares k/v
    heads, not the work); sliding-window layers attend at most ``sliding_window`` keys."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or (
        ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers)
    counts: dict[Optional[int], int] = {}
    for kind in types:
        w = window if kind == "sliding_attention" and window else None
        counts[w] = counts.get(w, 0) + 1
    return tuple((w, n, heads * hd, heads * hd) for w, n in counts.items())


def _numel(p) -> int:
    return int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()


def _ndim(p) -> int:
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()  # ZeRO-3 partitions are 1-D


def model_flops(model) -> Optional[ModelFlops]:
    """The FLOPs model of ``model`` (a transformers model, PEFT-wrapped or not, ZeRO-3 partitioned or
    not): the architecture from its config; which weights are trained from requires_grad. Full
    fine-tuning trains every matmul; with LoRA the base is frozen and the adapters (plus any
    trainable non-embedding weight, e.g. modules_to_save) are trained. None when the architecture
    is not one we can count."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    lm_head = getattr(model, "get_output_embeddings", lambda: None)() is not None
    base = config_matmul_params(config, lm_head=lm_head)
    if base is None:
        return None
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    embed_ids = {id(p) for p in embed.parameters()} if embed is not None else set()
    adapters, other_trained, frozen_matmul = 0, 0, 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            adapters += _numel(p)
        elif p.requires_grad and _ndim(p) >= 2 and id(p) not in embed_ids:
            other_trained += _numel(p)
        elif not p.requires_grad and _ndim(p) >= 2 and id(p) not in embed_ids:
            frozen_matmul += _numel(p)
    if adapters == 0 and frozen_matmul == 0:  # full fine-tuning (frozen embeddings do not matter)
        trained = base
    else:  # LoRA (or partial freezing): the adapters and the trainable weights, at their full size
        trained = adapters + other_trained
    return ModelFlops(matmul_params=base + adapters, trained_params=min(trained, base + adapters),
                      attention=attention_groups(config))


def attended_keys(batch: dict, windows, pad_token_id: Optional[int] = None) -> tuple[int, dict]:
    """(real tokens, {window: keys attended summed over them}) of a collated causal-LM batch: a
    token at position p of its sample attends min(p + 1, window) keys. Padded batches carry an
    attention_mask; packed rows carry position_ids restarting per sample, and their trailing pad run
    (a segment of pad ids) is left out."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        real = mask.bool()
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        pos = batch.get("position_ids")
        if pos is None:
            pos = torch.arange(ids.size(-1)).expand_as(ids)
        real = torch.ones_like(ids, dtype=torch.bool)
        if pad_token_id is not None:
            for r in range(ids.size(0)):
                starts = (pos[r] == 0).nonzero().flatten()
                tail = int(starts[-1]) if len(starts) else 0
                if tail > 0 and bool((ids[r, tail:] == pad_token_id).all()):
                    real[r, tail:] = False
    ctx = (pos.long() + 1).masked_select(real)
    return int(real.sum()), {w: float((ctx if w is None else ctx.clamp(max=w)).sum()) for w in windows}


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


class MetricsLogger:
    """log(step, metrics) -> stdout line, logs/metrics.jsonl and TensorBoard (rank 0 only)."""

    def __init__(self, output_dir: str, report_to: str = "tensorboard", logging_dir: Optional[str] = None,
                 total_steps: int = 0, initial_step: int = 0, config: Optional[dict] = None):
        self.enabled = dist.is_main()
        self.backends: list = []  # --report_to trackers (medgpt_ds/report/)
        self.jsonl = None
        self.bar = None
        if not self.enabled:
            return
        log_dir = logging_dir or os.path.join(output_dir, "logs")
        os.makedirs(log_dir, exist_ok=True)
        self.jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a")
        self.backends = open_backends(resolve_report_to(report_to), log_dir,
                                      os.path.basename(os.path.normpath(output_dir)), config)
        if total_steps:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True,
                            mininterval=2.0, disable=os.environ.get("MEDGPT_NO_PROGRESS") == "1" or not sys.stderr.isatty())

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (float, torch.Tensor)) else v) for k, v in metrics.items()}
        record = {"step": step, "split": prefix, **clean, "time": time.time()}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.backends:
            scalars = {f"{prefix}/{k}": v for k, v in clean.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            for backend in self.backends:
                backend.log(scalars, step)
        line = f"{prefix} step {step} | " + " | ".join(f"{k} {fmt(v)}" for k, v in clean.items())
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def info(self, msg: str) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.write(msg)
            else:
                print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for backend in self.backends:
            backend.close()
        self.backends = []
        if self.jsonl is not None:
            self.jsonl.close()


class Throughput:
    """Real (non-pad) tokens/s over a window and, with a FLOPs model, achieved TFLOP/s per device
    and MFU (against the device's dense peak for the run's compute dtype; not on CPU)."""

    def __init__(self, num_params: int, flops: Optional[ModelFlops] = None, dtype: str = "bf16",
                 pad_token_id: Optional[int] = None, device_name: Optional[str] = None):
        self.num_params = num_params
        self.flops = flops
        self.dtype = dtype
        self.pad_token_id = pad_token_id
        self.peak = peak_flops(dtype, device_name) if flops is not None else None
        self.reset()

    @classmethod
    def for_model(cls, model, ds_config: Optional[dict] = None, num_params: Optional[int] = None) -> "Throughput":
        """Throughput with MFU for ``model`` trained under ``ds_config`` (FLOPs from its architecture
        config, dtype from the config or weights, peak from the local device)."""
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtype = compute_dtype(ds_config, None if param is None else param.dtype)
        config = getattr(model, "config", None)
        return cls(num_params if num_params is not None else sum(_numel(p) for p in model.parameters()),
                   flops=model_flops(model), dtype=dtype, pad_token_id=getattr(config, "pad_token_id", None))

    def reset(self) -> None:
        self.tokens = 0
        self.positions = 0
        self.local_tokens = 0
        self.local_keys: dict[Optional[int], float] = {}
        self.t0 = time.perf_counter()

    def add(self, global_tokens: int, global_positions: int = 0, batches: Optional[list] = None) -> None:
        """Real tokens and total positions (incl. padding) processed, over all ranks; ``batches``
        (this rank's collated batches) give the attention term of the FLOPs."""
        self.tokens += global_tokens
        self.positions += global_positions
        if self.flops is not None and batches:
            windows = [w for w, *_ in self.flops.attention]
            for b in batches:
                n, keys = attended_keys(b, windows, self.pad_token_id)
                self.local_tokens += n
                for w, k in keys.items():
                    self.local_keys[w] = self.local_keys.get(w, 0.0) + k

    def read(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"tokens_per_s": self.tokens / dt}
        if self.positions:
            out["pad_frac"] = 1.0 - self.tokens / self.positions
        if self.flops is not None and self.tokens:
            # this rank's keys-per-token, scaled to the global token count (exact on one rank)
            per_token = {w: k / max(self.local_tokens, 1) for w, k in self.local_keys.items()}
            keys = {w: per_token.get(w, 0.0) * self.tokens for w, *_ in self.flops.attention}
            per_device = self.flops.training_flops(self.tokens, keys) / dt / dist.world_size()
            out["tflops"] = per_device / 1e12
            if self.peak:
                out["mfu"] = per_device / self.peak
        if torch.cuda.is_available():
            out["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.reset()
        return out
