"""Preference pairs: ids, truncation, the one-forward collator, and its log-probs against separate
forwards of each chosen / rejected sequence."""
import json
import random
import types

import pytest
import torch

from medgpt_ds.config import DataArguments
from medgpt_ds.data.pairs import PairCollator, encode_pair, load_pairs, pair_id, pair_logps
from medgpt_ds.data.templates import TEMPLATES
from medgpt_ds.logprobs import IGNORE_INDEX
from tests.helpers import RECS, pair_data_args

CHATML = TEMPLATES["chatml"]


@pytest.mark.unit
def test_pair_id_is_content_hash():
    assert pair_id([1, 2], [3], [4]) == pair_id([1, 2], [3], [4])
    ids = {pair_id([1, 2], [3], [4]), pair_id([1, 2], [4], [3]), pair_id([1], [2, 3], [4]), pair_id([1, 2], [3], [4, 5])}
    assert len(ids) == 4  # swapping chosen/rejected or moving a boundary changes the id


@pytest.mark.unit
def test_encode_pair_truncates_prompt_left_answers_right(tiny_tokenizer):
    full = encode_pair(tiny_tokenizer, CHATML, RECS[2], pair_data_args(max_source_length=4096, max_target_length=4096))
    assert full["truncated"] is False
    short = encode_pair(tiny_tokenizer, CHATML, RECS[2], pair_data_args(max_source_length=5, max_target_length=3))
    assert short["truncated"] is True
    assert short["prompt_ids"] == full["prompt_ids"][-5:]  # the latest context is kept
    assert short["chosen_ids"] == full["chosen_ids"][:3] and short["rejected_ids"] == full["rejected_ids"][:3]
    assert short["id"] != full["id"]
    assert encode_pair(tiny_tokenizer, CHATML, RECS[2], pair_data_args(max_source_length=5, truncation_mode="drop")) is None
    # the prompt + chosen tokens are exactly the rendered conversation's tokens
    text = tiny_tokenizer.apply_chat_template(RECS[2]["prompt"] + [{"role": "assistant", "content": RECS[2]["chosen"]}],
                                              chat_template=CHATML, tokenize=False)
    assert tiny_tokenizer.decode(full["prompt_ids"] + full["chosen_ids"]) == text


@pytest.mark.unit
def test_collator_layout(tiny_tokenizer):
    items = [encode_pair(tiny_tokenizer, CHATML, r, pair_data_args()) for r in RECS]
    pad = tiny_tokenizer.pad_token_id
    b = PairCollator(pad)(items)
    n = len(items)
    assert b["input_ids"].shape[0] == 2 * n and int(b["num_pairs"]) == n and b["ids"] == [x["id"] for x in items]
    assert "ref_logps" not in b
    rows = [(x["prompt_ids"], x["chosen_ids"]) for x in items] + [(x["prompt_ids"], x["rejected_ids"]) for x in items]
    assert int(b["num_tokens"]) == sum(len(p) + len(a) for p, a in rows)
    for i, (p, a) in enumerate(rows):
        L = len(p) + len(a)
        assert b["input_ids"][i, :L].tolist() == p + a
        assert b["input_ids"][i, L:].eq(pad).all() and b["attention_mask"][i].tolist() == [1] * L + [0] * (b["input_ids"].shape[1] - L)
        assert b["labels"][i, :len(p)].eq(IGNORE_INDEX).all() and b["labels"][i, len(p):L].tolist() == a
        assert b["labels"][i, L:].eq(IGNORE_INDEX).all()
    for x, v in zip(items, ([-1.0, -2.0, 3, 4], [-5.0, -6.0, 7, 8], [-9.0, -1.5, 2, 2])):
        x["ref"] = v
    assert PairCollator(pad)(items)["ref_logps"].tolist() == [[-1.0, -2.0, 3, 4], [-5.0, -6.0, 7, 8], [-9.0, -1.5, 2, 2]]


def _separate_logps(model, ids: list[int], n_prompt: int) -> torch.Tensor:
    """Sum of log p(answer token) from a forward of this sequence alone (no padding, no batch)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
    logp = torch.log_softmax(logits, -1)
    return sum(logp[t - 1, ids[t]] for t in range(n_prompt, len(ids)))


@pytest.mark.unit
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_one_forward_logps_equal_separate_forwards(tiny_tokenizer, tiny_llama, attn):
    model = tiny_llama(len(tiny_tokenizer), attn_implementation=attn).double()  # float64: equal to ~1e-12
    items = [encode_pair(tiny_tokenizer, CHATML, r, pair_data_args()) for r in RECS]
    batch = PairCollator(tiny_tokenizer.pad_token_id)(items)
    sums, counts = pair_logps(model, batch)  # one (2B, T) forward
    n = len(items)
    assert counts.tolist() == [len(x["chosen_ids"]) for x in items] + [len(x["rejected_ids"]) for x in items]
    for i, x in enumerate(items):
        for row, ans in ((i, x["chosen_ids"]), (n + i, x["rejected_ids"])):
            ref = _separate_logps(model, x["prompt_ids"] + ans, len(x["prompt_ids"]))
            assert sums[row].item() == pytest.approx(ref.item(), abs=1e-9)
    # gradients match too: d(sum of all pair log-probs)/d(params) from one forward vs separate ones
    model.zero_grad()
    sums.sum().backward()
    g_batch = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = sum(_separate_logps(model, x["prompt_ids"] + a, len(x["prompt_ids"]))
                for x in items for a in (x["chosen_ids"], x["rejected_ids"]))
    total.backward()
    for g, p in zip(g_batch, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-10, rtol=1e-9)


@pytest.mark.unit
def test_load_pairs_counts_and_formats(tmp_path, tiny_tokenizer, capsys):
    """MedicalGPT and TRL preference rows load into the same pairs; over-long ones are counted."""
    d = tmp_path / "data"
    d.mkdir()
    rng = random.Random(0)
    long_answer = " ".join(rng.choice(["fever", "cough", "pain", "dose"]) for _ in range(80))
    rows = [
        {"conversations": [{"from": "human", "value": "What causes a fever?"}], "chosen": "An infection.", "rejected": "No idea."},
        {"prompt": "What causes a fever?", "chosen": "An infection.", "rejected": "No idea."},  # TRL, same pair
        {"prompt": [{"role": "user", "content": "Dose?"}], "chosen": [{"role": "assistant", "content": long_answer}],
         "rejected": [{"role": "assistant", "content": "Any."}]},
    ]
    (d / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tiny_tokenizer.chat_template = CHATML
    for mode, kept in (("truncate", 3), ("drop", 2)):
        cfg = types.SimpleNamespace(
            data=DataArguments(train_file_dir=str(d), max_source_length=32, max_target_length=16, truncation_mode=mode,
                               template_name="chatml"),
            train=types.SimpleNamespace(seed=1, output_dir=str(tmp_path / mode), stage="dpo"),
            model=types.SimpleNamespace(cache_dir=None))
        train, evals = load_pairs(cfg, tiny_tokenizer, "dpo")
        assert len(train) == kept and evals == []
        assert train[0]["id"] == train[1]["id"]  # MedicalGPT and TRL spellings of one pair: same tokens, same id
        out = capsys.readouterr().out
        assert f"dpo train: {kept} of 3 pairs kept, 1 " in out
        assert all(len(x["chosen_ids"]) <= 16 for x in train)
