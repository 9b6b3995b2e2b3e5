"""Chunking, bin packing, collators (rows, flat, padded), the layout per model, and packed ==
unpacked on a tiny Llama (every family: tests/test_families.py)."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from medgpt_ds.data.packing import (PackedCollator, PackingPlan, PaddedCollator, chunk_documents, model_inputs,
                                   pack_sequences, packing_plan)

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


# --- flat batches (the layout flash-attention and linear-attention kernels need) ----------------

def _flat_rows():
    return [[_sample([1, 2, 3], n_prompt=1), _sample([4, 5])], [_sample([6])]]


def test_flat_collator_layout():
    """A micro batch of 2 packed rows flattened into one row with the sample boundaries: the
    contract other parts build on (input_ids/labels/position_ids (1, N), cu_seq_lens int32 (S+1,),
    max_length int)."""
    batch = PackedCollator(pad_token_id=PAD, flatten=True, seq_idx=True)(_flat_rows())
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]  # no padding at all
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == torch.int32 and batch[key].tolist() == [0, 3, 5, 6]
    assert batch["max_length_q"] == batch["max_length_k"] == 3 and isinstance(batch["max_length_q"], int)
    assert batch["seq_idx"].dtype == torch.int32 and batch["seq_idx"].tolist() == [[0, 0, 0, 1, 1, 2]]
    assert batch["num_label_tokens"].item() == 3 and batch["num_tokens"].item() == 6  # as the rows layout
    assert "seq_idx" not in PackedCollator(PAD, flatten=True)(_flat_rows())


def test_flat_collator_equals_transformers_flattening():
    """Same tensors as transformers' DataCollatorWithFlattening(return_flash_attn_kwargs=True,
    return_seq_idx=True) on the samples in row order."""
    from transformers import DataCollatorWithFlattening

    gen = torch.Generator().manual_seed(1)
    samples = [_sample(torch.randint(0, 50, (n,), generator=gen).tolist(), n_prompt=k)
               for n, k in ((7, 2), (3, 0), (11, 4), (5, 1))]
    ours = PackedCollator(0, flatten=True, seq_idx=True)([samples[:2], samples[2:]])
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(samples)
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "seq_idx"):
        assert torch.equal(ours[key], theirs[key]), key
        assert ours[key].dtype == theirs[key].dtype, key
    assert ours["max_length_q"] == theirs["max_length_q"] and ours["max_length_k"] == theirs["max_length_k"]


def test_flash_attention_gets_the_boundaries():
    """What transformers' flash-attention path does with our batches: with cu_seq_lens / max_length
    present it runs the varlen kernel on exactly the sample boundaries (the same ones it would derive
    from the position ids); a (2, T) packed micro batch instead is not detected as packed
    (_is_packed_sequence needs one row), which is why flash runs get flat batches."""
    from transformers.modeling_flash_attention_utils import (_is_packed_sequence,
                                                             prepare_fa_kwargs_from_position_ids)

    flat = PackedCollator(PAD, flatten=True)(_flat_rows())
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(flat["position_ids"])
    assert cu_q.tolist() == cu_k.tolist() == flat["cu_seq_lens_q"].tolist()
    assert int(max_q) == int(max_k) == flat["max_length_q"]
    assert _is_packed_sequence(flat["position_ids"], batch_size=1)
    rows = PackedCollator(PAD)(_flat_rows())
    assert not _is_packed_sequence(rows["position_ids"], batch_size=2)


def test_flat_batch_equals_separate(tiny_llama, packing_case):
    """The flattened micro batch gives the per-token losses of the samples run one by one (sdpa
    reads the boundaries from the position ids of the single row)."""
    rows, _ = packing_case
    model = tiny_llama(vocab_size=64)
    batch = PackedCollator(pad_token_id=0, flatten=True)(rows)
    with torch.no_grad():
        packed = _token_losses(model(**model_inputs(batch), use_cache=False).logits, batch["labels"])
        separate = torch.cat([_token_losses(model(input_ids=torch.tensor([s["input_ids"]])).logits,
                                            torch.tensor([s["labels"]])) for row in rows for s in row])
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=0)


# --- the layout per model -------------------------------------------------------------------------

def _config(model_type: str, **kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **kw)


def test_packing_plan_per_attention_path(monkeypatch):
    import importlib.util

    llama = _config("llama")
    assert packing_plan(llama, "sdpa", "cpu") == PackingPlan("rows")
    assert packing_plan(llama, "eager", "cuda") == PackingPlan("rows")
    assert packing_plan(llama, "flash_attention_2", "cuda") == PackingPlan("flat")
    gemma = _config("gemma3_text", sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                    num_hidden_layers=2)
    assert packing_plan(gemma, "sdpa", "cpu").layout == "rows"

    qwen35 = _config("qwen3_5_text", layer_types=["linear_attention", "full_attention"], num_hidden_layers=2)
    plan = packing_plan(qwen35, "sdpa", "cpu")
    assert plan.layout == "padded" and "flash-linear-attention" in plan.notice and "a CUDA device" in plan.notice
    assert isinstance(plan.collator(PAD), PaddedCollator)
    composite = _config("qwen3_5", text_config=qwen35.to_dict())
    assert packing_plan(composite, "flash_attention_2", "cuda").layout == "padded"  # reads the text config
    # with the kernels installed on a CUDA machine: flat batches with seq_idx
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("fla", "causal_conv1d") else real(name, *a))
    assert packing_plan(qwen35, "sdpa", "cuda") == PackingPlan("flat", seq_idx=True)
    collate = packing_plan(qwen35, "flash_attention_2", "cuda").collator(PAD)
    assert collate.flatten and collate.seq_idx
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "fla" else real(name, *a))
    plan = packing_plan(qwen35, "sdpa", "cuda")
    assert plan.layout == "padded" and "causal-conv1d" in plan.notice and "flash-linear" not in plan.notice
    assert packing_plan(_config("mamba"), "sdpa", "cuda").layout == "padded"


def test_pack_or_pad_follows_the_plan():
    from medgpt_ds.stages.sft import pack_or_pad

    items = [_sample(list(range(1, n + 1))) for n in (5, 3, 4, 2)]
    rows, collate = pack_or_pad(items, 8, PackingPlan("flat"), PAD, "test")
    assert [len(r) for r in rows] == [2, 2] and collate.flatten
    assert collate(rows)["input_ids"].shape == (1, 14)
    same, collate = pack_or_pad(items, 8, PackingPlan("padded", notice="packing: fallback"), PAD, "test")
    assert same is items and isinstance(collate, PaddedCollator)
    same, collate = pack_or_pad(items, 8, None, PAD, "test")  # --packing False
    assert same is items and isinstance(collate, PaddedCollator)
