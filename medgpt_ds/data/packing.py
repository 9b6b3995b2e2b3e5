"""Chunking, bin packing and collators.

Packed rows carry position_ids that restart at 0 for every sample and NO attention_mask: with
``use_cache=False`` transformers detects the sample boundaries from the position ids and masks
attention across them, so a packed row gives the same losses and gradients as the samples run
one by one (tested for sdpa and eager; flash-attn derives its cu_seqlens from the same position
ids). An attention mask (even all ones) or ``use_cache=True`` disables that detection and
samples silently attend to each other.
"""
from __future__ import annotations

import bisect

import torch

IGNORE_INDEX = -100


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
    """Rows of samples -> packed batch: input_ids, labels, position_ids (B, T), no attention
    mask, plus num_label_tokens and num_tokens.

    Each row concatenates its samples ({"input_ids", "labels"}); position ids restart at 0 per
    sample and the first label of every sample is -100 so no token predicts across a boundary.
    Rows are right-padded to the longest row (pad ids, labels -100, positions restarting at 0,
    so the pad run is a separate sequence of its own).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[list[dict]]) -> dict[str, torch.Tensor]:
        ids_rows, label_rows, pos_rows = [], [], []
        num_tokens = 0
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
            num_tokens += len(ids)
            ids_rows.append(ids)
            label_rows.append(labels)
            pos_rows.append(pos)
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
