"""Data formats: every input layout -> canonical records; every error names file:line:field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgpt_ds.data.formats import DataError, find_files, load_records

pytestmark = pytest.mark.unit

MEDICALGPT = Path(__file__).parents[1].parent / "shared/data/medicalgpt"

U = {"role": "user", "content": "What causes fever?"}
A = {"role": "assistant", "content": "Usually an infection."}
U2 = {"role": "user", "content": "And a cough?"}
A2 = {"role": "assistant", "content": "Often a cold."}
S = {"role": "system", "content": "You are a doctor."}


def _jsonl(path: Path, *records) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
                            + "\n" for r in records), encoding="utf-8")
    return str(path)


def _load(path, kind, **kw):
    logs = []
    return load_records([str(path)], kind, log=logs.append, **kw), logs


def _error(path, kind, match):
    with pytest.raises(DataError, match=match):
        load_records([str(path)], kind, log=lambda s: None)


# ---------------------------------------------------------------- find_files

def test_find_files(tmp_path):
    for rel in ("b/2.jsonl", "a.json", "b/c/3.txt", "x.parquet", "notes.md", ".hidden.jsonl",
                ".cache/4.jsonl"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert find_files(str(tmp_path)) == [str(tmp_path / r) for r in
                                         ("a.json", "b/2.jsonl", "b/c/3.txt", "x.parquet")]
    assert find_files(str(tmp_path), exts=(".txt",)) == [str(tmp_path / "b/c/3.txt")]
    assert find_files(str(tmp_path / "a.json")) == [str(tmp_path / "a.json")]
    with pytest.raises(DataError, match="no such file"):
        find_files(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="unsupported file type"):
        find_files(str(tmp_path / "notes.md"))
    with pytest.raises(DataError, match=r"no \.csv files found"):
        find_files(str(tmp_path), exts=(".csv",))


# ---------------------------------------------------------------- pt

def test_pt_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\n\n   \nsecond doc\r\n", encoding="utf-8")
    recs, logs = _load(txt, "pt")
    assert recs == [{"text": "first doc"}, {"text": "second doc"}]
    assert "2 pt records from 2 rows, 2 blank lines skipped" in logs[0]
    recs, _ = _load(_jsonl(tmp_path / "b.jsonl", {"text": "doc", "meta": 1}), "pt")
    assert recs == [{"text": "doc"}]


def test_txt_only_for_pt(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello\n")
    _error(txt, "sft", r"a\.txt: \.txt files hold pretraining text")


# ---------------------------------------------------------------- sft

def test_sft_sharegpt_messages_alpaca(tmp_path):
    path = _jsonl(
        tmp_path / "a.jsonl",
        {"conversations": [{"from": "human", "value": U["content"]},
                           {"from": "gpt", "value": A["content"]}]},
        {"conversations": [{"from": "system", "value": S["content"]},
                           {"from": "user", "value": U["content"]},
                           {"from": "assistant", "value": A["content"]}]},
        {"messages": [S, U, A, U2, A2]},
        {"conversations": [{"from": "human", "value": U["content"]},
                           {"from": "gpt", "value": A["content"]}], "system": S["content"]},
        {"instruction": "Explain", "input": "fever", "output": "It is heat.", "system": "Be kind",
         "history": [["hi", "hello"]]},
        {"instruction": "Explain fever", "input": "", "output": "It is heat."},
    )
    recs, _ = _load(path, "sft")
    assert [r["messages"] for r in recs] == [
        [U, A],
        [S, U, A],
        [S, U, A, U2, A2],
        [S, U, A],
        [{"role": "system", "content": "Be kind"}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Explain\nfever"},
         {"role": "assistant", "content": "It is heat."}],
        [{"role": "user", "content": "Explain fever"}, {"role": "assistant", "content": "It is heat."}],
    ]


def test_sft_empty_system_turn_and_bom(tmp_path):
    path = tmp_path / "a.jsonl"
    rec = {"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}]}
    path.write_text(json.dumps(rec) + "\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    recs, _ = _load(path, "sft")
    assert recs == [{"messages": [{"role": "user", "content": "q"},
                                  {"role": "assistant", "content": "a"}]}]


def test_sft_drops_unanswered_last_turn(tmp_path):
    recs, logs = _load(_jsonl(tmp_path / "a.jsonl", {"messages": [U, A, U2]}), "sft")
    assert recs == [{"messages": [U, A]}]
    assert "1 unanswered final user turns dropped" in logs[0]


def test_json_list_and_data_dict(tmp_path):
    lst = tmp_path / "a.json"
    lst.write_text(json.dumps([{"messages": [U, A]}, {"messages": [U2, A2]}], indent=2))
    recs, _ = _load(lst, "sft")
    assert [r["messages"] for r in recs] == [[U, A], [U2, A2]]
    wrapped = tmp_path / "b.json"
    wrapped.write_text(json.dumps({"data": [{"messages": [U, A]}]}))
    assert _load(wrapped, "sft")[0] == [{"messages": [U, A]}]


def test_json_errors_name_the_line(tmp_path):
    lst = tmp_path / "a.json"
    lst.write_text(json.dumps([{"messages": [U, A]}, {"messages": [U, U2]}], indent=2))
    starts = [n for n, line in enumerate(lst.read_text().splitlines(), 1) if line == "  {"]
    assert starts == [2, 14]  # where each record opens
    _error(lst, "sft", r"a\.json:14: field 'messages\[1\]': role 'user' where 'assistant'")
    wrapped = tmp_path / "b.json"
    wrapped.write_text(json.dumps({"data": [{"messages": [U, A]}, {"text": "x"}]}))
    _error(wrapped, "sft", r"b\.json:record 2: field 'conversations': missing")
    broken = tmp_path / "c.json"
    broken.write_text('[\n  {"messages": []},\n  {oops}\n]')
    _error(broken, "sft", r"c\.json:3: malformed JSON")
    scalar = tmp_path / "d.json"
    scalar.write_text('"text"')
    _error(scalar, "sft", r"d\.json:1: expected a JSON list")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "Q1?", "answer": "A1"},
                                         {"question": "Q2?", "answer": None}]), path)
    recs, _ = _load(path, "prompt")
    assert recs == [{"prompt": [{"role": "user", "content": "Q1?"}], "answer": "A1"},
                    {"prompt": [{"role": "user", "content": "Q2?"}], "answer": None}]
    pq.write_table(pa.Table.from_pylist([{"question": "Q?", "answer": "a"},
                                         {"question": "", "answer": "a"}]), path)
    _error(path, "prompt", r"a\.parquet:row 2: field 'question': empty")


# ---------------------------------------------------------------- preference

def test_preference_formats(tmp_path):
    conv = [{"from": "system", "value": S["content"]}, {"from": "human", "value": U["content"]}]
    path = _jsonl(
        tmp_path / "a.jsonl",
        {"conversations": conv, "chosen": "good", "rejected": "bad"},  # MedicalGPT
        {"question": U["content"], "response_chosen": "good", "response_rejected": "bad",
         "system": S["content"], "history": [["hi", "hello"]]},  # older MedicalGPT
        {"prompt": U["content"], "chosen": "good", "rejected": "bad"},  # TRL, strings
        {"prompt": [S, U], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},  # TRL, messages
        {"chosen": [S, U, {"role": "assistant", "content": "good"}],
         "rejected": [S, U, {"role": "assistant", "content": "bad"}]},  # TRL, implicit prompt
    )
    recs, _ = _load(path, "preference")
    hist = [S, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, U]
    assert recs == [
        {"prompt": [S, U], "chosen": "good", "rejected": "bad"},
        {"prompt": hist, "chosen": "good", "rejected": "bad"},
        {"prompt": [U], "chosen": "good", "rejected": "bad"},
        {"prompt": [S, U], "chosen": "good", "rejected": "bad"},
        {"prompt": [S, U], "chosen": "good", "rejected": "bad"},
    ]


@pytest.mark.parametrize("record, match", [
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": "", "rejected": "b"},
     "field 'chosen': empty"),
    ({"conversations": [{"from": "human", "value": "q"}], "rejected": "b"},
     "field 'chosen': missing"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": 3, "rejected": "b"},
     "field 'chosen': expected a string, got int"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
      "chosen": "a", "rejected": "b"},
     r"field 'conversations\[1\]': the prompt history must end with a human turn"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
     "field 'chosen': no assistant message"),
    ({"chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]},
     "field 'chosen': implicit prompt: no shared prompt turns"),
    ({"chosen": [U, {"role": "assistant", "content": "a"}],
      "rejected": [U2, {"role": "assistant", "content": "b"}]},
     "field 'chosen': implicit prompt: chosen and rejected must share every turn"),
    ({"chosen": [U, A, U2, A2], "rejected": [U, {"role": "assistant", "content": "x"}, U2, A2]},
     "field 'chosen': implicit prompt: chosen and rejected must share every turn"),
    ({"text": "x"}, "field 'conversations': missing"),
])
def test_preference_errors(tmp_path, record, match):
    path = _jsonl(tmp_path / "p.jsonl", {"prompt": "ok", "chosen": "a", "rejected": "b"}, record)
    _error(path, "preference", r"p\.jsonl:2: " + match)


# ---------------------------------------------------------------- prompt

def test_prompt_formats(tmp_path):
    path = _jsonl(
        tmp_path / "a.jsonl",
        {"question": "Q?", "answer": "A"},  # MedicalGPT grpo
        {"question": "Q?", "answer": 72},  # numeric answers become text
        {"prompt": "P?"},
        {"prompt": [S, U], "answer": "A"},
        {"messages": [S, U, A, U2]},  # every user turn is a prompt
        {"instruction": "Do it", "output": "Done"},
    )
    recs, logs = _load(path, "prompt")
    assert recs == [
        {"prompt": [{"role": "user", "content": "Q?"}], "answer": "A"},
        {"prompt": [{"role": "user", "content": "Q?"}], "answer": "72"},
        {"prompt": [{"role": "user", "content": "P?"}], "answer": None},
        {"prompt": [S, U], "answer": "A"},
        {"prompt": [S, U], "answer": A["content"]},
        {"prompt": [S, U, A, U2], "answer": None},
        {"prompt": [{"role": "user", "content": "Do it"}], "answer": "Done"},
    ]
    assert "7 prompt records from 6 rows" in logs[0]


@pytest.mark.parametrize("record, match", [
    ({"question": "Q?", "answer": ""}, "field 'answer': empty"),
    ({"question": "Q?", "answer": ["x"]}, "field 'answer': expected a string, got list"),
    ({"prompt": [U, A]}, r"field 'prompt\[1\]': a prompt must end with a user turn"),
    ({"question": None}, "field 'question': missing"),
])
def test_prompt_errors(tmp_path, record, match):
    _error(_jsonl(tmp_path / "p.jsonl", record), "prompt", r"p\.jsonl:1: " + match)


# ---------------------------------------------------------------- sft errors

@pytest.mark.parametrize("line, match", [
    ('{"conversations": [}', "malformed JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"text": "x"}', "field 'conversations': missing"),
    ('{"conversations": "hi"}', "field 'conversations': expected a list of turns, got str"),
    ('{"conversations": []}', "field 'conversations': empty"),
    ('{"conversations": ["hi"]}', r"field 'conversations\[0\]': expected an object"),
    ('{"conversations": [{"from": "human", "value": 5}]}',
     r"field 'conversations\[0\]\.value': expected a string, got int"),
    ('{"conversations": [{"from": "human", "value": " "}]}',
     r"field 'conversations\[0\]\.value': empty"),
    ('{"conversations": [{"from": "bot", "value": "x"}]}',
     r"field 'conversations\[0\]\.from': unknown role 'bot'"),
    ('{"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]}',
     r"field 'conversations\[1\]': role 'user' where 'assistant' was expected"),
    ('{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}',
     r"field 'conversations\[0\]': role 'assistant' where 'user' was expected"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]}',
     r"field 'messages\[1\]': a system turn may only come first"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}',
     r"field 'messages\[0\]': no assistant turn after a user turn"),
    ('{"instruction": "q"}', "field 'output': missing"),
    ('{"instruction": "q", "input": 3, "output": "a"}', "field 'input': expected a string"),
    ('{"instruction": "q", "output": "a", "history": [["x"]]}',
     r"field 'history\[0\]': expected a \[query, answer\] pair"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],'
     ' "system": 1}', "field 'system': expected a string, got int"),
])
def test_sft_errors(tmp_path, line, match):
    path = tmp_path / "data" / "sft" / "a.jsonl"
    _jsonl(path, {"messages": [U, A]}, "", line)
    # Line 2 is blank (skipped, still counted), so the bad record is on line 3.
    _error(path, "sft", rf"data/sft/a\.jsonl:3: {match}")


def test_empty_result_names_the_files(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", "", "  ")
    b = tmp_path / "b.txt"
    b.write_text("\n\n")
    with pytest.raises(DataError, match=r"no pt records found in .*a\.jsonl, .*b\.txt"):
        load_records([a, str(b)], "pt", log=lambda s: None)
    with pytest.raises(ValueError, match="unknown data kind"):
        load_records([a], "rm")


def test_max_samples_spans_files(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", *({"text": f"a{i}"} for i in range(3)))
    b = _jsonl(tmp_path / "b.jsonl", *({"text": f"b{i}"} for i in range(3)))
    c = _jsonl(tmp_path / "c.jsonl", "not json")  # never read
    logs = []
    recs = load_records([a, b, c], "pt", max_samples=5, log=logs.append)
    assert [r["text"] for r in recs] == ["a0", "a1", "a2", "b0", "b1"]
    assert "max_samples=5" in logs[-1]
    # Prompt expansion yields several records per row; the cap is on records.
    d = _jsonl(tmp_path / "d.jsonl", {"messages": [U, A, U2, A2]})
    assert len(load_records([d], "prompt", max_samples=1, log=lambda s: None)) == 1


# ---------------------------------------------------------------- MedicalGPT sample files

def _medicalgpt(sub):
    path = MEDICALGPT / sub
    if not path.exists():
        pytest.skip(f"MedicalGPT sample data not found at {path}")
    return find_files(str(path))


def test_medicalgpt_pretrain():
    files = _medicalgpt("pretrain")
    assert [Path(f).name for f in files] == ["en_article_tail500.txt", "fever.txt"]
    logs = []
    recs = load_records(files, "pt", log=logs.append)
    # 500 lines with 74 blank + 996 lines with 11 blank
    assert len(recs) == 426 + 985
    assert "74 blank lines skipped" in logs[0] and "11 blank lines skipped" in logs[1]
    assert all(r["text"].strip() for r in recs)


def test_medicalgpt_sft():
    recs = load_records(_medicalgpt("sft"), "sft", log=lambda s: None)
    assert len(recs) == 1000
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in recs)
    prompts = load_records(_medicalgpt("sft"), "prompt", log=lambda s: None)
    assert len(prompts) == 1000 and all(p["answer"] for p in prompts)


def test_medicalgpt_reward():
    recs = load_records(_medicalgpt("reward"), "preference", log=lambda s: None)
    assert len(recs) == 500
    with_system = [r for r in recs if r["prompt"][0]["role"] == "system"]
    assert len(with_system) == 84
    assert all(r["prompt"][-1]["role"] == "user" and r["chosen"] and r["rejected"] for r in recs)


def test_medicalgpt_grpo():
    recs = load_records(_medicalgpt("grpo"), "prompt", log=lambda s: None)
    assert len(recs) == 32
    assert recs[0] == {"prompt": [{"role": "user", "content": "肛门病变可能是什么疾病的症状?"}],
                       "answer": "食管克罗恩病"}
