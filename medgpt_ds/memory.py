"""Memory estimate of a training run from the model's config alone (no weights downloaded).

Model states (parameters, gradients, optimizer) come from DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``, the functions
behind ``estimate_zero{2,3}_model_states_mem_needs_all_cold``) for 16-bit mixed precision; the
breakdown below uses the same byte counts (16-bit params 2, gradients 2 + 4, fp32 master 4, Adam 8
bytes per parameter) and sums to DeepSpeed's number. fp32 training (the CPU path) has no 16-bit
copies: 4 bytes params, 4 gradients, 4 master (ZeRO-1/2/3 clone the partition), 8 Adam.

Activations are counted per token per decoder layer from the architecture (hidden size, query /
key-value widths, MLP or MoE widths), with coefficients measured on this trainer's forward (HF
decoder layer, sdpa, torch 2.13): ``4.4 q + 2 kv + 4 i`` elements plus the two RMSNorms (an fp32
copy and a model-dtype copy of the hidden state each). With gradient checkpointing a layer keeps
only its input (``h`` elements) and one layer is recomputed at a time, after the loss's backward
(the larger of the two counts). The logits and cross
entropy cost 12 bytes per (token, vocab) element at their backward peak (the fp32 log-softmax
output, its gradient and the logits' gradient; 14 in mixed precision); the chunked loss keeps one
chunk of them. Everything is
per rank: with sequence parallelism a rank holds ``seq_len / sp`` tokens.

Validated against measured peaks (bench/bench_memory.py, results in bench/RESULTS.md).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from medgpt_ds.errors import UserError

GiB = 2 ** 30

# Elements saved for backward per token per decoder layer (measured, see module docstring).
_Q_COEF, _KV_COEF, _MLP_COEF = 4.4, 2.0, 4.0



@dataclass
class Arch:
    """What the estimate needs from a model: counted on the meta device from its config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    q_dim: int  # num_attention_heads * head_dim
    kv_dim: int  # num_key_value_heads * head_dim
    num_heads: int
    mlp_dim: int  # dense MLP intermediate size (0 for MoE layers)
    moe_dim: int  # routed expert intermediate size x experts per token (0 for dense)
    moe_router: int  # router logits per token (number of experts)
    total_params: int
    largest_layer_params: int  # largest parameter count owned by one module (DeepSpeed's definition)
    lora_params: int = 0  # trainable parameters with LoRA (0 = full fine-tuning)


@dataclass
class Setup:
    """The run being estimated: hardware, ZeRO, batch and memory switches."""

    zero: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    num_gpus: int = 8  # per node
    nodes: int = 1
    seq_len: int = 4096
    micro_batch: int = 1
    dtype_bytes: int = 2  # 2 = bf16/fp16 mixed precision, 4 = fp32
    gradient_checkpointing: bool = False
    chunked_loss: bool = True
    loss_chunk_size: int = 1024
    sequence_parallel: int = 1
    attn: str = "sdpa"  # sdpa / flash_attention_2 (linear in T) or eager (quadratic)
    tiled_mlp: bool = False
    offload_activations: bool = False
    overhead_gib: float = 1.0  # CUDA context, NCCL/gloo buffers, allocator slack
    additional_buffer_factor: float = 1.5  # DeepSpeed's CPU-side margin


@dataclass
class Estimate:
    """Per-GPU (per rank) and per-node CPU bytes, itemised."""

    params: int
    grads: int
    optimizer: int
    deepspeed_states: int  # DeepSpeed's estimator (16-bit) or the fp32 accounting; = params + grads + optimizer
    activations: int  # kept for backward (plus the embedding output, final norm, largest weight gradient)
    recompute: int  # one layer's activations, again, during its recomputation (checkpointing / offload)
    logits: int
    overhead: int
    cpu_per_node: int
    tokens_per_rank: int

    @property
    def per_gpu(self) -> int:
        """The recomputation of a layer and the loss's logits are not alive at the same time (the
        loss's backward finishes before the last layer is recomputed): the larger of the two counts."""
        return self.deepspeed_states + self.activations + max(self.recompute, self.logits) + self.overhead


# --- architecture -----------------------------------------------------------------------------


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """A transformers config from a model dir, a config.json path or a hub id (config only)."""
    import json
    import os

    from transformers import AutoConfig

    try:
        if os.path.isfile(name_or_path):
            with open(name_or_path) as f:
                kw = json.load(f)
            model_type = kw.pop("model_type", None)
            if model_type is None:
                raise UserError(f"{name_or_path}: no model_type in the config")
            return AutoConfig.for_model(model_type, **kw)
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"--model_name_or_path {name_or_path}: cannot read its config.json ({e})")


def _get(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def arch_from_config(config, lora_rank: int = 0, target_modules: str = "all") -> Arch:
    """Count parameters on the meta device (exact for any architecture transformers knows) and read
    the widths the activation model needs. ``lora_rank`` > 0 counts LoRA's trainable parameters on
    ``target_modules`` (``all`` = every linear layer except the output head, as the trainer does)."""
    import torch
    from transformers import AutoModelForCausalLM

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(dict((id(p), p.numel()) for p in model.parameters()).values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    lora = 0
    if lora_rank > 0:
        wanted = None if target_modules == "all" else {s.strip() for s in target_modules.split(",") if s.strip()}
        heads = {"lm_head", "score", "v_head", "value_head", "output"}
        for name, m in model.named_modules():
            leaf = name.split(".")[-1]
            if isinstance(m, torch.nn.Linear) and leaf not in heads and (wanted is None or leaf in wanted):
                lora += lora_rank * (m.in_features + m.out_features)
    hidden = int(text.hidden_size)
    heads_n = int(text.num_attention_heads)
    head_dim = int(_get(text, "head_dim", default=hidden // heads_n) or hidden // heads_n)
    kv_heads = int(_get(text, "num_key_value_heads", default=heads_n))
    experts = int(_get(text, "num_experts", "num_local_experts", "n_routed_experts", default=0) or 0)
    mlp = int(_get(text, "intermediate_size", default=4 * hidden))
    moe = 0
    if experts:
        topk = int(_get(text, "num_experts_per_tok", "moe_topk", default=1))
        moe = int(_get(text, "moe_intermediate_size", default=mlp)) * topk
        shared = int(_get(text, "shared_expert_intermediate_size", default=0) or 0)
        shared += int(_get(text, "n_shared_experts", default=0) or 0) * int(_get(text, "moe_intermediate_size", default=0))
        mlp = shared
    return Arch(model_type=str(text.model_type), vocab_size=int(text.vocab_size), hidden_size=hidden,
                num_layers=int(text.num_hidden_layers), q_dim=heads_n * head_dim, kv_dim=kv_heads * head_dim,
                num_heads=heads_n, mlp_dim=mlp, moe_dim=moe, moe_router=experts, total_params=total,
                largest_layer_params=largest, lora_params=lora)


# --- model states -----------------------------------------------------------------------------


def _deepspeed_states(params: int, largest: int, s: Setup) -> tuple[int, int]:
    """(cpu bytes per node, gpu bytes) for 16-bit mixed precision from DeepSpeed's estimators."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if s.zero == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest, num_gpus_per_node=s.num_gpus, num_nodes=s.nodes, cpu_offload=s.offload_optimizer,
            cpu_offload_params=s.offload_param, zero_init=True, additional_buffer_factor=s.additional_buffer_factor)
        return cpu, gpu
    # ZeRO-0 keeps everything on every rank: ZeRO-2's formula on a world of one.
    gpus, nodes = (s.num_gpus, s.nodes) if s.zero in (1, 2) else (1, 1)
    cpu, gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, num_nodes=nodes,
                                                     cpu_offload=s.offload_optimizer,
                                                     additional_buffer_factor=s.additional_buffer_factor)
    if s.zero == 1 and not s.offload_optimizer:  # ZeRO-1 does not partition the 16-bit gradients
        gpu += int(2 * params * (1 - 1 / (s.num_gpus * s.nodes)))
    return cpu, gpu


def model_states(arch: Arch, s: Setup) -> dict:
    """Params / grads / optimizer bytes per GPU, their total and the CPU bytes per node.

    16-bit: the total and the CPU column are DeepSpeed's estimator for the trainable parameters; the
    breakdown uses its byte counts (gradients 2 + 4, optimizer 4 master + 8 Adam) and params takes the
    rest (the 16-bit copy, or ZeRO-3's gathered largest layer). fp32: 4 params, 4 gradients, 8 Adam,
    plus a 4-byte fp32 partition that ZeRO-1/2/3 clone. LoRA's frozen base adds its weights (sharded
    under ZeRO-3, on CPU with parameter offload)."""
    if s.zero not in (0, 1, 2, 3):
        raise UserError(f"--zero must be 0, 1, 2 or 3, got {s.zero}")
    if s.offload_param and s.zero != 3:
        raise UserError("parameter offload (--offload param/all) needs --zero 3")
    world = s.num_gpus * s.nodes
    trainable = arch.lora_params or arch.total_params
    frozen = arch.total_params - trainable
    grad_shard = world if s.zero in (2, 3) else 1
    opt_shard = world if s.zero in (1, 2, 3) else 1
    w = s.dtype_bytes
    if w == 2:
        cpu, total = _deepspeed_states(trainable, arch.largest_layer_params, s)
        grads = 2 * trainable + 4 * trainable // world if s.zero == 1 else 6 * trainable // grad_shard
        opt = 12 * trainable // opt_shard
        if s.offload_optimizer:
            grads = opt = 0
        params = total - grads - opt
    else:
        cpu = 0
        params = 4 * trainable if s.zero < 3 else 4 * trainable // world + 4 * arch.largest_layer_params
        grads = 4 * trainable // grad_shard
        opt = (8 + (4 if s.zero else 0)) * trainable // opt_shard
        if s.offload_optimizer:
            cpu += int(16 * trainable / s.nodes * s.additional_buffer_factor)
            grads = opt = 0
        if s.offload_param:
            cpu += 4 * trainable // s.nodes
            params = 4 * arch.largest_layer_params
        total = params + grads + opt
    frozen_bytes = w * frozen // (world if s.zero == 3 else 1)
    if s.offload_param:
        cpu += w * frozen // s.nodes
        frozen_bytes = 0
    return {"params": params + frozen_bytes, "grads": grads, "optimizer": opt, "total": total + frozen_bytes,
            "cpu_per_node": cpu}


# --- activations ------------------------------------------------------------------------------


def layer_bytes_per_token(arch: Arch, s: Setup) -> float:
    """Bytes one decoder layer keeps for backward per token (no checkpointing)."""
    w = s.dtype_bytes
    if s.tiled_mlp:
        mlp = arch.hidden_size  # TiledMLP keeps only its input and recomputes one shard at a time
    else:
        mlp = _MLP_COEF * (arch.mlp_dim + arch.moe_dim) + arch.moe_router
    elems = _Q_COEF * arch.q_dim + _KV_COEF * arch.kv_dim + mlp
    norms = 2 * (4 + w) * arch.hidden_size  # each RMSNorm: an fp32 copy and a model-dtype copy
    return elems * w + norms


def activations(arch: Arch, s: Setup, seq_len: Optional[int] = None) -> dict:
    """Activation and logits bytes per rank for one micro batch of ``seq_len`` tokens per sample.

    Without checkpointing every layer keeps its activations; with it every layer keeps its input and
    one layer's activations exist again during its recomputation (``recompute``). Offloaded
    activations live in CPU RAM (``offloaded``) with one layer's worth in flight on the device. Backward also produces the
    largest weight's gradient (the embedding or output head) before accumulating it."""
    seq_len = seq_len or s.seq_len
    w = s.dtype_bytes
    tokens = s.micro_batch * math.ceil(seq_len / s.sequence_parallel)
    one_layer = layer_bytes_per_token(arch, s) * tokens
    if s.attn == "eager":  # attention weights + softmax over the full sequence, local heads
        one_layer += 2 * w * s.micro_batch * max(1, arch.num_heads // s.sequence_parallel) * seq_len ** 2
    kept_per_layer = w * arch.hidden_size * tokens if s.gradient_checkpointing else one_layer
    kept = kept_per_layer * arch.num_layers
    offloaded = kept if s.offload_activations else 0
    recompute = one_layer if (s.gradient_checkpointing or s.offload_activations) else 0
    device = kept - offloaded + 2 * w * arch.hidden_size * tokens  # + embeddings output and the final norm
    device += w * arch.largest_layer_params  # backward's gradient of the largest weight, before it is accumulated
    loss_tokens = min(tokens, s.loss_chunk_size) if s.chunked_loss else tokens
    # backward peak of the loss: fp32 log-softmax output, its gradient and the logits' gradient (12
    # bytes), plus the 16-bit copy of that gradient in mixed precision
    logits = (12 + (w if w < 4 else 0)) * loss_tokens * arch.vocab_size
    return {"activations": int(device), "recompute": int(recompute), "logits": int(logits), "tokens_per_rank": tokens,
            "offloaded": int(offloaded)}


def estimate(arch: Arch, s: Setup) -> Estimate:
    """Everything per GPU and per node for one setup."""
    if s.sequence_parallel > 1 and (s.num_gpus * s.nodes) % s.sequence_parallel:
        raise UserError(f"--sequence_parallel_size {s.sequence_parallel} does not divide {s.num_gpus * s.nodes} GPUs")
    ms = model_states(arch, s)
    act = activations(arch, s)
    cpu = ms["cpu_per_node"] + act["offloaded"] * s.num_gpus
    return Estimate(params=ms["params"], grads=ms["grads"], optimizer=ms["optimizer"], deepspeed_states=ms["total"],
                    activations=act["activations"], recompute=act["recompute"], logits=act["logits"],
                    overhead=int(s.overhead_gib * GiB),
                    cpu_per_node=int(cpu), tokens_per_rank=act["tokens_per_rank"])


def max_seq_len(arch: Arch, s: Setup, gpu_bytes: int, step: int = 256) -> int:
    """Largest sequence length (a multiple of ``step`` x sp) whose estimate fits ``gpu_bytes``; 0 if none."""
    unit = step * s.sequence_parallel
    if estimate(arch, dataclasses.replace(s, seq_len=unit)).per_gpu > gpu_bytes:
        return 0
    lo, hi = 1, 2
    while estimate(arch, dataclasses.replace(s, seq_len=hi * unit)).per_gpu <= gpu_bytes and hi < 2 ** 24:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: lo fits, hi does not
        mid = (lo + hi) // 2
        if estimate(arch, dataclasses.replace(s, seq_len=mid * unit)).per_gpu <= gpu_bytes:
            lo = mid
        else:
            hi = mid
    return lo * unit


def format_table(arch: Arch, s: Setup, est: Estimate, fits: Optional[dict] = None) -> str:
    """A readable table of one estimate (and the longest sequence per GPU memory size)."""
    def g(b: int) -> str:
        return f"{b / GiB:9.2f} GiB"

    world = s.num_gpus * s.nodes
    dp = world // s.sequence_parallel
    trained = f"LoRA {arch.lora_params / 1e6:.1f}M trainable" if arch.lora_params else "all weights trained"
    offload = ("optimizer+params" if s.offload_param else "optimizer") if s.offload_optimizer else \
        ("params" if s.offload_param else "none")
    dtype = {2: "bf16/fp16 mixed", 4: "fp32"}[s.dtype_bytes]
    lines = [
        f"model      {arch.model_type}: {arch.total_params / 1e9:.3f}B params ({trained}), {arch.num_layers} layers, "
        f"hidden {arch.hidden_size}, vocab {arch.vocab_size}",
        f"setup      ZeRO-{s.zero}, offload {offload}, {s.nodes} node(s) x {s.num_gpus} GPUs, {dtype}, "
        f"sequence parallel {s.sequence_parallel} (data parallel {dp})",
        f"batch      micro batch {s.micro_batch} x {s.seq_len} tokens -> {est.tokens_per_rank} tokens per GPU; "
        f"checkpointing {'on' if s.gradient_checkpointing else 'off'}"
        f"{' + CPU offload' if s.offload_activations else ''}, loss {'chunked' if s.chunked_loss else 'plain'}"
        f"{', tiled MLP' if s.tiled_mlp else ''}, attention {s.attn}",
        "",
        f"{'per GPU':<44}{'':>13}",
        f"  {'parameters':<42}{g(est.params)}",
        f"  {'gradients':<42}{g(est.grads)}",
        f"  {'optimizer states (fp32 master + Adam)':<42}{g(est.optimizer)}",
        f"  {'= model states (DeepSpeed estimator)':<42}{g(est.deepspeed_states)}",
        f"  {'activations kept for backward':<42}{g(est.activations)}",
        f"  {'a layer recomputed in backward (a)':<42}{g(est.recompute)}",
        f"  {'logits + cross entropy (b)':<42}{g(est.logits)}",
        f"  {'  (a) and (b) never coexist: max counted':<42}",
        f"  {'framework overhead':<42}{g(est.overhead)}",
        f"  {'total':<42}{g(est.per_gpu)}",
        f"{'CPU RAM per node':<44}{g(est.cpu_per_node)}",
    ]
    if fits:
        lines.append("")
        for mem, n in fits.items():
            lines.append(f"longest sequence on {mem:g} GiB GPUs: " + (f"{n} tokens" if n else "none (model states alone do not fit)"))
    return "\n".join(lines)
