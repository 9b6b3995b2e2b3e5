"""tools/validate_data.py (every bad record with file:line:field, summary) and tools/convert_data.py
(format round trips checked with the trainer's own reader)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from medgpt_ds.data.formats import load_records

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "medicalgpt"
QUIET = {"log": lambda m: None}


def _tool(name):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


validate_data = _tool("validate_data")
convert_data = _tool("convert_data")

GOOD_SHAREGPT = {"conversations": [{"from": "human", "value": "头痛怎么办？"}, {"from": "gpt", "value": "多休息，必要时就医。"}]}
SFT_LINES = [
    json.dumps(GOOD_SHAREGPT, ensure_ascii=False),                                        # 1 ok
    '{"conversations": [{"from": "human", "value": "hi"}',                                  # 2 malformed JSON
    '["not", "an", "object"]',                                                              # 3 not an object
    '{"foo": 1}',                                                                           # 4 no conversation
    '{"conversations": [{"from": "bot", "value": "x"}, {"from": "gpt", "value": "y"}]}',    # 5 unknown role
    '{"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "get_x()"}]}',  # 6 bad call
    '{"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}',  # 7 wrong order
    "",                                                                                     # 8 blank
    '{"conversations": [{"from": "human", "value": 123}, {"from": "gpt", "value": "y"}]}',  # 9 not a string
    '{"instruction": "列出三种降压药", "input": "", "output": "氨氯地平、缬沙坦、氢氯噻嗪"}',      # 10 ok (alpaca)
    '{"instruction": "列出三种降压药", "input": ""}',                                          # 11 alpaca, no output
    json.dumps(GOOD_SHAREGPT, ensure_ascii=False),                                          # 12 duplicate of 1
]
SFT_ERRORS = {
    2: "malformed JSON",
    3: "expected a JSON object, got list",
    4: "field 'conversations': missing",
    5: "field 'conversations[0].from': unknown role 'bot'",
    6: "field 'conversations[1].value': a function call must be JSON",
    7: "field 'conversations[0]': role 'assistant' where 'user' was expected",
    9: "field 'conversations[0].value': expected a string, got int",
    11: "field 'output': missing",
}
PREF_LINES = [
    '{"conversations": [{"from": "human", "value": "q"}], "chosen": "good", "rejected": "bad"}',      # 1 ok
    '{"conversations": [{"from": "human", "value": "q"}], "chosen": "good"}',                         # 2 no rejected
    '{"conversations": [{"from": "human", "value": "q"}], "chosen": "", "rejected": "bad"}',          # 3 empty chosen
    '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], '
    '"chosen": "c", "rejected": "r"}',                                                                # 4 ends with gpt
    '{"prompt": "q2", "chosen": "same", "rejected": "same"}',                                         # 5 dropped, warned
    '{"prompt": [{"role": "user", "content": "q3"}], "chosen": [{"role": "assistant", "content": "c"}], '
    '"rejected": [{"role": "assistant", "content": "r"}]}',                                           # 6 ok (TRL)
]
PREF_ERRORS = {
    2: "field 'rejected': missing",
    3: "field 'chosen': empty",
    4: "field 'conversations[1]': the prompt history must end with a human turn",
}


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.unit
def test_validate_reports_every_bad_sft_record_with_file_line_field(tmp_path):
    f = _write(tmp_path / "sft" / "a.jsonl", SFT_LINES)
    # A .json list: errors name the line where the bad element starts.
    g = tmp_path / "sft" / "b.json"
    g.write_text('[\n  {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},\n'
                 '  {"messages": [{"role": "user", "content": "q"},\n'
                 '                {"role": "system", "content": "late"}]}\n]\n', encoding="utf-8")
    report = validate_data.validate([str(tmp_path / "sft")], "sft")
    errors = report["errors"]
    for line, text in SFT_ERRORS.items():
        assert any(e.startswith(f"{f}:{line}: ") and text in e for e in errors), (line, text, errors)
    assert any(e.startswith(f"{g}:3: field 'messages[1]'") and "system turn may only come first" in e for e in errors)
    assert len(errors) == len(SFT_ERRORS) + 1
    s = report["summary"]
    assert (s["files"], s["records"], s["blank"], s["duplicates"], s["errors"]) == (2, 4, 1, 1, 9)
    assert s["per_file"][str(f)] == {"rows": 12, "records": 3, "errors": 8}
    assert report["warnings"] == [f"{f}:12: duplicate of {f}:1"]
    assert s["turns"]["max"] == 2 and s["chars"]["min"] == 2


@pytest.mark.unit
def test_validate_preference_prompt_and_text_files(tmp_path):
    f = _write(tmp_path / "pref.jsonl", PREF_LINES)
    report = validate_data.validate([str(f)], "preference")
    for line, text in PREF_ERRORS.items():
        assert any(e.startswith(f"{f}:{line}: ") and text in e for e in report["errors"]), (line, report["errors"])
    assert len(report["errors"]) == len(PREF_ERRORS) and report["summary"]["records"] == 2
    assert report["warnings"] == [f"{f}: 1 preference pairs dropped: chosen == rejected (first: {f}:5)"]
    assert report["summary"]["events"] == {"same_pair": 1}

    p = _write(tmp_path / "grpo.jsonl", ['{"question": "1+1=?", "answer": "2"}', '{"question": "x", "answer": ["2"]}',
                                         '{"prompt": [{"role": "user", "content": "a"}, '
                                         '{"role": "assistant", "content": "b"}]}'])
    report = validate_data.validate([str(p)], "prompt")
    assert [e.split(": field")[0] for e in report["errors"]] == [f"{p}:2", f"{p}:3"]
    assert "expected a string, got list" in report["errors"][0]
    assert "a prompt must end with a user turn" in report["errors"][1]

    t = _write(tmp_path / "pt.txt", ["第一篇文档。", "", "second document"])
    s = validate_data.validate([str(t)], "pt")["summary"]
    assert (s["records"], s["blank"], s["errors"]) == (2, 1, 0)
    report = validate_data.validate([str(t)], "sft")
    assert report["errors"] == [f"{t}: .txt files hold pretraining text (one document per line); 'sft' data must "
                                "be .jsonl, .json or .parquet records"]
    report = validate_data.validate([str(tmp_path / "missing")], "sft")
    assert report["errors"] == [f"{tmp_path / 'missing'}: no such file or directory"]


@pytest.mark.unit
def test_validate_lists_invalid_utf8_and_skipped_files(tmp_path, capsys):
    d = tmp_path / "sft"
    good = json.dumps(GOOD_SHAREGPT, ensure_ascii=False).encode()
    _write(d / "a.jsonl", [])
    gbk = b'{"conversations": [{"from": "human", "value": "\xb7\xa2\xc8\xc8"}]}'  # GBK bytes, not UTF-8
    (d / "a.jsonl").write_bytes(good + b"\n" + gbk + b"\n" + good + b"\n")
    (d / "b.json").write_bytes(b'[\n' + good + b',\n{"text": "\xff"}\n]')
    (d / "notes.txt").write_text("x")
    (d / "table.csv").write_text("a,b")
    report = validate_data.validate([str(d)], "sft")
    assert report["errors"] == [
        f"{d / 'a.jsonl'}:2: invalid UTF-8 at column {gbk.index(0xb7) + 1} (byte {len(good) + 1 + gbk.index(0xb7)} "
        "of the file: b'\\xb7\\xa2\\xc8\\xc8'); "
        "save the file as UTF-8",
        f"{d / 'b.json'}:3: invalid UTF-8 (byte {(d / 'b.json').read_bytes().index(0xff)} of the file: "
        "b'\\xff\"}\\n'); save the file as UTF-8"]
    assert report["warnings"][0] == (f"{d}: skipped 2 files this stage does not read (it reads .jsonl, .json, .parquet): "
                                     "notes.txt, table.csv")
    assert report["summary"]["per_file"][str(d / "a.jsonl")] == {"rows": 3, "records": 2, "errors": 1}
    assert validate_data.main(["--stage", "sft", str(d)]) == 1
    assert "invalid UTF-8" in capsys.readouterr().out


@pytest.mark.unit
def test_validate_token_lengths_and_cli(tmp_path, capsys):
    from medgpt_ds.tokenizer import train_bpe_tokenizer

    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    train_bpe_tokenizer(texts=["头痛 发热 咳嗽 降压药"] * 50, vocab_size=300, output_dir=str(tmp_path / "tok"),
                        chat_template=chatml)
    good = _write(tmp_path / "good.jsonl", [SFT_LINES[0], SFT_LINES[9]])
    rc = validate_data.main(["--stage", "sft", "--data", str(good), "--tokenizer", str(tmp_path / "tok"),
                             "--max_length", "20", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["errors"] == [] and report["summary"]["tokens"]["min"] > 10
    assert report["summary"]["over_max_length"] == sum(
        n > 20 for n in [report["summary"]["tokens"]["min"], report["summary"]["tokens"]["max"]])
    bad = _write(tmp_path / "bad.jsonl", SFT_LINES)
    rc = validate_data.main(["--kind", "sft", str(bad), "--max_errors", "3"])
    out = capsys.readouterr().out
    assert rc == 1 and "ERRORS (8):" in out and "... and 5 more" in out and out.rstrip().endswith("FAILED")


@pytest.mark.unit
def test_validate_medicalgpt_samples_are_clean():
    if not DATA.is_dir():
        pytest.skip(f"MedicalGPT sample data not found at {DATA}")
    for kind, sub in (("sft", "sft"), ("preference", "reward"), ("prompt", "grpo"), ("pt", "pretrain")):
        report = validate_data.validate([str(DATA / sub)], kind)
        assert report["errors"] == [], (sub, report["errors"][:3])
        assert report["summary"]["records"] > 0


# --- convert_data ----------------------------------------------------------------------------

SFT_RECORDS = [
    {"messages": [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "头痛？"},
                  {"role": "assistant", "content": "休息。"}, {"role": "user", "content": "还痛呢？"},
                  {"role": "assistant", "content": "请就医。"}]},
    {"messages": [{"role": "user", "content": "What is BP?"}, {"role": "assistant", "content": "Blood pressure."}]},
]
PREF_RECORDS = [
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}],
     "chosen": "good", "rejected": "bad"},
    {"prompt": [{"role": "user", "content": "单轮问题"}], "chosen": "好", "rejected": "差"},
]


def _roundtrip(tmp_path, records, kind, targets, ext=".jsonl"):
    """records -> each target in turn (re-read by the trainer's reader after every step)."""
    current = records
    for i, to in enumerate(targets):
        path = tmp_path / f"step{i}_{to}{ext}"
        convert_data.write_records([convert_data.convert_record(r, to) for r in current], str(path))
        current = load_records([str(path)], kind, **QUIET)
        assert current == records, to
    return current


@pytest.mark.unit
def test_sft_formats_round_trip(tmp_path):
    _roundtrip(tmp_path, SFT_RECORDS, "sft", ["alpaca", "sharegpt", "messages", "alpaca", "messages"])
    _roundtrip(tmp_path, SFT_RECORDS, "sft", ["sharegpt", "alpaca"], ext=".json")
    alpaca = convert_data.convert_record(SFT_RECORDS[0], "alpaca")
    assert alpaca == {"instruction": "还痛呢？", "input": "", "output": "请就医。", "system": "你是医生。",
                      "history": [["头痛？", "休息。"]]}
    assert convert_data.convert_record(SFT_RECORDS[1], "sharegpt") == {"conversations": [
        {"from": "human", "value": "What is BP?"}, {"from": "gpt", "value": "Blood pressure."}]}


@pytest.mark.unit
def test_preference_formats_round_trip(tmp_path):
    _roundtrip(tmp_path, PREF_RECORDS, "preference", ["trl", "medicalgpt", "trl", "medicalgpt"])
    _roundtrip(tmp_path, PREF_RECORDS[1:], "preference", ["trl_text", "medicalgpt"])
    assert convert_data.convert_record(PREF_RECORDS[1], "trl") == {
        "prompt": [{"role": "user", "content": "单轮问题"}], "chosen": [{"role": "assistant", "content": "好"}],
        "rejected": [{"role": "assistant", "content": "差"}]}
    with pytest.raises(ValueError, match="record 1: a 4-turn prompt has no plain-string TRL form"):
        convert_data.convert_record(PREF_RECORDS[0], "trl_text", 1)


TOOL = {"name": "get_weather", "description": "查询天气", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "description": "城市"}}, "required": ["city"]}}
CALL = {"name": "get_weather", "arguments": {"city": "北京"}}
TOOL_SFT = [{"messages": [{"role": "user", "content": "北京天气？"},
                          {"role": "assistant", "content": "我查一下。", "tool_calls": [CALL]},
                          {"role": "tool", "content": '{"temp": 28}'}, {"role": "assistant", "content": "28度。"}],
             "tools": [TOOL]}]
TOOL_PREF = [{"prompt": [{"role": "user", "content": "北京天气？"}], "tools": [TOOL],
              "chosen": {"role": "assistant", "content": "", "tool_calls": [CALL]}, "rejected": "晴天。"}]


@pytest.mark.unit
def test_tool_call_records_convert(tmp_path):
    _roundtrip(tmp_path, TOOL_SFT, "sft", ["sharegpt", "messages", "sharegpt"])
    assert convert_data.convert_record(TOOL_SFT[0], "sharegpt") == {"conversations": [
        {"from": "human", "value": "北京天气？"}, {"from": "gpt", "value": "我查一下。"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "北京"}}'},
        {"from": "observation", "value": '{"temp": 28}'}, {"from": "gpt", "value": "28度。"}],
        "tools": json.dumps([TOOL], ensure_ascii=False)}
    _roundtrip(tmp_path, TOOL_PREF, "preference", ["trl", "trl"])
    # MedicalGPT's preference files hold a call as its default-format text (as its toolcall_dpo data does)
    mg = convert_data.convert_record(TOOL_PREF[0], "medicalgpt")
    assert mg["chosen"] == 'Action: get_weather\nAction Input: {"city": "北京"}\n' and mg["rejected"] == "晴天。"
    for to, rec in (("alpaca", TOOL_SFT[0]), ("trl_text", TOOL_PREF[0])):
        with pytest.raises(ValueError, match=f"record 3: tool calls have no {to} form"):
            convert_data.convert_record(rec, to, 3)


@pytest.mark.unit
def test_convert_cli_on_medicalgpt_samples(tmp_path, capsys):
    if not DATA.is_dir():
        pytest.skip(f"MedicalGPT sample data not found at {DATA}")
    sft = load_records([str(DATA / "sft" / "medical_sft_1K_format.jsonl")], "sft", **QUIET)
    assert convert_data.main(["--input", str(DATA / "sft"), "--output", str(tmp_path / "a.json"), "--to", "alpaca"]) == 0
    assert "wrote 1000 sft records as alpaca" in capsys.readouterr().out
    assert load_records([str(tmp_path / "a.json")], "sft", **QUIET) == sft
    pref = load_records([str(DATA / "reward" / "dpo_zh_500.jsonl")], "preference", **QUIET)
    assert convert_data.main(["--input", str(DATA / "reward"), "--output", str(tmp_path / "t.jsonl"), "--to", "trl"]) == 0
    assert load_records([str(tmp_path / "t.jsonl")], "preference", **QUIET) == pref
    capsys.readouterr()
    assert convert_data.main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "x.jsonl"),
                              "--to", "messages"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert convert_data.main(["--input", str(tmp_path / "t.jsonl"), "--output", str(tmp_path / "t.jsonl"),
                              "--to", "medicalgpt"]) == 2
    assert "must not be one of the input files" in capsys.readouterr().err
