"""Token/sequence log-probs, entropy and the chosen+rejected concatenated batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from medgpt_ds.logprobs import (
    concatenated_inputs,
    entropy_from_logits,
    sequence_logprobs,
    split_concatenated,
    token_logprobs,
)

pytestmark = pytest.mark.unit


def test_token_logprobs_hand_case():
    # One row, T=3, V=2. logits[0] = [0, ln3] -> p = [1/4, 3/4]; logits[1] = [0, 0] -> p = [1/2, 1/2].
    # labels[1:] = [1, 0] -> logps = [ln(3/4), ln(1/2)]. logits[2] is never used (nothing to predict).
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0], [5.0, -5.0]]], dtype=torch.float64)
    labels = torch.tensor([[7, 1, 0]])  # labels[0] is never scored (no logit predicts it)
    logps, mask = token_logprobs(logits, labels)
    assert logps.shape == (1, 2) and mask.tolist() == [[True, True]]
    torch.testing.assert_close(logps, torch.tensor([[math.log(0.75), math.log(0.5)]], dtype=torch.float64))


def test_token_logprobs_ignore_index_and_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :3] = -100
    labels[2, 4:] = -100
    logps, mask = token_logprobs(logits, labels)
    ref = F.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected_mask = labels[:, 1:] != -100
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(logps, torch.where(expected_mask, ref, 0.0))
    assert (logps[~mask] == 0).all()


def test_token_logprobs_bf16_is_upcast_and_close():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 50) * 4
    labels = torch.randint(0, 50, (2, 5))
    lp32, _ = token_logprobs(logits, labels)
    lp16, _ = token_logprobs(logits.bfloat16(), labels)
    assert lp16.dtype == torch.float32
    ref, _ = token_logprobs(logits.bfloat16().float(), labels)  # same rounded inputs, float32 math
    torch.testing.assert_close(lp16, ref)
    torch.testing.assert_close(lp16, lp32, atol=0.1, rtol=0)


def test_token_logprobs_gradient_matches_log_softmax():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 4))
    logps, _ = token_logprobs(logits, labels)
    (logps * torch.arange(3, dtype=torch.float64)).sum().backward()
    g1 = logits.grad.clone()
    logits.grad = None
    ref = F.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].unsqueeze(-1)).squeeze(-1)
    (ref * torch.arange(3, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(g1, logits.grad)


def test_sequence_logprobs_sum_and_average():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # row 0: -1-2 = -3 (mean -1.5); row 1: -0.5; row 2: empty -> 0
    assert sequence_logprobs(logps, mask).tolist() == [-3.0, -0.5, 0.0]
    assert sequence_logprobs(logps, mask, average=True).tolist() == [-1.5, -0.5, 0.0]


def test_entropy_from_logits():
    # uniform over V=4 -> ln 4; p = [1/4, 3/4] -> -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351446
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -1e9, -1e9], [1.0, 2.0, 3.0, 4.0]]])
    mask = torch.tensor([[True, True, False]])
    ent = entropy_from_logits(logits, mask)
    assert ent.dtype == torch.float32 and ent.shape == (1, 3)
    torch.testing.assert_close(ent, torch.tensor([[math.log(4), 0.5623351446, 0.0]]))


def test_concatenated_inputs_dicts_and_split():
    chosen = {
        "input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]]),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
        "labels": torch.tensor([[-100, 2, 3], [-100, 5, 6]]),
    }
    rejected = {
        "input_ids": torch.tensor([[1, 9, 9, 9, 9], [4, 8, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]),
        "labels": torch.tensor([[-100, 9, 9, 9, 9], [-100, 8, -100, -100, -100]]),
    }
    batch = concatenated_inputs(chosen, rejected, pad_id=0)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 0, 0],
        [4, 5, 6, 0, 0],
        [1, 9, 9, 9, 9],
        [4, 8, 0, 0, 0],
    ]
    assert batch["attention_mask"][:2].tolist() == [[1, 1, 1, 0, 0]] * 2
    assert batch["labels"][0].tolist() == [-100, 2, 3, -100, -100]
    c, r = split_concatenated(batch["input_ids"], 2)
    assert torch.equal(c[:, :3], chosen["input_ids"]) and torch.equal(r, rejected["input_ids"])
    with pytest.raises(ValueError, match="2\\*3"):
        split_concatenated(batch["input_ids"], 3)
    with pytest.raises(ValueError, match="different keys"):
        concatenated_inputs(chosen, {"input_ids": rejected["input_ids"]}, pad_id=0)


def test_concatenated_inputs_tensors_pad_with_pad_id():
    out = concatenated_inputs(torch.tensor([[5, 6, 7, 8]]), torch.tensor([[5, 6]]), pad_id=2)
    assert out.tolist() == [[5, 6, 7, 8], [5, 6, 2, 2]]


def test_concatenated_forward_equals_separate_forwards():
    # Right padding must not change the log-probs of the real tokens in a causal model.
    torch.manual_seed(3)
    vocab, dim = 13, 8
    emb, head = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab)

    def causal_logits(ids):  # (B, T) -> (B, T, V): a prefix-mean "model", causal by construction
        h = emb(ids).cumsum(1) / torch.arange(1, ids.size(1) + 1).view(1, -1, 1)
        return head(h)

    chosen = {"input_ids": torch.randint(1, vocab, (2, 6)), "labels": torch.randint(1, vocab, (2, 6))}
    rejected = {"input_ids": torch.randint(1, vocab, (2, 4)), "labels": torch.randint(1, vocab, (2, 4))}
    batch = concatenated_inputs(chosen, rejected, pad_id=0)
    logps, mask = token_logprobs(causal_logits(batch["input_ids"]), batch["labels"])
    seq = sequence_logprobs(logps, mask)
    seq_c, seq_r = split_concatenated(seq, 2)
    for part, out in ((chosen, seq_c), (rejected, seq_r)):
        lp, m = token_logprobs(causal_logits(part["input_ids"]), part["labels"])
        torch.testing.assert_close(out, sequence_logprobs(lp, m))
