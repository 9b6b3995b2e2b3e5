"""Chunking, bin packing and collators, and the choice of packed layout per model.

Packed samples never see each other. Three layouts, chosen by ``packing_plan`` from the model's
config and attention implementation (every one gives the per-token losses and gradients of the
samples run one by one; tested per model family in tests/test_families.py):

- ``rows`` (sdpa / eager): rows of concatenated samples (B, T), position_ids restarting at 0 per
  sample, NO attention_mask, ``use_cache=False``: transformers' mask builder detects the
  boundaries from the position ids. An attention mask (even all ones) or ``use_cache=True``
  disables that detection and samples silently attend to each other.
- ``flat`` (flash-attention, linear-attention kernels): the whole micro batch flattened into one
  row (1, N) plus ``cu_seq_lens_q/k`` (int32, (S+1,)) and ``max_length_q/k`` (int), as
  transformers' ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` emits. flash-attn
  runs its varlen kernel on them; it infers boundaries from position ids only for a single row
  (``_is_packed_sequence``), so (B, T) rows with B > 1 would leak there. Gated DeltaNet layers also
  get ``seq_idx`` (int32, (1, N)) for their causal convolution.
- ``padded``: one sample per right-padded row with an attention mask, for models whose layers
  carry state across a packed row and lack the kernels that keep samples apart (linear attention
  on CPU or without flash-linear-attention / causal-conv1d).

The loss is unchanged by the layout: the loop divides the summed token losses by the number of
label tokens of the whole optimizer step (all micro batches, all ranks), and every layout labels
exactly the same tokens (the first token of every sample is never a target).
"""
from __future__ import annotations

import bisect
import importlib.util
from dataclasses import dataclass

import torch

from medgpt_ds.logprobs import IGNORE_INDEX


def chunk_documents(docs: list[list[int]], block_size: int,
                    eos_id: int | None) -> tuple[list[list[int]], dict]:
    """Pretraining: append ``eos_id`` to each document and cut documents longer than
    ``block_size`` into block_size pieces (the last piece may be shorter).

    Returns (chunks, stats) with stats keys docs, empty_docs, chunks, split_docs, tokens.
    Empty documents are skipped; chunks are meant to be packed with pack_sequences.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    chunks: list[list[int]] = []
    stats = {"docs": len(docs), "empty_docs": 0, "chunks": 0, "split_docs": 0, "tokens": 0}
    for doc in docs:
        if not doc:
            stats["empty_docs"] += 1
            continue
        ids = list(doc) + ([eos_id] if eos_id is not None else [])
        stats["tokens"] += len(ids)
        if len(ids) > block_size:
            stats["split_docs"] += 1
        chunks += [ids[i:i + block_size] for i in range(0, len(ids), block_size)]
    stats["chunks"] = len(chunks)
    return chunks, stats


def pack_sequences(lengths: list[int], max_len: int) -> list[list[int]]:
    """Bin-pack sample ``lengths`` into rows of at most ``max_len`` tokens; returns the sample
    indices of each row.

    Decreasing-size packing, placing each sample in the open row with the least room that still
    fits it (best fit, found by bisect on the sorted remaining capacities: O(n log n) searches).
    Deterministic: ties go to the lower index. Truncate samples first; longer ones are an error.
    """
    for i, n in enumerate(lengths):
        if n > max_len or n < 0:
            raise ValueError(f"sample {i} has length {n}, outside [0, max_len={max_len}]; "
                             "truncate before packing")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row index)
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            room, row = max_len - n, len(rows) - 1
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def _as_list(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def _counts(labels: torch.Tensor, num_tokens: int) -> dict:
    # Labels are shifted inside the loss, so position 0 never counts as a target.
    return {"num_label_tokens": (labels[:, 1:] != IGNORE_INDEX).sum(),
            "num_tokens": torch.tensor(num_tokens, dtype=torch.long)}


class PackedCollator:
    """Rows of samples -> packed batch, plus num_label_tokens and num_tokens.

    Each row concatenates its samples ({"input_ids", "labels"}); position ids restart at 0 per
    sample and the first label of every sample is -100 so no token predicts across a boundary.

    ``flatten=False`` (layout ``rows``): input_ids, labels, position_ids (B, T), no attention mask;
    rows are right-padded to the longest row (pad ids, labels -100, positions restarting at 0, so
    the pad run is a separate sequence of its own).

    ``flatten=True`` (layout ``flat``, the contract other parts build on): the micro batch's
    samples in one row, input_ids, labels, position_ids (1, N) with N the number of real tokens (no
    padding), ``cu_seq_lens_q`` = ``cu_seq_lens_k`` (int32, (S+1,): 0 and the end offset of each of
    the S samples) and ``max_length_q`` = ``max_length_k`` (int, the longest sample); with
    ``seq_idx=True`` also seq_idx (int32, (1, N): the sample index of every token).
    """

    def __init__(self, pad_token_id: int, flatten: bool = False, seq_idx: bool = False):
        self.pad_token_id = pad_token_id
        self.flatten = flatten
        self.seq_idx = seq_idx

    def __call__(self, rows: list[list[dict]]) -> dict[str, torch.Tensor]:
        ids_rows, label_rows, pos_rows = [], [], []
        lengths: list[int] = []
        for row in rows:
            ids, labels, pos = [], [], []
            for sample in row:
                s_ids, s_labels = _as_list(sample["input_ids"]), _as_list(sample["labels"])
                if len(s_ids) != len(s_labels):
                    raise ValueError(f"input_ids and labels differ in length "
                                     f"({len(s_ids)} vs {len(s_labels)})")
                ids += s_ids
                labels += ([IGNORE_INDEX] + s_labels[1:]) if s_labels else []
                pos += range(len(s_ids))
                if s_ids:
                    lengths.append(len(s_ids))
            ids_rows.append(ids)
            label_rows.append(labels)
            pos_rows.append(pos)
        num_tokens = sum(lengths)
        if self.flatten:
            return self._flat(ids_rows, label_rows, pos_rows, lengths, num_tokens)
        width = max(len(r) for r in ids_rows)
        for ids, labels, pos in zip(ids_rows, label_rows, pos_rows):
            pad = width - len(ids)
            ids += [self.pad_token_id] * pad
            labels += [IGNORE_INDEX] * pad
            pos += range(pad)
        labels_t = torch.tensor(label_rows, dtype=torch.long)  # (B, T)
        return {"input_ids": torch.tensor(ids_rows, dtype=torch.long),  # (B, T)
                "labels": labels_t,
                "position_ids": torch.tensor(pos_rows, dtype=torch.long),  # (B, T)
                **_counts(labels_t, num_tokens)}

    def _flat(self, ids_rows, label_rows, pos_rows, lengths: list[int], num_tokens: int) -> dict:
        if not lengths:
            raise ValueError("a packed micro batch with no tokens")
        cat = [x for r in ids_rows for x in r]
        labels_t = torch.tensor([[x for r in label_rows for x in r]], dtype=torch.long)  # (1, N)
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)  # (S+1,)
        batch = {"input_ids": torch.tensor([cat], dtype=torch.long),  # (1, N)
                 "labels": labels_t,
                 "position_ids": torch.tensor([[x for r in pos_rows for x in r]], dtype=torch.long),  # (1, N)
                 "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                 "max_length_q": max(lengths), "max_length_k": max(lengths),
                 **_counts(labels_t, num_tokens)}
        if self.seq_idx:
            batch["seq_idx"] = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32),
                                                       torch.tensor(lengths))[None]  # (1, N)
        return batch


# batch keys that go to the model's forward (the rest are counts for the loop)
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                    "max_length_q", "max_length_k", "seq_idx")


def model_inputs(batch: dict) -> dict:
    """The forward kwargs of a collated batch (whatever its layout): ids, mask or position ids, and
    the sample boundaries of a flat batch."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


class PaddedCollator:
    """Samples -> right-padded batch: input_ids, labels, attention_mask (B, T), plus
    num_label_tokens and num_tokens."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [(_as_list(s["input_ids"]), _as_list(s["labels"])) for s in samples]
        for ids, labels in seqs:
            if len(ids) != len(labels):
                raise ValueError(f"input_ids and labels differ in length "
                                 f"({len(ids)} vs {len(labels)})")
        width = max(len(ids) for ids, _ in seqs)
        ids_rows, label_rows, mask_rows = [], [], []
        for ids, labels in seqs:
            pad = width - len(ids)
            ids_rows.append(ids + [self.pad_token_id] * pad)
            label_rows.append(labels + [IGNORE_INDEX] * pad)
            mask_rows.append([1] * len(ids) + [0] * pad)
        labels_t = torch.tensor(label_rows, dtype=torch.long)  # (B, T)
        return {"input_ids": torch.tensor(ids_rows, dtype=torch.long),  # (B, T)
                "labels": labels_t,
                "attention_mask": torch.tensor(mask_rows, dtype=torch.long),  # (B, T)
                **_counts(labels_t, sum(len(ids) for ids, _ in seqs))}


# Layer kinds (config.layer_types) that only mix tokens through attention masks built from the
# position ids or through cu_seq_lens: packing by position ids is exact for them.
_MASKED_LAYER_KINDS = {"full_attention", "sliding_attention", "chunked_attention", "dense", "sparse", "moe"}
# Gated DeltaNet hybrids: transformers keeps packed samples apart in their linear-attention layers
# when given cu_seq_lens (flash-linear-attention's chunk_gated_delta_rule) and seq_idx (the
# causal-conv1d kernel); its PyTorch fallbacks refuse both.
_GATED_DELTANET_TYPES = {"qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"}
# state-space / recurrent architectures without layer_types: every layer carries state
_RECURRENT_TYPES = {"mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "recurrent_gemma", "jamba", "zamba"}


@dataclass
class PackingPlan:
    """How packed batches are laid out for one model (see the module docstring)."""

    layout: str  # "rows" | "flat" | "padded"
    seq_idx: bool = False  # flat batches also carry seq_idx (Gated DeltaNet convolutions)
    notice: str = ""  # one line for the log when packing falls back to padded rows

    def collator(self, pad_token_id: int):
        """The collator of this layout (PaddedCollator over single samples for ``padded``)."""
        if self.layout == "padded":
            return PaddedCollator(pad_token_id)
        return PackedCollator(pad_token_id, flatten=self.layout == "flat", seq_idx=self.seq_idx)


def _kernels_available(device_type: str) -> list[str]:
    """The packages missing for exact packed linear attention (empty when all are there)."""
    missing = [dist for mod, dist in (("fla", "flash-linear-attention"), ("causal_conv1d", "causal-conv1d"))
               if importlib.util.find_spec(mod) is None]
    return missing + (["a CUDA device"] if device_type != "cuda" else [])


def packing_plan(config, attn_implementation: str, device_type: str) -> PackingPlan:
    """Choose the packed layout that keeps samples apart for this model (``config``: the model's
    config, composite or text), attention implementation and device."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", "")
    kinds = set(getattr(text, "layer_types", None) or [])
    stateful = sorted(kinds - _MASKED_LAYER_KINDS)
    if model_type in _RECURRENT_TYPES:
        stateful = stateful or [model_type]
    flash = "flash" in (attn_implementation or "")
    if not stateful:
        return PackingPlan("flat" if flash or attn_implementation not in ("sdpa", "eager") else "rows")
    if stateful == ["linear_attention"] and model_type in _GATED_DELTANET_TYPES:
        missing = _kernels_available(device_type)
        if not missing:
            return PackingPlan("flat", seq_idx=True)
        why = "needs " + (", ".join(missing[:-1]) + " and " + missing[-1] if len(missing) > 1 else missing[0])
    else:
        why = "no kernel here keeps packed samples apart in them"
    return PackingPlan("padded", notice=(
        f"packing: {model_type} has {'/'.join(stateful)} layers that carry state across a packed row and {why}: "
        "one sample per padded row instead (exact, slower; loss normalisation unchanged)"))
