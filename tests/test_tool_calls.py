"""Tool calls (MedicalGPT's function_call/observation turns and `tools` column): rendered natively by a
tools-aware chat template (a real Qwen2.5 template, as TRL ships it) or in each of MedicalGPT's tool
formats; the schema reaches the prompt, labels cover the calls and never the tool results; tool-call
preference pairs build; --system_prompt. Two short runs: sft on MedicalGPT's tool-call file with the
native template, dpo on tool-call pairs with --tool_format default and --skip_bad_records."""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest

from medgpt_ds.config import DataArguments
from medgpt_ds.data.formats import SYSTEM_PROMPT_PRESETS, load_records
from medgpt_ds.data.loading import load_train_eval
from medgpt_ds.data.templates import (
    TEMPLATES,
    chat_messages,
    encode_conversation,
    encode_preference,
    format_calls,
    format_observation,
    format_tools,
    get_chat_template,
    resolve_tool_format,
    supports_tools,
)

TOOLCALL = Path(__file__).resolve().parents[1].parent / "shared/data/medicalgpt/toolcall/glaive_toolcall_zh_demo.jsonl"
FORMATS = ("default", "qwen", "glm4", "llama3", "mistral")

WEATHER = {"name": "get_weather", "description": "查询天气",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市"}},
                          "required": ["city"]}}
CALL = {"name": "get_weather", "arguments": {"city": "北京"}}
OBS = '{"temp": 28}'
CONV = [{"role": "user", "content": "北京天气？"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": OBS}, {"role": "assistant", "content": "28度。"}]
# What each of MedicalGPT's formats writes for CALL and OBS (training/tool_utils.py and its loaders).
CALL_TEXT = {"default": 'Action: get_weather\nAction Input: {"city": "北京"}\n',
             "qwen": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>',
             "glm4": 'get_weather\n{"city": "北京"}',
             "llama3": '{"name": "get_weather", "parameters": {"city": "北京"}}',
             "mistral": '[{"name": "get_weather", "arguments": {"city": "北京"}}]'}
OBS_TEXT = {"default": 'Observation: {"temp": 28}', "qwen": '<tool_response>\n{"temp": 28}\n</tool_response>',
            "glm4": '<|observation|>\n{"temp": 28}', "llama3": 'Observation: {"temp": 28}',
            "mistral": '[TOOL_RESULTS] {"content": {"temp": 28}}[/TOOL_RESULTS]'}
DEFAULT_TOOLS_TEXT = (
    "You have access to the following tools:\n> Tool Name: get_weather\nTool Description: 查询天气\nTool Args:\n"
    "  - city (string, required): 城市\n\nUse the following format if using a tool:\n```\n"
    "Action: tool name (one of [get_weather])\nAction Input: the input to the tool, in a JSON format representing "
    'the kwargs (e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n')


def _trl_template(name: str) -> str:
    trl = pytest.importorskip("trl")
    path = Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja"
    if not path.exists():
        pytest.skip(f"TRL {trl.__version__} does not ship {path.name}")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return copy.deepcopy(tiny_tokenizer)


def _labelled(tok, enc) -> str:
    return tok.decode([t for t in enc["labels"] if t != -100])


def _prompt_part(tok, enc) -> str:
    return tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab == -100])


@pytest.mark.unit
def test_tools_support_and_resolution(tok):
    qwen25 = _trl_template("qwen2_5")
    assert supports_tools(tok, qwen25) and not supports_tools(tok, TEMPLATES["chatml"])
    assert resolve_tool_format(tok, qwen25, None, None) == "native"
    assert resolve_tool_format(tok, qwen25, None, "default") == "default"  # MedicalGPT's run_sft.sh asks for it
    assert resolve_tool_format(tok, TEMPLATES["qwen"], "qwen", None) == "default"
    assert resolve_tool_format(tok, TEMPLATES["qwen"], "qwen", "qwen3.5") == "qwen"
    with pytest.raises(ValueError, match="--tool_format native: the chat template does not render tools"):
        resolve_tool_format(tok, TEMPLATES["chatml"], "chatml", "native")
    with pytest.raises(ValueError, match="--tool_format must be auto or one of native, default"):
        DataArguments(tool_format="hermes")


@pytest.mark.unit
def test_native_rendering_matches_the_template(tok):
    """Native: what transformers renders for OpenAI-style messages with tools=, labels = the calls and answers."""
    qwen25 = _trl_template("qwen2_5")
    enc = encode_conversation(tok, qwen25, CONV, 4096, tools=[WEATHER], tool_format="native")
    openai = [CONV[0], {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": CALL}]},
              CONV[2], CONV[3]]
    reference = tok.apply_chat_template(openai, tools=[{"type": "function", "function": WEATHER}],
                                        chat_template=qwen25, tokenize=False)
    assert tok.decode(enc["input_ids"]) == reference
    assert json.dumps({"type": "function", "function": WEATHER}, ensure_ascii=False) in _prompt_part(tok, enc)
    assert _labelled(tok, enc) == (CALL_TEXT["qwen"] + "<|im_end|>\n" + "28度。<|im_end|>\n")
    assert "<tool_response>\n" + OBS in _prompt_part(tok, enc)


@pytest.mark.unit
@pytest.mark.parametrize("fmt", FORMATS)
def test_medicalgpt_tool_formats(tok, fmt):
    """Each MedicalGPT format with a named template: the tool list joins the system prompt, the call is the
    assistant's text (labelled), the result a user turn (not labelled)."""
    msgs, tools = chat_messages(CONV, [WEATHER], fmt)
    assert tools is None
    assert msgs == [{"role": "system", "content": format_tools([WEATHER], fmt)},
                    {"role": "user", "content": "北京天气？"}, {"role": "assistant", "content": CALL_TEXT[fmt]},
                    {"role": "user", "content": OBS_TEXT[fmt]}, {"role": "assistant", "content": "28度。"}]
    assert format_calls([CALL], fmt) == CALL_TEXT[fmt] and format_observation(OBS, fmt) == OBS_TEXT[fmt]
    enc = encode_conversation(tok, TEMPLATES["chatml"], CONV, 4096, tools=[WEATHER], tool_format=fmt)
    assert _labelled(tok, enc) == CALL_TEXT[fmt] + "<|im_end|>\n" + "28度。<|im_end|>\n"
    prompt = _prompt_part(tok, enc)
    assert OBS_TEXT[fmt] in prompt and "城市" in prompt and "get_weather" in prompt


@pytest.mark.unit
def test_default_and_qwen_tool_prompts_as_medicalgpt_writes_them():
    assert format_tools([WEATHER], "default") == DEFAULT_TOOLS_TEXT
    assert format_tools([WEATHER], "qwen") == (
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps({"type": "function", "function": WEATHER}, ensure_ascii=False)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
        "\n</tool_call>")
    # a record's own system prompt comes first, the tool list after a blank line (as MedicalGPT joins them)
    msgs, _ = chat_messages([{"role": "system", "content": "你是助手。"}] + CONV, [WEATHER], "default")
    assert msgs[0]["content"] == "你是助手。\n\n" + DEFAULT_TOOLS_TEXT
    # a result then a question: one user turn, joined by a newline
    msgs, _ = chat_messages(CONV[:3] + [{"role": "user", "content": "还有呢？"}, CONV[3]], None, "default")
    assert msgs[2:] == [{"role": "user", "content": OBS_TEXT["default"] + "\n还有呢？"}, CONV[3]]


@pytest.mark.unit
def test_toolcall_file_in_every_rendering(tok):
    """MedicalGPT's glaive tool-call sample in every rendering: the schema is in the prompt, each call is
    labelled, no tool result is."""
    if not TOOLCALL.exists():
        pytest.skip(f"MedicalGPT sample data not found at {TOOLCALL}")
    records = load_records([str(TOOLCALL)], "sft", log=lambda s: None)[:40]
    renderings = [(TEMPLATES["chatml"], fmt) for fmt in FORMATS] + [(_trl_template("qwen2_5"), "native")]
    t = copy.deepcopy(tok)
    t.chat_template = _trl_template("qwen3")  # not prefix-consistent: trained through TRL's training variant
    renderings.append((get_chat_template(None, t), "native"))
    assert renderings[-1][0] != t.chat_template
    calls = 0
    for template, fmt in renderings:
        for rec in records:
            enc = encode_conversation(tok, template, rec["messages"], 100_000, tools=rec.get("tools"), tool_format=fmt)
            labelled, prompt = _labelled(tok, enc), _prompt_part(tok, enc)
            for tool in rec.get("tools", []):
                assert tool["name"] in prompt and tool.get("description", "") in prompt, (fmt, tool)
            for m in rec["messages"]:
                if m.get("tool_calls"):
                    calls += len(m["tool_calls"])
                    call = format_calls(m["tool_calls"], "qwen" if fmt == "native" else fmt)
                    assert call in labelled, (fmt, call)
                if m["role"] == "tool":
                    assert m["content"] in prompt and m["content"] not in labelled, fmt
    assert calls == 7 * sum(len(m.get("tool_calls", [])) for r in records for m in r["messages"]) > 0


def _pref_file(folder: Path) -> Path:
    """Tool-call preference pairs in MedicalGPT's format (data/reward/toolcall_dpo_zh_demo.jsonl's layout):
    chosen/rejected are a call (its default text, or a {"name", "arguments"} object) or a text answer."""
    tools = json.dumps([WEATHER], ensure_ascii=False)
    q = [{"from": "human", "value": "北京天气？"}]
    called = q + [{"from": "function_call", "value": json.dumps(CALL, ensure_ascii=False)},
                  {"from": "observation", "value": OBS}]
    rows = [{"conversations": q, "tools": tools, "chosen": CALL_TEXT["default"], "rejected": "晴天。"},
            {"conversations": called, "tools": tools, "chosen": "北京28度，晴。", "rejected": "不知道。"},
            {"conversations": q, "tools": tools, "chosen": "请问哪个城市？", "rejected": CALL}]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "toolcall_dpo.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.unit
def test_tool_call_preference_pairs(tok, tmp_path):
    pairs = load_records([str(_pref_file(tmp_path))], "preference", log=lambda s: None)
    first, second, third = pairs
    # MedicalGPT's default format keeps its call text as written (the reply of the "Action:" prompt)
    enc = encode_preference(tok, TEMPLATES["chatml"], first["prompt"], first["chosen"], first["rejected"], 4096, 4096,
                            tools=first["tools"], tool_format="default")
    assert tok.decode(enc["chosen_ids"]) == CALL_TEXT["default"] + "<|im_end|>\n"
    assert tok.decode(enc["rejected_ids"]) == "晴天。<|im_end|>\n"
    assert DEFAULT_TOOLS_TEXT in tok.decode(enc["prompt_ids"])
    # in another format the call is read and written the way its prompt asks for calls
    enc = encode_preference(tok, TEMPLATES["chatml"], first["prompt"], first["chosen"], first["rejected"], 4096, 4096,
                            tools=first["tools"], tool_format="qwen")
    assert tok.decode(enc["chosen_ids"]) == CALL_TEXT["qwen"] + "<|im_end|>\n"
    # natively, and prompt + chosen is exactly what sft trains on for that conversation
    qwen25 = _trl_template("qwen2_5")
    for rec, reply in ((second, "北京28度，晴。"), (third, "请问哪个城市？")):
        enc = encode_preference(tok, qwen25, rec["prompt"], rec["chosen"], rec["rejected"], 4096, 4096,
                                tools=rec["tools"], tool_format="native")
        conv = encode_conversation(tok, qwen25, rec["prompt"] + [{"role": "assistant", "content": reply}], 4096,
                                   tools=rec["tools"], tool_format="native")
        assert enc["prompt_ids"] + enc["chosen_ids"] == conv["input_ids"]
    assert tok.decode(enc["rejected_ids"]) == CALL_TEXT["qwen"] + "<|im_end|>\n"
    enc = encode_preference(tok, qwen25, second["prompt"], second["chosen"], second["rejected"], 4096, 4096,
                            tools=second["tools"], tool_format="native")
    assert tok.decode(enc["prompt_ids"]).endswith(
        CALL_TEXT["qwen"] + "<|im_end|>\n<|im_start|>user\n" + OBS_TEXT["qwen"] + "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.unit
def test_system_prompt_flag(tmp_path, capsys):
    d = tmp_path / "grpo"
    d.mkdir()
    (d / "q.jsonl").write_text(json.dumps({"question": "1+1=?", "answer": "2"}) + "\n"
                               + json.dumps({"question": "2+2=?", "answer": "4", "system": "own"}) + "\n")
    train, _, _ = load_train_eval(DataArguments(train_file_dir=str(d), system_prompt="think_answer"), "prompt", 0)
    assert train[0]["prompt"] == [{"role": "system", "content": SYSTEM_PROMPT_PRESETS["think_answer"]},
                                  {"role": "user", "content": "1+1=?"}]
    assert train[1]["prompt"][0] == {"role": "system", "content": "own"}
    assert "--system_prompt put before 1 records (1 kept their own system turn)" in capsys.readouterr().out
    train, _, _ = load_train_eval(DataArguments(train_file_dir=str(d), system_prompt="你是医生。"), "prompt", 0)
    assert train[0]["prompt"][0] == {"role": "system", "content": "你是医生。"}


# ---------------------------------------------------------------- two short runs

@pytest.mark.smoke
def test_sft_on_medicalgpt_toolcall_file_native_template(tmp_path, tiny_base_dir):
    """MedicalGPT's tool-call sft file as shipped (with files the stage does not read beside it) trains
    with a tools-aware Qwen2.5 template; the exported tokenizer keeps it."""
    from transformers import AutoTokenizer

    from tests.launch_utils import losses, train

    if not TOOLCALL.exists():
        pytest.skip(f"MedicalGPT sample data not found at {TOOLCALL}")
    model = tmp_path / "model"
    shutil.copytree(tiny_base_dir, model)
    t = AutoTokenizer.from_pretrained(model)
    t.chat_template = _trl_template("qwen2_5")
    t.save_pretrained(model)
    data = tmp_path / "sft"
    data.mkdir()
    shutil.copy(TOOLCALL, data)
    (data / "notes.txt").write_text("not sft data\n")
    (data / "table.csv").write_text("a,b\n")
    out = tmp_path / "out"
    p = train(["--stage", "sft", "--model_name_or_path", str(model), "--train_file_dir", str(data),
               "--model_max_length", "256", "--max_train_samples", "40", "--per_device_train_batch_size", "2",
               "--max_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3", "--save_steps", "0",
               "--output_dir", str(out)])
    log = p.stdout + p.stderr
    assert "29 records with tool calls or tools: rendered by the chat template itself" in log  # of the first 40
    assert "skipped 2 files this stage does not read (it reads .jsonl, .json, .parquet): notes.txt, table.csv" in log
    assert "tokenized cache: miss (key" in log
    assert sorted(losses(str(out))) == [1, 2]
    assert AutoTokenizer.from_pretrained(out).chat_template == t.chat_template


@pytest.mark.smoke
def test_dpo_on_tool_call_pairs_medicalgpt_flags(tmp_path, tiny_base_dir):
    """Tool-call pairs in MedicalGPT's format through dpo with run_dpo.sh's --tool_format default; a bad line is
    skipped with --skip_bad_records and listed in rejected_records.jsonl."""
    from tests.launch_utils import losses, train

    data = tmp_path / "reward"
    path = _pref_file(data)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"conversations": [{"from": "human", "value": "q"}], "chosen": "a"}\n')  # line 4: no rejected
    out = tmp_path / "out"
    args = ["--stage", "dpo", "--model_name_or_path", tiny_base_dir, "--template_name", "chatml",
            "--tool_format", "default", "--train_file_dir", str(data), "--max_source_length", "256",
            "--max_target_length", "64", "--per_device_train_batch_size", "3", "--max_steps", "1",
            "--logging_steps", "1", "--save_steps", "0", "--output_dir", str(out)]
    p = train(args + ["--skip_bad_records"])  # without it: error naming {path}:4 (tests/test_formats.py)
    assert "3 records with tool calls or tools: MedicalGPT's 'default' tool format" in p.stdout
    assert "dpo train: 3 of 3 pairs kept" in p.stdout
    rejected = [json.loads(line) for line in open(out / "rejected_records.jsonl")]
    assert [r["where"] for r in rejected] == [f"{path}:4"] and "field 'rejected': missing" in rejected[0]["error"]
    assert sorted(losses(str(out))) == [1]
    assert os.path.exists(out / "model.safetensors")
