"""Long-context switches applied to a loaded model: the output head for the chunked losses (and the
check that it reproduces the model's logits), DeepSpeed's TiledMLP, activation offload to CPU
(TRL's OffloadActivations, from torchtune) and Liger's Triton kernels.

Why not DeepSpeed's TiledFusedLogitsLoss for the chunked loss: it runs the head's backward inside
its forward with an incoming gradient of 1 and only rescales the hidden-state gradient afterwards,
so the head's weight gradient misses every scale applied after the loss (engine.backward's
1/grad_accum, fp16 loss scaling, our global token normaliser). losses.chunked_causal_lm_loss and
logprobs.token_logprobs_from_hidden checkpoint each chunk instead: one autograd graph, any scale.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
from typing import Callable, Optional

import torch

from medgpt_ds import dist
from medgpt_ds.errors import UserError

def _base_model(model):
    """The transformers model under a DeepSpeed engine and/or a PEFT wrapper."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


class OutputHead:
    """(N, H) final hidden states -> (N, V) logits as the model's forward computes them: the output
    embedding, then the logit scaling / soft-capping some families apply (Cohere, Granite, Gemma 2/3)."""

    def __init__(self, model):
        base = _base_model(model)
        self.module = base.get_output_embeddings()
        if self.module is None:
            raise UserError(f"{type(base).__name__} has no output embedding: the chunked loss needs a causal LM head; "
                            "pass --chunked_loss False")
        cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        self.scale = getattr(cfg, "logit_scale", None)
        self.divide = getattr(cfg, "logits_scaling", None)
        self.softcap = getattr(cfg, "final_logit_softcapping", None)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._post(self.module(hidden))

    def _post(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @property
    def frozen(self) -> bool:
        """No trainable weight (LoRA): the losses compute per-token gradients instead of recomputing."""
        return not any(p.requires_grad for p in self.module.parameters())

    @contextlib.contextmanager
    def gathered(self):
        """The head to use for one loss computation. A frozen head whose weights ZeRO-3 partitioned is
        gathered once here (every rank: a collective) and applied directly: ZeRO-3 keeps a frozen
        weight gathered for a recomputation only inside a module's backward, and the loss runs
        outside the model's modules."""
        params = list(self.module.parameters())
        if not (self.frozen and any(hasattr(p, "ds_id") for p in params)):
            yield self
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            weight, bias = self.module.weight, getattr(self.module, "bias", None)
            yield lambda hidden: self._post(torch.nn.functional.linear(hidden, weight, bias))


def final_hidden_states(model, **inputs) -> torch.Tensor:
    """(B, T, H) final (normed) hidden states from one forward that computes logits for no position
    (``logits_to_keep`` an empty index; ``output_hidden_states=[-1]`` keeps only the last)."""
    no_position = torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device)
    out = model(**inputs, logits_to_keep=no_position, output_hidden_states=[-1])
    return out.hidden_states[-1]


def prepare_model(model, train_args) -> None:
    """The model-level switches, applied before DeepSpeed wraps the model: Liger kernels, TiledMLP,
    Ulysses attention (sequence parallelism)."""
    from medgpt_ds import sequence_parallel

    if train_args.use_liger_kernel:
        apply_liger(model)
        dist.print0("liger: Triton RMSNorm, SwiGLU and RoPE kernels applied")
    if train_args.tiled_mlp:
        n = tile_mlps(model)
        dist.print0(f"tiled MLP: {n} decoder MLPs run through DeepSpeed's TiledMLP")
    if train_args.sequence_parallel_size > 1:
        sequence_parallel.register(model)
        dist.print0(f"sequence parallel: {train_args.sequence_parallel_size} ranks per sample (Ulysses), "
                    f"data-parallel size {dist.dp_world_size()}")


def offload_context(engine, train_args):
    """The activation-offload context for --offload_activations (None when off or on a CPU run)."""
    if not train_args.offload_activations:
        return None
    ctx = activation_offload_context(engine)
    if ctx is None:
        dist.print0("notice: --offload_activations: this run is on the CPU, where activations already live in RAM; "
                    "nothing to offload")
    return ctx


def head_is_exact(model, vocab_size: Optional[int] = None) -> bool:
    """Does ``OutputHead(model)(final_hidden_states(model, ...))`` reproduce the model's own logits?
    One tiny no-grad forward on every rank (collective under ZeRO-3); False for a model whose forward
    post-processes logits in a way ``OutputHead`` does not know or that has no ``logits_to_keep``."""
    module = getattr(model, "module", model)
    vocab_size = vocab_size or _base_model(model).config.get_text_config().vocab_size
    was_training = module.training
    module.eval()
    ids = (torch.arange(8, device=dist.device()) * 7 + 1).remainder(vocab_size).unsqueeze(0)  # (1, 8)
    inputs = {"input_ids": ids, "position_ids": torch.arange(8, device=ids.device).unsqueeze(0), "use_cache": False}
    try:
        with torch.no_grad():
            full = model(**inputs).logits
            mine = OutputHead(model)(final_hidden_states(model, **inputs))
        # a few units in the last place of the logits' dtype: the head may run another matmul kernel on
        # fewer rows; what this catches (unknown scaling, capping) is off by O(1) relative
        tol = 2e-2 if full.dtype in (torch.bfloat16, torch.float16) else 1e-4
        full, mine = full.float(), mine.float()
        ok = full.shape == mine.shape and bool(torch.allclose(full, mine, rtol=tol, atol=tol * max(1.0, full.abs().max().item())))
    except (TypeError, ValueError, AttributeError, IndexError, UserError):
        ok = False
    finally:
        module.train(was_training)
    return ok


def loss_chunk_size(train_args, model, what: str) -> int:
    """Tokens per chunk of the LM-head loss (0: the model's full logits). On by default wherever the
    chunked head reproduces the model's logits; sequence parallelism always computes the loss from its
    shard's hidden states (one chunk when --chunked_loss False)."""
    sp = train_args.sequence_parallel_size
    if not train_args.chunked_loss and sp == 1:
        return 0
    if head_is_exact(model):
        if not train_args.chunked_loss:
            return 1 << 62  # one chunk: the shard's full logits
        dist.print0(f"{what}: loss computed in chunks of {train_args.loss_chunk_size} tokens (no full logits)")
        return train_args.loss_chunk_size
    if sp > 1:
        raise UserError(f"--sequence_parallel_size {sp}: this model's logits are post-processed in a way the "
                        f"sequence-parallel loss cannot reproduce ({type(_base_model(model)).__name__}); "
                        "train it without sequence parallelism")
    dist.print0(f"notice: {what}: the chunked loss cannot reproduce {type(_base_model(model)).__name__}'s logits; "
                "using its full logits (memory grows with tokens x vocab)")
    return 0


# --- TiledMLP -----------------------------------------------------------------------------------


def tile_mlps(model) -> int:
    """Run every dense decoder MLP through DeepSpeed's TiledMLP: the MLP is computed in sequence
    shards of about ``hidden_size`` tokens and recomputed shard by shard in backward, so its
    intermediate activations (4 x intermediate_size per token) are never held for the whole
    sequence. Returns the number of MLPs tiled (MoE blocks are left alone: their routing returns
    more than one tensor)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    base = _base_model(model)
    hidden = base.config.get_text_config().hidden_size
    n = 0
    for module in base.modules():
        mlp = getattr(module, "mlp", None)
        if not isinstance(mlp, torch.nn.Module) or hasattr(mlp, "experts") or getattr(mlp, "_medgpt_tiled", False):
            continue
        plain_forward = mlp.forward

        def tiled_forward(x: torch.Tensor, _mlp=mlp, _forward=plain_forward) -> torch.Tensor:
            shards = _agreed_shards(x, hidden, _mlp)
            params = [p for p in _mlp.parameters() if p.requires_grad]
            return TiledMLP.apply(lambda _self, xs: _forward(xs), _mlp, x, shards, params)

        mlp.forward = tiled_forward
        mlp._medgpt_tiled = True
        n += 1
    return n


def _agreed_shards(x: torch.Tensor, hidden: int, mlp: torch.nn.Module) -> int:
    """ceil(tokens / hidden) shards (DeepSpeed's choice); under ZeRO-3 every rank must gather the
    MLP's weights the same number of times, so ranks agree on the largest count."""
    shards = max(1, math.ceil(x.shape[-2] / hidden))
    partitioned = any(hasattr(p, "ds_id") for p in mlp.parameters())
    if partitioned and torch.distributed.is_initialized() and dist.world_size() > 1:
        t = torch.tensor([shards], device=x.device)
        dist.all_reduce_max(t)
        shards = int(t.item())
    return shards


# --- activation offload -----------------------------------------------------------------------


def activation_offload_context(model, device_type: Optional[str] = None):
    """TRL's OffloadActivations for ``model``: tensors saved for backward (with gradient
    checkpointing: each layer's checkpointed input) are copied to pinned CPU memory in forward and
    brought back in backward, overlapped on a side stream; the output head is left alone. Enter it
    around every training forward. None on a CPU run (activations already live in CPU RAM) unless
    ``device_type`` names the device to offload from (tests use "cpu")."""
    if device_type is None and not dist.on_cuda():
        return None
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    cuda = dist.on_cuda()
    return get_act_offloading_ctx_manager(model, use_pin_memory=cuda, use_streams=cuda, warn_if_no_head=False)


def with_context(loss_fn: Callable, ctx) -> Callable:
    """``loss_fn`` run inside ``ctx`` (the forward's saved tensors get its hooks); ``loss_fn`` when None."""
    if ctx is None:
        return loss_fn

    def wrapped(engine, batch: dict):
        with ctx:
            return loss_fn(engine, batch)

    return wrapped


# --- Liger ------------------------------------------------------------------------------------


def apply_liger(model) -> None:
    """Liger's Triton RMSNorm, SwiGLU and RoPE kernels on the model instance (as the HF Trainer's
    --use_liger_kernel does). Its fused linear cross entropy is left off: the chunked loss gives the
    same memory saving on every stage and ZeRO stage (Liger reads the head weight directly, which
    ZeRO-3 has partitioned away)."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise UserError("--use_liger_kernel needs the liger-kernel package (pip install liger-kernel) and a CUDA GPU")
    if not dist.on_cuda():
        raise UserError("--use_liger_kernel: Liger's kernels are Triton GPU kernels and this run is on the CPU; "
                        "drop the flag (the chunked loss, on by default, already keeps the logits small)")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=_base_model(model), rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
