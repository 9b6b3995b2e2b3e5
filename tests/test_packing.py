"""Chunking, bin packing, collators, and packed == unpacked on a tiny Llama."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from medgpt_ds.data.packing import PackedCollator, PaddedCollator, chunk_documents, pack_sequences

pytestmark = pytest.mark.unit

PAD = 99


def test_chunk_documents_counts():
    docs = [[1, 2, 3], [4] * 10, [], [5, 6]]
    chunks, stats = chunk_documents(docs, block_size=4, eos_id=0)
    assert chunks == [[1, 2, 3, 0], [4, 4, 4, 4], [4, 4, 4, 4], [4, 4, 0], [5, 6, 0]]
    assert stats == {"docs": 4, "empty_docs": 1, "chunks": 5, "split_docs": 1, "tokens": 18}


def test_chunk_documents_without_eos():
    chunks, stats = chunk_documents([[1, 2, 3, 4], [5, 6, 7, 8, 9]], block_size=4, eos_id=None)
    assert chunks == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert stats["split_docs"] == 1 and stats["tokens"] == 9
    with pytest.raises(ValueError):
        chunk_documents([[1]], block_size=0, eos_id=None)


def test_pack_sequences_hand_example():
    # Decreasing order 5,4,3,3,2,2,1 into rows of 8, each into the fullest row that fits:
    # 5->r0(3 left) 4->r1(4) 3->r0(0) 3->r1(1) 2->r2(6) 2->r2(4) 1->r1(0)
    assert pack_sequences([5, 4, 3, 3, 2, 2, 1], 8) == [[0, 2], [1, 3, 6], [4, 5]]
    assert pack_sequences([], 8) == []
    assert pack_sequences([8, 8], 8) == [[0], [1]]


def test_pack_sequences_properties():
    rng = random.Random(0)
    lengths = [rng.randint(1, 512) for _ in range(5000)] + [512, 1, 0]
    rows = pack_sequences(lengths, 512)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))  # every sample exactly once
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    # Decreasing-size packing uses at most 11/9 OPT + 1 rows; OPT >= total / capacity.
    assert len(rows) <= 11 / 9 * math.ceil(sum(lengths) / 512) + 1
    assert pack_sequences(list(lengths), 512) == rows  # deterministic


def test_pack_sequences_rejects_long_samples():
    with pytest.raises(ValueError, match="sample 1 has length 9"):
        pack_sequences([3, 9], 8)


def _sample(ids, n_prompt=0):
    return {"input_ids": list(ids), "labels": [-100] * n_prompt + list(ids[n_prompt:])}


def test_packed_collator_layout():
    rows = [[_sample([1, 2, 3], n_prompt=1), _sample([4, 5])], [_sample([6])]]
    batch = PackedCollator(pad_token_id=PAD)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_label_tokens", "num_tokens"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, PAD, PAD, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100] * 5]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert batch["num_label_tokens"].item() == 3  # labels[:, 1:] != -100
    assert batch["num_tokens"].item() == 6
    assert batch["input_ids"].dtype == torch.long


def test_padded_collator_layout():
    batch = PaddedCollator(pad_token_id=PAD)([_sample([1, 2, 3], n_prompt=1), _sample([4])])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["num_label_tokens"].item() == 2
    assert batch["num_tokens"].item() == 4
    with pytest.raises(ValueError, match="differ in length"):
        PaddedCollator(0)([{"input_ids": [1, 2], "labels": [1]}])


def _token_losses(logits, labels):
    """Per-token cross-entropy of next-token prediction, at labelled positions only."""
    logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()  # (B*(T-1), V)
    loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    return loss[labels != -100]


@pytest.fixture(scope="module")
def packing_case():
    gen = torch.Generator().manual_seed(0)
    samples = []
    for n, n_prompt in ((7, 2), (5, 0), (9, 3), (4, 1)):
        ids = torch.randint(0, 64, (n,), generator=gen).tolist()
        samples.append(_sample(ids, n_prompt))
    rows = [[samples[0], samples[1]], [samples[2], samples[3]]]
    return rows, PackedCollator(pad_token_id=0)(rows)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_separate(tiny_llama, packing_case, attn):
    rows, batch = packing_case
    model = tiny_llama(vocab_size=64, attn_implementation=attn)

    model.zero_grad()
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                use_cache=False)
    packed = _token_losses(out.logits, batch["labels"])
    packed.sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    separate = []
    for sample in (s for row in rows for s in row):
        ids = torch.tensor([sample["input_ids"]])
        separate.append(_token_losses(model(input_ids=ids, use_cache=False).logits,
                                      torch.tensor([sample["labels"]])))
    separate = torch.cat(separate)
    separate.sum().backward()

    assert packed.shape == separate.shape == (batch["num_label_tokens"].item(),)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_needs_use_cache_false_and_no_mask(tiny_llama, packing_case, attn):
    """use_cache=True (the config default) or an attention mask switches off packed-sequence
    detection: later samples then attend to earlier ones and their losses change."""
    _, batch = packing_case
    model = tiny_llama(vocab_size=64, attn_implementation=attn)
    with torch.no_grad():
        ok = _token_losses(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                 use_cache=False).logits, batch["labels"])
        cached = _token_losses(model(input_ids=batch["input_ids"],
                                     position_ids=batch["position_ids"], use_cache=True).logits,
                               batch["labels"])
        masked = _token_losses(model(input_ids=batch["input_ids"],
                                     position_ids=batch["position_ids"],
                                     attention_mask=torch.ones_like(batch["input_ids"]),
                                     use_cache=False).logits, batch["labels"])
    assert (cached - ok).abs().max() > 1e-3
    assert (masked - ok).abs().max() > 1e-3
