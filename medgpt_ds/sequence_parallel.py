"""Ulysses sequence parallelism (DeepSpeed's UlyssesSPAttentionHF) for Hugging Face models.

``--sequence_parallel_size N`` puts N consecutive ranks in a group that trains on the same samples:
every rank of the group collates the same micro batch (the loop hands out items by data-parallel
rank) and keeps its 1/N slice of each row's tokens (:class:`ShardCollator`). Embeddings, MLPs, norms
and the loss run on the slice; in each attention layer DeepSpeed's all-to-all turns "my tokens, all
heads" into "all tokens, my heads", so attention sees the whole sequence, then turns it back. The
loss of a slice is a sum over its own tokens (labels are shifted before slicing, so the last token
of a slice is scored against the first token of the next one); per-token loss sums and unit counts
add up over the group, so the loop's global normalisation is unchanged, and DeepSpeed (given the
groups as `mpu`) reduces gradients over all ranks and averages over the data-parallel size
world / N. Preference stages sum each row's log-probs over the group first (dist.sp_all_reduce_sum).

Why not DeepSpeed's UlyssesSPDataLoaderAdapter: it all-gathers one batch from every rank of the
group and runs them one after another, turning N micro batches into N x more steps of one sample;
our loop already knows the global item order, so each group builds its batch locally, the batch
arithmetic stays micro x accumulation x (world / N), and no batch crosses the network.

Packed rows: DeepSpeed's attention wrapper drops the attention mask and flash-attention finds the
samples of a one-row batch from the gathered position ids; sdpa (and flash-attention on several
packed rows) would let samples attend to each other, so the core attention here runs each packed
sample on its own (:func:`_packed_core`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from medgpt_ds import dist
from medgpt_ds.errors import UserError
from medgpt_ds.logprobs import IGNORE_INDEX

SUPPORTED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")


def check_model(model) -> None:
    """Refuse (one line) models whose attention Ulysses cannot shard correctly."""
    base = getattr(model, "module", model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    impl = base.config._attn_implementation
    cfg = base.config.get_text_config()
    n = dist.sp_size()
    where = f"--sequence_parallel_size {n} ({type(base).__name__})"
    if impl not in SUPPORTED_ATTENTION:
        raise UserError(f"{where}: attention {impl!r} keeps a full (T x T) mask per layer and is not supported; "
                        "use --attn_implementation sdpa or flash_attention_2")
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if heads % n:
        raise UserError(f"{where}: {heads} attention heads are not divisible by {n}")
    if kv % n and n % kv:
        raise UserError(f"{where}: {kv} key/value heads and {n} ranks: one must divide the other")
    layer_types = getattr(cfg, "layer_types", None) or []
    if any("linear_attention" in str(x) for x in layer_types):
        raise UserError(f"{where}: linear-attention layers carry a state along the sequence that Ulysses does not "
                        "exchange (the loss would be silently wrong)")
    sliding = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False
    if sliding and impl == "sdpa":
        raise UserError(f"{where}: sliding-window attention with sdpa is expressed by the attention mask, which "
                        "sequence parallelism cannot pass; use --attn_implementation flash_attention_2")


def register(model) -> None:
    """Check ``model`` and route its attention implementation through Ulysses (once per process: the
    DPO reference model shares the registration)."""
    if dist.sp_size() == 1:
        return
    check_model(model)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = getattr(model, "module", model)
    impl = (base.get_base_model() if hasattr(base, "get_base_model") else base).config._attn_implementation
    if getattr(ALL_ATTENTION_FUNCTIONS[impl], "_medgpt_ulysses", False):
        return
    core = _packed_core(ALL_ATTENTION_FUNCTIONS[impl], impl)
    cache: dict = {}

    def ulysses_attention(module, query, key, value, attention_mask, *args, **kwargs):
        # query (B, Hq, T/N, D), key/value (B, Hkv, T/N, D): this rank's tokens, all heads. The mask is
        # dropped (it was built for the slice; position ids carry causality and packing).
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        shape = (query.size(0), query.size(1), query.size(-1), key.size(1))
        if shape not in cache:
            cache[shape] = UlyssesSPAttentionHF(
                attn=core, batch_size=shape[0], attn_head_count=shape[1], attn_head_size=shape[2],
                kv_head_count=shape[3], num_hidden_layers=1, process_group=dist.sp_group(),
                seq_length_is_variable=True)
        return cache[shape](module, query, key, value, None, *args, **kwargs)

    ulysses_attention._medgpt_ulysses = True
    ALL_ATTENTION_FUNCTIONS[impl] = ulysses_attention


def _packed_core(core: Callable, impl: str) -> Callable:
    """The core attention over the gathered sequence, keeping packed samples apart: rows whose
    position ids restart run one sample at a time (causal within it), except a single row under
    flash-attention, which finds the samples itself (position ids / cu_seq_lens)."""
    pass_through = impl.startswith("flash")

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        pos = kwargs.get("position_ids")  # (B, T) after DeepSpeed's all-gather
        if pos is None or (pass_through and query.size(0) == 1):
            return core(module, query, key, value, attention_mask, *args, **kwargs)
        restarts = torch.ones_like(pos, dtype=torch.bool)
        restarts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1  # (B, T) True where a sample starts
        if not restarts[:, 1:].any():
            return core(module, query, key, value, attention_mask, *args, **kwargs)
        rest = {k: v for k, v in kwargs.items()
                if k not in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
        rows = []
        for b in range(query.size(0)):
            starts = restarts[b].nonzero().squeeze(-1).tolist() + [query.size(2)]
            parts = [core(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], None,
                          *args, **rest)[0] for s, e in zip(starts[:-1], starts[1:])]
            rows.append(torch.cat(parts, dim=1))  # (1, T, Hq_local, D)
        return torch.cat(rows, dim=0), None

    return attention


class ShardCollator:
    """Wrap a collator: the batch it builds (the same on every rank of a sequence-parallel group) is
    cut into this rank's slice of tokens.

    Rows are right-padded to a multiple of N (pad ids, ignored labels, position ids continuing the
    row, so padding stays a causal tail). ``labels`` become ``shift_labels`` before slicing (position
    t is scored against token t+1, which may sit on the next rank). ``position_ids`` are always sent
    (Ulysses gathers them for attention); the right-padding ``attention_mask`` is dropped. Counts
    become this rank's share (label tokens of its slice; real tokens and pairs split evenly), so
    they add up to the batch's over the group. ``cu_seq_lens_q/k`` (flattened micro batches) cover
    the padding as one more sequence.
    """

    def __init__(self, collate: Callable, pad_token_id: int):
        self.collate = collate
        self.pad_token_id = pad_token_id

    def __call__(self, items) -> dict:
        return shard_batch(self.collate(items), self.pad_token_id, dist.sp_rank(), dist.sp_size())


def shard_batch(batch: dict, pad_token_id: int, rank: int, size: int) -> dict:
    """Rank ``rank``'s slice of a collated batch (see :class:`ShardCollator`)."""
    ids = batch["input_ids"]  # (B, T)
    rows, length = ids.shape
    width = math.ceil(length / size) * size
    pad = width - length
    mask = batch.get("attention_mask")
    if mask is not None and (mask[:, 1:] > mask[:, :-1]).any():
        raise ValueError("sequence parallelism needs right-padded rows (a 0 in the attention mask before a 1)")
    pos = batch.get("position_ids")
    if pos is None:
        pos = torch.arange(length, dtype=torch.long).expand(rows, length)
    pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(pad, dtype=torch.long).expand(rows, pad)], dim=1)
    ids = F.pad(ids, (0, pad), value=pad_token_id)
    shift = F.pad(batch["labels"][:, 1:], (0, 1 + pad), value=IGNORE_INDEX)  # (B, width)
    chunk = width // size
    cut = slice(rank * chunk, (rank + 1) * chunk)
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "position_ids", "attention_mask")}
    out.update(input_ids=ids[:, cut].contiguous(), shift_labels=shift[:, cut].contiguous(),
               position_ids=pos[:, cut].contiguous())
    if "num_label_tokens" in batch:
        out["num_label_tokens"] = (out["shift_labels"] != IGNORE_INDEX).sum()
    if "num_tokens" in batch:
        total = int(batch["num_tokens"])
        out["num_tokens"] = torch.tensor(total // size + (1 if rank < total % size else 0), dtype=torch.long)
    if "num_pairs" in batch:
        out["num_pairs"] = torch.tensor(float(batch["num_pairs"]) / size, dtype=torch.float64)
    if pad and "cu_seq_lens_q" in batch:
        for q in ("q", "k"):
            cu = batch[f"cu_seq_lens_{q}"]
            out[f"cu_seq_lens_{q}"] = torch.cat([cu, cu.new_tensor([int(cu[-1]) + pad])])
            if f"max_length_{q}" in batch:
                out[f"max_length_{q}"] = max(int(batch[f"max_length_{q}"]), pad)
    return out
