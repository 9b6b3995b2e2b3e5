"""Data formats: every input layout -> canonical records; every error names file:line:field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgpt_ds.data.formats import RECORD_EXTS, DataError, Tally, find_files, load_records

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
    path = _jsonl(tmp_path / "a.jsonl", {"messages": [U, A, U2]})
    recs, logs = _load(path, "sft")
    assert recs == [{"messages": [U, A]}]
    assert logs[1] == (f"[data] {path}: 1 conversations ending on an unanswered user/tool turn: that turn dropped "
                       f"(first: {path}:1)")


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
    ('{"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "get_x"}]}',
     r"field 'conversations\[1\]\.value': a function call must be JSON"),
    ('{"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{\\"arguments\\": {}}"}]}',
     r"field 'conversations\[1\]\.value': a function call must be an object with a 'name'"),
    ('{"conversations": [{"from": "observation", "value": "{}"}, {"from": "gpt", "value": "a"}]}',
     r"field 'conversations\[0\]': role 'tool' where 'user' was expected"),
    ('{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[{"}',
     r"field 'tools': not valid JSON"),
    ('{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[{\\"x\\": 1}]"}',
     r"field 'tools\[0\]': expected a function schema with a 'name'"),
    ('{"conversations": [{"from": "bot", "value": "x"}]}',
     r"field 'conversations\[0\]\.from': unknown role 'bot'"),
    ('{"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]}',
     r"field 'conversations\[1\]': role 'user' where 'assistant' was expected"),
    ('{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}',
     r"field 'conversations\[0\]': role 'assistant' where 'user' was expected"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]}',
     r"field 'messages\[1\]': a system turn may only come first"),
    ('{"messages": [{"role": "system", "content": "s"}]}', r"field 'messages\[0\]': no user and assistant turns"),
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


# ---------------------------------------------------------------- tool calls (MedicalGPT sharegpt, OpenAI)

WEATHER = {"name": "get_weather", "description": "查询天气",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市"}},
                          "required": ["city"]}}
CALL = {"name": "get_weather", "arguments": {"city": "北京"}}


def test_tool_calls_sharegpt_and_openai_agree(tmp_path):
    sharegpt = {"conversations": [{"from": "human", "value": "北京天气？"},
                                  {"from": "function_call", "value": json.dumps(CALL, ensure_ascii=False)},
                                  {"from": "observation", "value": '{"temp": 28}'},
                                  {"from": "gpt", "value": "28度。"}],
                "tools": json.dumps([WEATHER], ensure_ascii=False)}
    openai = {"messages": [{"role": "user", "content": "北京天气？"},
                           {"role": "assistant", "content": None, "tool_calls": [
                               {"id": "c1", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
                           {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 28}'},
                           {"role": "assistant", "content": "28度。"}],
              "tools": [{"type": "function", "function": WEATHER}]}
    # text before a call, and two calls in a row (parallel), join one assistant message
    parallel = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "我查一下。"},
                                  {"from": "function_call", "value": json.dumps(CALL)},
                                  {"from": "function_call", "value": {"name": "get_time", "arguments": {}}},
                                  {"from": "observation", "value": "r1"}, {"from": "observation", "value": {"t": 1}},
                                  {"from": "gpt", "value": "好。"}], "tools": "[]"}
    recs, _ = _load(_jsonl(tmp_path / "a.jsonl", sharegpt, openai, parallel), "sft")
    expected = {"messages": [{"role": "user", "content": "北京天气？"},
                             {"role": "assistant", "content": "", "tool_calls": [CALL]},
                             {"role": "tool", "content": '{"temp": 28}'},
                             {"role": "assistant", "content": "28度。"}], "tools": [WEATHER]}
    assert recs[0] == expected and recs[1] == expected
    assert recs[2] == {"messages": [  # "tools": "[]" means no tools
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "我查一下。", "tool_calls": [CALL, {"name": "get_time", "arguments": {}}]},
        {"role": "tool", "content": "r1"}, {"role": "tool", "content": '{"t": 1}'},
        {"role": "assistant", "content": "好。"}]}


def test_empty_and_unanswered_turns_are_counted(tmp_path):
    def conv(*values):
        return {"conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]}

    path = _jsonl(tmp_path / "a.jsonl",
                  conv("", "a"),                    # 1: empty user turn ("continue"): kept
                  conv("q", "a", "", "b", "", "c"),  # 2: two empty user turns: kept
                  conv("q", "a", "q2", " "),        # 3: empty final answer: that exchange dropped
                  conv("q", "", "q2", "a2"),        # 4: empty answer before later turns: record dropped
                  conv("q", ""),                    # 5: nothing left: record dropped
                  conv("q", "a", "q2"),             # 6: unanswered last user turn dropped
                  conv("最好的建议？"),                   # 7: only a question: record dropped
                  {"messages": [S, U]},             # 8: the same with a system turn
                  {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": json.dumps(CALL)},
                                     {"from": "observation", "value": "r"}]})  # 9: unanswered tool result dropped
    tally = Tally()
    recs, logs = _load(path, "sft", tally=tally)
    assert [r["messages"][0]["content"] for r in recs] == ["", "q", "q", "q", "q"]
    assert recs[2]["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert recs[4]["messages"][-1]["tool_calls"] == [CALL]
    assert tally.counts == {"empty_user": 3, "empty_answer_turn": 1, "empty_answer_record": 2, "trailing_user": 2,
                            "unanswered_record": 2}
    assert logs == [
        f"[data] {path}: 5 sft records from 9 rows",
        f"[data] {path}: 3 empty user turns kept (first: {path}:1:conversations[0], {path}:2:conversations[2], "
        f"{path}:2:conversations[4])",
        f"[data] {path}: 1 empty final assistant answers: that exchange dropped (first: {path}:3)",
        f"[data] {path}: 2 records dropped: an empty assistant answer before later turns (first: {path}:4, {path}:5)",
        f"[data] {path}: 2 conversations ending on an unanswered user/tool turn: that turn dropped "
        f"(first: {path}:6, {path}:9)",
        f"[data] {path}: 2 records dropped: no answered turn (only an unanswered question) (first: {path}:7, {path}:8)"]


def test_skip_bad_records(tmp_path):
    path = tmp_path / "a.jsonl"
    good = json.dumps({"messages": [U, A]}).encode()
    path.write_bytes(b"\n".join([good, b'{"messages": [', json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode(),
                                 b'{"text": "caf\xe9"}', good]) + b"\n")
    with pytest.raises(DataError, match=r"a\.jsonl:2: malformed JSON"):
        _load(path, "sft")
    rejected = []
    recs, logs = _load(path, "sft", skip_bad=True, rejected=rejected)
    assert len(recs) == 2
    assert [r["where"] for r in rejected] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "unknown role 'bot'" in rejected[1]["error"] and "invalid UTF-8" in rejected[2]["error"]
    assert logs[1].startswith(f"[data] {path}: 3 bad records skipped (--skip_bad_records")


def test_invalid_utf8_names_the_line(tmp_path):
    lines = [json.dumps({"text": "ok"}).encode(), json.dumps({"text": "fine"}).encode(), b'{"text": "caf\xe9 au lait"}']
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # with a BOM, which is fine
    offset = path.read_bytes().index(b"\xe9")
    _error(path, "pt", rf"a\.jsonl:3: invalid UTF-8 at column 14 \(byte {offset} of the file")
    txt = tmp_path / "b.txt"
    txt.write_bytes(b"one\ntwo\n\xff\xfethree\n")
    _error(txt, "pt", r"b\.txt:3: invalid UTF-8 at column 1 \(byte 8 of the file")
    js = tmp_path / "c.json"
    js.write_bytes(b'[\n {"text": "a"},\n\n {"text": "\xc3("}\n]')
    offset = js.read_bytes().index(b"\xc3")
    _error(js, "pt", rf"c\.json:4: invalid UTF-8 \(byte {offset} of the file")


def test_json_file_variants(tmp_path):
    lines = tmp_path / "lines.json"  # JSON Lines content saved as .json (MedicalGPT's loaders read it)
    lines.write_text(json.dumps({"messages": [U, A]}) + "\n\n" + json.dumps({"messages": [U2, A2]}) + "\n")
    recs, logs = _load(lines, "sft")
    assert [r["messages"] for r in recs] == [[U, A], [U2, A2]]
    assert "2 sft records from 2 rows, 1 blank lines skipped" in logs[0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"messages": [U, A]}) + "\n" + '{"messages": [}\n')
    _error(bad, "sft", r"bad\.json:2: malformed JSON")
    one = tmp_path / "one.json"  # a single object is one record
    one.write_text("\n" + json.dumps({"messages": [U, A]}, indent=1))
    assert _load(one, "sft")[0] == [{"messages": [U, A]}]


def test_files_a_stage_does_not_read_are_named(tmp_path):
    for rel in ("a.jsonl", "notes.txt", "sub/table.csv", "sheet.xlsx", ".hidden.csv", ".git/x.csv"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    logs = []
    assert find_files(str(tmp_path), RECORD_EXTS, log=logs.append) == [str(tmp_path / "a.jsonl")]
    assert logs == [f"[data] {tmp_path}: skipped 3 files this stage does not read (it reads .jsonl, .json, .parquet): "
                    "notes.txt, sheet.xlsx, sub/table.csv"]
    (tmp_path / "a.jsonl").unlink()
    with pytest.raises(DataError, match=r"no \.jsonl, \.json, \.parquet files found \(not read by this stage: notes"):
        find_files(str(tmp_path), RECORD_EXTS)


def test_system_prompt_column(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl",
                  {"id": "1", "system_prompt": "你是护士。", "conversations": [{"from": "human", "value": "q"},
                                                                            {"from": "gpt", "value": "a"}]},
                  {"system_prompt": "ignored", "conversations": [{"from": "system", "value": "own"},
                                                                 {"from": "human", "value": "q"},
                                                                 {"from": "gpt", "value": "a"}]},
                  {"system_prompt": "", "question": "q", "answer": "a"})
    recs, _ = _load(path, "prompt")
    assert recs[0]["prompt"][0] == {"role": "system", "content": "你是护士。"}
    assert recs[1]["prompt"][0] == {"role": "system", "content": "own"}
    assert recs[2]["prompt"] == [{"role": "user", "content": "q"}]
    recs, _ = _load(_jsonl(tmp_path / "b.jsonl", json.loads(open(path).readline())), "sft")
    assert recs[0]["messages"][0] == {"role": "system", "content": "你是护士。"}


def test_tool_call_preference_pairs(tmp_path):
    tools = json.dumps([WEATHER], ensure_ascii=False)
    q = [{"from": "human", "value": "北京天气？"}]
    answered = q + [{"from": "function_call", "value": json.dumps(CALL, ensure_ascii=False)},
                    {"from": "observation", "value": '{"temp": 28}'}]
    action = 'Action: get_weather\nAction Input: {"city": "北京"}\n'
    path = _jsonl(tmp_path / "p.jsonl",
                  {"conversations": q, "tools": tools, "chosen": action, "rejected": "晴天。"},  # as MedicalGPT ships it
                  {"conversations": answered, "tools": tools, "chosen": "28度，晴。", "rejected": "不知道。"},
                  {"conversations": q, "tools": tools, "chosen": CALL, "rejected": "晴天。"},
                  {"prompt": [{"role": "user", "content": "北京天气？"}], "tools": [WEATHER],
                   "chosen": [{"role": "assistant", "tool_calls": [{"type": "function", "function": CALL}]}],
                   "rejected": [{"role": "assistant", "content": "晴天。"}]},
                  {"conversations": q, "tools": tools, "chosen": "晴天。", "rejected": " 晴天。"},  # chosen == rejected
                  {"conversations": q, "chosen": CALL, "rejected": CALL})  # the same call twice
    tally = Tally()
    recs, logs = _load(path, "preference", tally=tally)
    call_msg = {"role": "assistant", "content": "", "tool_calls": [CALL]}
    user = {"role": "user", "content": "北京天气？"}
    assert recs == [
        {"prompt": [user], "chosen": action, "rejected": "晴天。", "tools": [WEATHER]},
        {"prompt": [user, call_msg, {"role": "tool", "content": '{"temp": 28}'}], "chosen": "28度，晴。",
         "rejected": "不知道。", "tools": [WEATHER]},
        {"prompt": [user], "chosen": call_msg, "rejected": "晴天。", "tools": [WEATHER]},
        {"prompt": [user], "chosen": call_msg, "rejected": "晴天。", "tools": [WEATHER]},
    ]
    assert tally.counts == {"same_pair": 2}
    assert logs[1] == f"[data] {path}: 2 preference pairs dropped: chosen == rejected (first: {path}:5, {path}:6)"


def test_prompts_without_answer_are_counted(tmp_path):
    from medgpt_ds.data.loading import check_answers

    path = _jsonl(tmp_path / "g.jsonl", {"question": "q1", "answer": "1"}, {"question": "q2"}, {"prompt": "q3"})
    recs, logs = _load(path, "prompt")
    assert logs[1] == (f"[data] {path}: 2 prompt records without 'answer' (answer rewards score them 0) "
                       f"(first: {path}:2, {path}:3)")
    assert check_answers(recs, "--reward_funcs answer_normalized") == 2
    with pytest.raises(DataError, match="none of the 2 prompt records has an 'answer', but --reward_funcs answer_n"):
        check_answers(recs[1:], "--reward_funcs answer_normalized")


def test_medicalgpt_toolcall():
    files = _medicalgpt("toolcall")
    tally = Tally()
    recs = load_records(files, "sft", log=lambda s: None, tally=tally)
    assert len(recs) == 300 and tally.counts == {}
    with_tools = [r for r in recs if "tools" in r]
    calls = [m for r in recs for m in r["messages"] if m.get("tool_calls")]
    results = [m for r in recs for m in r["messages"] if m["role"] == "tool"]
    assert len(with_tools) == 200 and len(calls) == 216 and len(results) == 218  # counted in the raw file
    assert all(set(c) == {"name", "arguments"} for m in calls for c in m["tool_calls"])
