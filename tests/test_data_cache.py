"""The tokenized-data cache (issue: stale tokens after an in-place edit, eval records leaking into train):
the key covers the bytes of every input file, the tokenizer's content, the template, every data flag,
the split's seed, and the code; a hit is only ever the same data."""
from __future__ import annotations

import copy
import json
import os

import pytest

from medgpt_ds.config import DataArguments
from medgpt_ds.data.loading import data_key, load_train_eval, tokenize_records
from medgpt_ds.data.templates import TEMPLATES, encode_conversation

pytestmark = pytest.mark.unit


def _write(path, n: int = 20, edit: dict | None = None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            answer = (edit or {}).get(i, f"answer number {i:02d} is fine")
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"question {i:02d}"},
                                                  {"from": "gpt", "value": answer}]}) + "\n")


def _run(tok, data_dir, out, seed: int, capsys, **flags):
    """What the sft stage does before training: load, split, key, tokenize through the cache."""
    d = DataArguments(train_file_dir=str(data_dir), validation_split_percentage=10, template_name="chatml", **flags)
    train, evals, files = load_train_eval(d, "sft", seed, output_dir=str(out))
    key = [data_key("sft", d, tok, files, seed, tool_format="default")]

    def encode(rec):
        return encode_conversation(tok, TEMPLATES["chatml"], rec["messages"], d.model_max_length)

    items, counts = tokenize_records(train, encode, cache_dir=str(out / ".cache" / "tokenized"), key=key + ["train"],
                                     desc="sft-train")
    log = capsys.readouterr().out
    texts = [tok.decode(x["input_ids"]) for x in items]
    eval_answers = [r["messages"][-1]["content"] for r in evals]
    state = "hit" if "tokenized cache: hit (key" in log else "miss" if "tokenized cache: miss (key" in log else None
    return state, texts, eval_answers, log


def test_cache_sees_in_place_edits_and_new_seeds(tmp_path, tiny_tokenizer, capsys):
    tok = copy.deepcopy(tiny_tokenizer)
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    path = data / "a.jsonl"
    _write(path)
    first = _run(tok, data, out, 1, capsys)
    assert first[0] == "miss" and "tokenized cache: hashed 1 input files" in first[3]
    first_entry = set(os.listdir(out / ".cache" / "tokenized"))
    again = _run(tok, data, out, 1, capsys)
    assert again[0] == "hit" and again[1] == first[1]

    # Rewrite a middle record in place: same size, same modification time.
    st = os.stat(path)
    _write(path, edit={9: "answer number 09 is FINE"})
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    edited = _run(tok, data, out, 1, capsys)
    assert edited[0] == "miss"
    seen = " ".join(edited[1]) + " ".join(edited[2])
    assert "answer number 09 is FINE" in seen and "answer number 09 is fine" not in seen

    # Another seed holds out other records; none of them is in the training items.
    for seed in (2, 3):
        state, texts, held_out, _ = _run(tok, data, out, seed, capsys)
        assert state == "miss" and len(held_out) == 2 and len(texts) == 18
        for answer in held_out:
            assert not any(answer in t for t in texts), (seed, answer)
    assert _run(tok, data, out, 2, capsys)[2] != edited[2]
    # --overwrite_output_dir keeps output_dir/.cache: the earlier entries are there but never match again
    assert len(os.listdir(out / ".cache" / "tokenized")) >= 4
    assert _run(tok, data, out, 1, capsys)[0] == "hit"
    # a fifth key: the least recently used entry goes (the pre-edit one; the others were used since)
    cache = out / ".cache" / "tokenized"
    before = set(os.listdir(cache))
    state, _, _, log = _run(tok, data, out, 4, capsys)
    assert state == "miss" and "tokenized cache: removed 1 older sft-train entries" in log
    after = set(os.listdir(cache))
    assert len(after) == 4 and before - after == first_entry
    assert [_run(tok, data, out, s, capsys)[0] for s in (1, 2, 3, 4)] == ["hit"] * 4


def test_cache_key_covers_tokenizer_template_and_flags(tmp_path, tiny_tokenizer, capsys):
    tok = copy.deepcopy(tiny_tokenizer)
    data = tmp_path / "data"
    data.mkdir()
    _write(data / "a.jsonl")
    d = DataArguments(train_file_dir=str(data))
    files = [str(data / "a.jsonl")]
    base = data_key("sft", d, tok, files, 1)
    assert data_key("sft", d, tok, files, 2) == base  # the seed matters only when it picks the eval split
    split = DataArguments(train_file_dir=str(data), validation_split_percentage=5)
    assert data_key("sft", split, tok, files, 1) != data_key("sft", split, tok, files, 2)
    for flag, value in (("model_max_length", 64), ("truncation_mode", "drop"), ("packing", False),
                        ("max_train_samples", 5), ("system_prompt", "x"), ("tool_format", "qwen")):
        changed = DataArguments(train_file_dir=str(data), **{flag: value})
        assert data_key("sft", changed, tok, files, 1) != base, flag
    assert data_key("sft", DataArguments(train_file_dir=str(data), preprocessing_num_workers=4), tok, files, 1) == base
    # the tokenizer's content, not its path: the same tokenizer saved elsewhere keeps the key
    from transformers import AutoTokenizer

    for name in ("t1", "t2"):
        tok.save_pretrained(tmp_path / name)
    t1, t2 = (AutoTokenizer.from_pretrained(tmp_path / n) for n in ("t1", "t2"))
    assert data_key("sft", d, t1, files, 1)["tokenizer"] == data_key("sft", d, t2, files, 1)["tokenizer"]
    before = data_key("sft", d, t1, files, 1)
    t2.add_tokens(["<|new_marker|>"])
    assert data_key("sft", d, t2, files, 1) != before
    t1.chat_template = TEMPLATES["llama3"]
    assert data_key("sft", d, t1, files, 1) != before
