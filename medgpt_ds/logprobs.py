"""Token and sequence log-probabilities, entropy, and the chosen+rejected concatenated batch.

Pure tensor functions: no engine, no device moves, no collectives. The causal shift lives here
(logits at position t predict the label at t+1), so every stage shifts the same way.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

IGNORE_INDEX = -100

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next label under ``logits``, with the causal shift.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) token ids; ``ignore_index`` marks positions that are not scored.

    Returns:
        ``(logps, mask)``, both (B, T-1): ``logps[:, t] = log p(labels[:, t+1] | logits[:, t])``,
        zero where ``mask`` is False. ``logps`` is float32 for fp16/bf16 logits, else the logits' dtype.

    Computed as ``gather(logits) - logsumexp(logits)`` so no (B, T, V) log-softmax copy is kept;
    low-precision logits are upcast one row at a time.
    """
    logits = logits[:, :-1]  # (B, T-1, V)
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != ignore_index  # (B, T-1)
    safe_labels = labels.masked_fill(~mask, 0).unsqueeze(-1)  # (B, T-1, 1)
    if logits.dtype in _LOW_PRECISION:
        # logsumexp in bf16 loses ~2 decimal digits; upcast per row to bound the float32 peak.
        rows = []
        for row_logits, row_labels in zip(logits, safe_labels, strict=True):
            row_logits = row_logits.float()  # (T-1, V)
            picked = row_logits.gather(-1, row_labels).squeeze(-1)  # (T-1,)
            rows.append(picked - torch.logsumexp(row_logits, dim=-1))
        logps = torch.stack(rows)  # (B, T-1)
    else:
        picked = logits.gather(-1, safe_labels).squeeze(-1)  # (B, T-1)
        logps = picked - torch.logsumexp(logits, dim=-1)
    return logps.masked_fill(~mask, 0.0), mask


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    chunk_size: int = 1024,
    frozen_head: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logprobs` of ``head(hidden)`` without the (B, T, V) logits (:func:`scored_logprobs`).

    Args:
        hidden: (B, T, H) final hidden states; ``head``: (N, H) -> (N, V) logits as the model computes them.
        labels: (B, T) -> returns (B, T-1) exactly like :func:`token_logprobs`; or ``shift_labels``
            (B, T) already shifted (a sequence-parallel shard) -> returns (B, T).
        frozen_head: the head's weights take no gradient (LoRA); see :func:`scored_logprobs`.

    Returns:
        ``(logps, mask)``: log-probs (float32 for fp16/bf16, as :func:`token_logprobs`), zero where ``mask`` is False.
    """
    if (labels is None) == (shift_labels is None):
        raise ValueError("pass exactly one of labels and shift_labels")
    if shift_labels is None:
        hidden, shift_labels = hidden[:, :-1], labels[:, 1:]  # (B, T-1, H), (B, T-1)
    mask = shift_labels != ignore_index  # (B, T')
    flat_hidden = hidden.reshape(-1, hidden.size(-1))  # (B*T', H)
    keep = mask.reshape(-1).nonzero().squeeze(-1)  # (N,)
    picked = scored_logprobs(flat_hidden.index_select(0, keep), shift_labels.reshape(-1).index_select(0, keep), head,
                             chunk_size, frozen_head)  # (N,)
    logps = flat_hidden.new_zeros(flat_hidden.size(0), dtype=picked.dtype).index_add(0, keep, picked)
    return logps.view(mask.shape), mask


def scored_logprobs(hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                    chunk_size: int = 1024, frozen_head: bool = False) -> torch.Tensor:
    """``log p(labels[i] | head(hidden[i]))`` for (N, H) hidden rows, ``chunk_size`` rows at a time, so
    only one chunk's (chunk, V) logits ever exist. Float32 for fp16/bf16 logits, else their dtype.

    A trainable head: each chunk is checkpointed (its logits are recomputed in backward), one autograd
    graph, so any scale applied later reaches the head's weight gradient. A frozen head
    (``frozen_head``, e.g. LoRA): each token's log-prob depends only on its own hidden row, so the
    gradient of every log-prob with respect to its row is computed with the chunk (no recompute) and
    scaled by the incoming gradient in backward; ``head`` is only called inside this function, so a
    caller may pass one that uses gathered ZeRO-3 weights (long_context.OutputHead.gathered).
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    if hidden.size(0) == 0:
        return hidden.new_zeros(0, dtype=dtype) + 0.0 * hidden.sum()  # keeps the graph
    if not torch.is_grad_enabled() or (frozen_head and not hidden.requires_grad):  # no gradient wanted
        return torch.cat([_chunk_logps(hidden[i:i + chunk_size], labels[i:i + chunk_size], head)
                          for i in range(0, hidden.size(0), chunk_size)])
    if frozen_head:
        return _FrozenHeadLogps.apply(hidden, labels, head, chunk_size)
    return torch.cat([torch.utils.checkpoint.checkpoint(_chunk_logps, hidden[i:i + chunk_size], labels[i:i + chunk_size],
                                                        head, use_reentrant=False)
                      for i in range(0, hidden.size(0), chunk_size)])


def _chunk_logps(h: torch.Tensor, y: torch.Tensor, head: Callable) -> torch.Tensor:
    # h: (n, H), y: (n,) -> (n,) log p(y | h), float32 for fp16/bf16 logits. cross_entropy keeps only
    # its log-softmax for backward (logsumexp would keep the logits and allocate a softmax too).
    logits = head(h)  # (n, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return -F.cross_entropy(logits, y, reduction="none")


class _FrozenHeadLogps(torch.autograd.Function):
    """Per-token log-probs through a head without trainable weights: forward keeps, per token, the
    gradient of its log-prob with respect to its hidden row (N, H); backward scales those rows."""

    @staticmethod
    def forward(ctx, hidden, labels, head, chunk_size):
        values, row_grads = [], []
        for i in range(0, hidden.size(0), chunk_size):
            with torch.enable_grad():
                h = hidden[i:i + chunk_size].detach().requires_grad_(True)  # (n, H)
                lp = _chunk_logps(h, labels[i:i + chunk_size], head)  # (n,)
                (g,) = torch.autograd.grad(lp.sum(), h)  # row t of g is d lp[t] / d h[t]
            values.append(lp.detach())
            row_grads.append(g)
        ctx.save_for_backward(torch.cat(row_grads))
        return torch.cat(values)

    @staticmethod
    def backward(ctx, grad_out):
        (row_grads,) = ctx.saved_tensors  # (N, H)
        return grad_out.unsqueeze(-1).to(row_grads.dtype) * row_grads, None, None, None


def sequence_logprobs(logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or, with ``average``, per-token mean) of masked token log-probs: (B, T) -> (B,).

    A row with no scored tokens gives 0 (the mean divides by ``max(count, 1)``).
    """
    mask = mask.to(logps.dtype)
    total = (logps * mask).sum(-1)  # (B,)
    if average:
        return total / mask.sum(-1).clamp(min=1.0)
    return total


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token entropy ``H = logsumexp(l) - sum(softmax(l) * l)`` of (B, T, V) logits, zero where ``mask`` is False.

    Pass the same (already shifted) positions as the log-probs, e.g. ``entropy_from_logits(logits[:, :-1], mask)``
    with ``mask`` from :func:`token_logprobs`. Computed one row at a time in float32 to bound memory.
    Returns (B, T) float32. Differentiable; wrap in ``torch.no_grad()`` when only logged.
    """
    rows = []
    for row in logits:  # (T, V)
        row = row.float()
        logp = F.log_softmax(row, dim=-1)  # (T, V)
        rows.append(-(logp.exp() * logp).sum(-1))  # (T,)
    ent = torch.stack(rows)  # (B, T)
    return ent.masked_fill(~mask.bool(), 0.0)


def _pad_right(x: torch.Tensor, length: int, value: float) -> torch.Tensor:
    # x: (B, T) -> (B, length)
    return F.pad(x, (0, length - x.size(1)), value=value)


def concatenated_inputs(
    chosen: dict[str, torch.Tensor] | torch.Tensor,
    rejected: dict[str, torch.Tensor] | torch.Tensor,
    pad_id: int,
) -> dict[str, torch.Tensor] | torch.Tensor:
    """Stack chosen (B, Tc) on top of rejected (B, Tr) as one (2B, max(Tc, Tr)) batch for a single forward.

    Right-pads the shorter side. Accepts two tensors (padded with ``pad_id``) or two dicts with the same
    keys, where ``input_ids`` is padded with ``pad_id``, ``labels`` with -100 and every other key
    (``attention_mask``, ``position_ids``, ...) with 0. Undo with :func:`split_concatenated` (n = B).
    """
    if isinstance(chosen, torch.Tensor):
        length = max(chosen.size(1), rejected.size(1))
        return torch.cat([_pad_right(chosen, length, pad_id), _pad_right(rejected, length, pad_id)], dim=0)
    if set(chosen) != set(rejected):
        raise ValueError(f"chosen and rejected have different keys: {sorted(chosen)} vs {sorted(rejected)}")
    length = max(max(v.size(1) for v in chosen.values()), max(v.size(1) for v in rejected.values()))
    out = {}
    for key in chosen:
        value = pad_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        out[key] = torch.cat([_pad_right(chosen[key], length, value), _pad_right(rejected[key], length, value)], dim=0)
    return out


def split_concatenated(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a concatenated (2n, ...) tensor back into its chosen (n, ...) and rejected (n, ...) halves."""
    if x.size(0) != 2 * n:
        raise ValueError(f"expected a batch of 2*{n} rows, got {x.size(0)}")
    return x[:n], x[n:]
