"""Dataset files -> canonical records, one shape per kind.

    pt:         {"text": str}
    sft:        {"messages": [message, ...], "tools"?: [function schema, ...]}
    preference: {"prompt": [messages ending with a user or tool turn], "chosen": reply, "rejected": reply,
                 "tools"?: [...]}
    prompt:     {"prompt": [messages ending with a user turn], "answer": str | None}

A message is {"role": "system"|"user"|"assistant"|"tool", "content": str}; an assistant message that
calls tools also has "tool_calls": [{"name": str, "arguments": JSON value}]. A reply is a string, or
such an assistant message when it is a tool call. How tool calls become text is the template's
business (templates.chat_messages): natively through a tools-aware chat template, or in one of
MedicalGPT's tool formats.

Accepted inputs: .txt (pt, one document per line), .jsonl, .json (a list, {"data": [...]}, one
object, or JSON Lines content), .parquet; records in MedicalGPT's sharegpt `conversations`
(from: human/gpt/system/function_call/observation, with a `tools` column holding the function schemas
as a JSON string and an optional `system_prompt` column), OpenAI `messages` (assistant `tool_calls`,
role `tool`), alpaca (`instruction`/`input`/`output`/`system`/`history`), `text`, MedicalGPT and TRL
preference pairs, and `question`/`answer` prompts.

Every structural problem raises DataError naming file:line and the field, so a bad record in a
million-line file is found without bisecting (``skip_bad=True`` drops and reports them instead).
What loading changes on purpose (empty turns, unanswered last turns, identical preference pairs,
prompts without an answer) is counted per file with the first few positions.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any, Optional

from medgpt_ds.errors import UserError

KINDS = ("pt", "sft", "preference", "prompt")
DEFAULT_EXTS = (".jsonl", ".json", ".txt", ".parquet")
RECORD_EXTS = (".jsonl", ".json", ".parquet")  # what every kind but pt reads

# Role names seen in the wild -> canonical role. `function_call` (MedicalGPT/LLaMA-Factory sharegpt)
# is an assistant turn that calls a tool; `observation` is the tool's result.
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
          "function_call": "function_call", "observation": "tool", "tool": "tool", "function": "tool"}

# --system_prompt presets. `think_answer` is the fixed prompt MedicalGPT's grpo puts before every question
# (the DeepSeek-R1 / open-r1 format that the `format` reward checks).
SYSTEM_PROMPT_PRESETS = {
    "think_answer": (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
        "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
        "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
        "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>"),
}

_BOM = b"\xef\xbb\xbf"


class DataError(UserError):
    """A problem in a data file; the message reads `path:LINE: field 'name': problem`."""


def _fail(where: str, field: str, problem: str):
    raise DataError(f"{where}: field '{field}': {problem}")


class Tally:
    """What loading changed or dropped on purpose, counted, with the first few positions of each."""

    KEEP = 5
    DESCRIBE = {
        "empty_user": "empty user turns kept",
        "trailing_user": "conversations ending on an unanswered user/tool turn: that turn dropped",
        "unanswered_record": "records dropped: no answered turn (only an unanswered question)",
        "empty_answer_turn": "empty final assistant answers: that exchange dropped",
        "empty_answer_record": "records dropped: an empty assistant answer before later turns",
        "same_pair": "preference pairs dropped: chosen == rejected",
        "no_answer": "prompt records without 'answer' (answer rewards score them 0)",
        "bad": "bad records skipped (--skip_bad_records; listed in rejected_records.jsonl)",
    }

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.where: dict[str, list[str]] = {}

    def add(self, event: str, where: str) -> None:
        self.counts[event] = self.counts.get(event, 0) + 1
        first = self.where.setdefault(event, [])
        if len(first) < self.KEEP:
            first.append(where)

    def __getitem__(self, event: str) -> int:
        return self.counts.get(event, 0)

    def update(self, other: "Tally") -> None:
        for event, n in other.counts.items():
            self.counts[event] = self.counts.get(event, 0) + n
            first = self.where.setdefault(event, [])
            first += other.where[event][: self.KEEP - len(first)]

    def lines(self) -> list[str]:
        """One line per event: ``N what (first: file:line, ...)``."""
        out = []
        for event, n in self.counts.items():
            if event in self.DESCRIBE:
                more = ", ..." if n > len(self.where[event]) else ""
                out.append(f"{n} {self.DESCRIBE[event]} (first: {', '.join(self.where[event])}{more})")
        return out


def find_files(path: str, exts=DEFAULT_EXTS, log: Optional[Callable[[str], Any]] = None) -> list[str]:
    """Data files under ``path`` (a file, or a directory searched recursively), sorted.

    Hidden files and directories (``.git``, ``.ipynb_checkpoints``) are ignored; any other file in a
    directory without one of ``exts`` (a .txt beside sft data, a .csv, an .xlsx) is named through
    ``log`` as skipped. Raises DataError when the path does not exist or holds no file with one of
    ``exts``.
    """
    exts = tuple(exts)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if not path.endswith(exts + DEFAULT_EXTS):  # a named .txt gets iter_raw's message for its kind
            raise DataError(f"{path}: unsupported file type for this stage (expected one of {', '.join(exts)})")
        return [path]
    found, skipped = [], []
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            if n.startswith("."):
                continue
            (found if n.endswith(exts) else skipped).append(os.path.join(root, n))
    skipped.sort()
    shown = ", ".join(os.path.relpath(p, path) for p in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
    if not found:
        extra = f" (not read by this stage: {shown})" if skipped else ""
        raise DataError(f"{path}: no {', '.join(exts)} files found{extra}")
    if skipped and log is not None:
        log(f"[data] {path}: skipped {len(skipped)} files this stage does not read "
            f"(it reads {', '.join(exts)}): {shown}")
    return sorted(found)


def load_records(files: list[str], kind: str, *, max_samples: int | None = None,
                 log: Callable[[str], Any] = print, skip_bad: bool = False,
                 rejected: Optional[list[dict]] = None, tally: Optional[Tally] = None) -> list[dict]:
    """Read ``files`` and return canonical records of ``kind`` (pt, sft, preference, prompt).

    Stops once ``max_samples`` records are collected. Logs per-file counts, and what was changed or
    dropped on purpose (see Tally), through ``log``; ``tally`` (if given) accumulates those counts
    over all files. A bad record raises DataError (file:line:field); with ``skip_bad`` it is dropped,
    counted, and appended to ``rejected`` as {"where", "error"}. Raises DataError when nothing loads.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    convert = {"pt": _to_pt, "sft": _to_sft, "preference": _to_preference, "prompt": _to_prompts}[kind]
    out: list[dict] = []
    for path in files:
        file_tally = Tally()

        def on_error(where: str, message: str) -> None:
            if not skip_bad:
                raise DataError(message)
            file_tally.add("bad", where)
            if rejected is not None:
                rejected.append({"where": where, "error": message})

        rows, before = 0, len(out)
        for where, obj in iter_raw(path, kind, file_tally, on_error):
            rows += 1
            try:
                out += convert(obj, where, file_tally)
            except DataError as e:
                on_error(where, str(e))
            if max_samples is not None and len(out) >= max_samples:
                break
        blank = f", {file_tally['blank']} blank lines skipped" if file_tally["blank"] else ""
        log(f"[data] {path}: {len(out) - before} {kind} records from {rows} rows{blank}")
        for line in file_tally.lines():
            log(f"[data] {path}: {line}")
        if tally is not None:
            tally.update(file_tally)
        if max_samples is not None and len(out) >= max_samples:
            del out[max_samples:]
            log(f"[data] stopped at max_samples={max_samples}")
            break
    if not out:
        raise DataError(f"no {kind} records found in {', '.join(files) or '(no files)'}")
    return out


# ---------------------------------------------------------------- file readers

def _raise(where: str, message: str) -> None:
    raise DataError(message)


def iter_raw(path: str, kind: str, tally: Tally,
             on_error: Callable[[str, str], None] = _raise) -> Iterator[tuple[str, Any]]:
    """Yield (``path:line``, record object) pairs; blank lines are counted in ``tally['blank']``.

    A line or file that cannot be read (invalid UTF-8, malformed JSON, not an object) goes to
    ``on_error(where, message)``, which raises by default; when it returns, reading goes on with the
    next line (JSON Lines) or the next file. A UTF-8 byte-order mark (Windows editors) is accepted.
    """
    if path.endswith(".txt"):
        if kind != "pt":
            on_error(path, f"{path}: .txt files hold pretraining text (one document per line); "
                           f"'{kind}' data must be .jsonl, .json or .parquet records")
            return
        for n, text in _text_lines(path, _bytes_lines(path), on_error):
            text = text.rstrip("\r\n")
            if not text.strip():
                tally.add("blank", f"{path}:{n}")
                continue
            yield f"{path}:{n}", {"text": text}
    elif path.endswith(".jsonl"):
        yield from _json_lines(path, _text_lines(path, _bytes_lines(path), on_error), tally, on_error)
    elif path.endswith(".json"):
        yield from _json_file(path, tally, on_error)
    elif path.endswith(".parquet"):
        yield from _parquet(path, on_error)
    else:
        on_error(path, f"{path}: unsupported file type (expected one of {', '.join(DEFAULT_EXTS)})")


def _bytes_lines(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from f


def _text_lines(path: str, lines, on_error) -> Iterator[tuple[int, str]]:
    """(line number, text) of byte lines decoded as UTF-8; a line that is not UTF-8 is reported with
    its line number, column and byte offset in the file (what a hex editor shows)."""
    offset = 0
    for n, raw in enumerate(lines, 1):
        if n == 1 and raw.startswith(_BOM):
            raw, offset = raw[len(_BOM):], len(_BOM)
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            on_error(f"{path}:{n}", f"{path}:{n}: invalid UTF-8 at column {e.start + 1} (byte {offset + e.start} of "
                                    f"the file: {raw[e.start:e.start + 4]!r}); save the file as UTF-8")
        offset += len(raw)


def _json_lines(path: str, lines, tally: Tally, on_error) -> Iterator[tuple[str, Any]]:
    for n, line in lines:
        if not line.strip():
            tally.add("blank", f"{path}:{n}")
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            on_error(where, f"{where}: malformed JSON: {e.msg} at column {e.colno}")
            continue
        if not isinstance(obj, dict):
            on_error(where, f"{where}: expected a JSON object, got {type(obj).__name__}")
            continue
        yield where, obj


def _json_file(path: str, tally: Tally, on_error) -> Iterator[tuple[str, Any]]:
    """A JSON list of records, {"data": [...]}, a single object, or JSON Lines saved as .json (which
    MedicalGPT's loaders, through `datasets`' json builder, accept)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        n = raw.count(b"\n", 0, e.start) + 1
        on_error(f"{path}:{n}", f"{path}:{n}: invalid UTF-8 (byte {e.start} of the file: "
                                f"{raw[e.start:e.start + 4]!r}); save the file as UTF-8")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # one object per line
            lines = text.split("\n")
            yield from _json_lines(path, enumerate(lines[:-1] if lines[-1] == "" else lines, 1), tally, on_error)
        else:
            on_error(f"{path}:{e.lineno}", f"{path}:{e.lineno}: malformed JSON: {e.msg} at column {e.colno}")
        return
    if isinstance(data, list):
        for obj, n in zip(data, _array_item_lines(text)):
            where = f"{path}:{n}"
            if not isinstance(obj, dict):
                on_error(where, f"{where}: expected a JSON object, got {type(obj).__name__}")
                continue
            yield where, obj
    elif isinstance(data, dict) and isinstance(data.get("data"), list):
        for i, obj in enumerate(data["data"], 1):
            where = f"{path}:record {i}"
            if not isinstance(obj, dict):
                on_error(where, f"{where}: expected a JSON object, got {type(obj).__name__}")
                continue
            yield where, obj
    elif isinstance(data, dict):
        yield f"{path}:{text[:len(text) - len(text.lstrip())].count(chr(10)) + 1}", data
    else:
        on_error(f"{path}:1", f"{path}:1: expected a JSON list of records, {{\"data\": [...]}} or JSON Lines")


def _parquet(path: str, on_error) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    row = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        for batch in batches:
            for obj in batch.to_pylist():
                row += 1
                yield f"{path}:row {row}", obj
    except OSError as e:  # pyarrow.ArrowInvalid derives from it: a truncated or foreign file
        on_error(f"{path}:row {row + 1}", f"{path}: unreadable parquet file after {row} rows: {e}")


_SKIP = re.compile(r"[\s,]*")


def _array_item_lines(text: str) -> list[int]:
    """1-based line on which each element of a top-level JSON array starts."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    lines, line, counted = [], 1, 0
    while True:
        pos = _SKIP.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return lines
        line += text.count("\n", counted, pos)
        counted = pos
        lines.append(line)
        _, pos = dec.raw_decode(text, pos)


# ---------------------------------------------------------------- field helpers

def _text(value: Any, where: str, field: str) -> str:
    """A required, non-blank string."""
    if not _string(value, where, field).strip():
        _fail(where, field, "empty")
    return value


def _string(value: Any, where: str, field: str) -> str:
    """A required string (may be empty)."""
    if value is None:
        _fail(where, field, "missing")
    if not isinstance(value, str):
        _fail(where, field, f"expected a string, got {type(value).__name__}")
    return value


def _json_value(value: Any) -> Any:
    """Arguments given as a JSON string (OpenAI) become the object; anything else stays as it is."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _call(value: Any, where: str, field: str) -> dict:
    """One tool call: a JSON string or object {"name", "arguments"} (also OpenAI's {"type": "function",
    "function": {...}} and Llama's "parameters") -> {"name": str, "arguments": JSON value}."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            _fail(where, field, f"a function call must be JSON {{\"name\": ..., \"arguments\": {{...}}}}: "
                                f"{e.msg} at column {e.colno}")
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"].strip():
        _fail(where, field, "a function call must be an object with a 'name' and 'arguments'")
    args = value.get("arguments", value.get("parameters", {}))
    return {"name": value["name"], "arguments": _json_value(args)}


def _tools(obj: dict, where: str) -> list[dict] | None:
    """The `tools` column: function schemas as a JSON string (MedicalGPT) or a list; OpenAI's
    {"type": "function", "function": schema} wrapper is taken off. None when absent or empty."""
    raw = obj.get("tools")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            _fail(where, "tools", f"not valid JSON: {e.msg} at column {e.colno}")
    if not isinstance(raw, list):
        _fail(where, "tools", f"expected a list of function schemas, got {type(raw).__name__}")
    out = []
    for i, t in enumerate(raw):
        if isinstance(t, dict) and isinstance(t.get("function"), dict):
            t = t["function"]
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            _fail(where, f"tools[{i}]", "expected a function schema with a 'name'")
        out.append(t)
    return out or None


def _turns(turns: Any, where: str, field: str, tally: Optional[Tally] = None) -> tuple[list[dict], list[str]]:
    """Parse a list of {from, value} or {role, content} turns -> (messages, field names).

    A `function_call` turn becomes an assistant message with tool_calls (joined to an assistant
    message right before it: text then call, or parallel calls); `observation` becomes role tool.
    Empty user turns are kept (counted); an empty system turn means no system prompt.
    """
    if turns is None:
        _fail(where, field, "missing")
    if not isinstance(turns, list):
        _fail(where, field, f"expected a list of turns, got {type(turns).__name__}")
    if not turns:
        _fail(where, field, "empty")
    msgs, fields = [], []
    for i, t in enumerate(turns):
        f = f"{field}[{i}]"
        if not isinstance(t, dict):
            _fail(where, f, "expected an object with 'from'/'value' or 'role'/'content'")
        rk = "from" if "from" in t else "role"
        ck = "value" if "value" in t else "content"
        role = t.get(rk)
        if role not in _ROLES:
            _fail(where, f"{f}.{rk}", f"unknown role {role!r} (expected one of {', '.join(_ROLES)})")
        role, value = _ROLES[role], t.get(ck)
        if role == "system":
            if isinstance(value, str) and not value.strip():
                continue  # an empty system turn (common in sharegpt exports) means no system prompt
            msg = {"role": "system", "content": _text(value, where, f"{f}.{ck}")}
        elif role == "user":
            msg = {"role": "user", "content": _string(value, where, f"{f}.{ck}")}
            if not value.strip() and tally is not None:
                tally.add("empty_user", f"{where}:{f}")
        elif role == "tool":
            if isinstance(value, (dict, list)):
                value = json.dumps(value, ensure_ascii=False)
            msg = {"role": "tool", "content": _string(value, where, f"{f}.{ck}")}
        elif role == "function_call":
            call = _call(value, where, f"{f}.{ck}")
            if msgs and msgs[-1]["role"] == "assistant":
                msgs[-1]["tool_calls"] = msgs[-1].get("tool_calls", []) + [call]
                continue
            msg = {"role": "assistant", "content": "", "tool_calls": [call]}
        else:
            calls = t.get("tool_calls")
            if calls:
                if not isinstance(calls, list):
                    _fail(where, f"{f}.tool_calls", f"expected a list, got {type(calls).__name__}")
                calls = [_call(c, where, f"{f}.tool_calls[{j}]") for j, c in enumerate(calls)]
                msg = {"role": "assistant", "content": _string("" if value is None else value, where, f"{f}.{ck}"),
                       "tool_calls": calls}
            else:
                msg = {"role": "assistant", "content": _string(value, where, f"{f}.{ck}")}
        msgs.append(msg)
        fields.append(f)
    if not msgs:
        _fail(where, field, "empty")
    return msgs, fields


def _prefix(obj: dict, where: str) -> tuple[list[dict], list[str]]:
    """Messages from optional top-level `system` (or MedicalGPT's role-play `system_prompt`) and
    `history` ([[query, answer], ...])."""
    msgs, fields = [], []
    for key in ("system", "system_prompt"):
        system = obj.get(key)
        if system is None:
            continue
        if not isinstance(system, str):
            _fail(where, key, f"expected a string, got {type(system).__name__}")
        if system.strip():
            msgs.append({"role": "system", "content": system})
            fields.append(key)
            break
    history = obj.get("history")
    if history:
        if not isinstance(history, list):
            _fail(where, "history", f"expected a list of [query, answer] pairs, got "
                                    f"{type(history).__name__}")
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                _fail(where, f"history[{i}]", "expected a [query, answer] pair")
            msgs.append({"role": "user", "content": _text(pair[0], where, f"history[{i}][0]")})
            msgs.append({"role": "assistant", "content": _text(pair[1], where, f"history[{i}][1]")})
            fields += [f"history[{i}][0]", f"history[{i}][1]"]
    return msgs, fields


def _merge(pm: list[dict], pf: list[str], m: list[dict], f: list[str]):
    """Put the system/history prefix before turns ``m``; a system turn in ``m`` wins over a
    top-level `system` field and stays first."""
    if m[0]["role"] == "system":
        if pm and pm[0]["role"] == "system":
            pm, pf = pm[1:], pf[1:]
        return m[:1] + pm + m[1:], f[:1] + pf + f[1:]
    return pm + m, pf + f


def _conversation(obj: dict, where: str, need_answer: bool,
                  tally: Optional[Tally] = None) -> tuple[list[dict], list[str]]:
    """Messages of an sft-style record (sharegpt, messages or alpaca), order not yet checked."""
    msgs, fields = _prefix(obj, where)
    if "conversations" in obj or "messages" in obj:
        key = "conversations" if "conversations" in obj else "messages"
        m, f = _turns(obj[key], where, key, tally)
        return _merge(msgs, fields, m, f)
    if "instruction" in obj:
        query = _text(obj["instruction"], where, "instruction")
        extra = obj.get("input")
        if extra is not None and not isinstance(extra, str):
            _fail(where, "input", f"expected a string, got {type(extra).__name__}")
        if extra and extra.strip():
            query = f"{query}\n{extra}"
        msgs.append({"role": "user", "content": query})
        fields.append("instruction")
        if obj.get("output") is not None or need_answer:
            msgs.append({"role": "assistant", "content": _text(obj.get("output"), where, "output")})
            fields.append("output")
        return msgs, fields
    _fail(where, "conversations", "missing (expected 'conversations', 'messages' or alpaca "
                                  "'instruction'/'output')")


# After each role, the roles that may follow (tool results follow an assistant turn or each other).
_NEXT = {None: ("user",), "user": ("assistant",), "assistant": ("user", "tool"), "tool": ("tool", "assistant", "user")}


def _check_order(msgs: list[dict], fields: list[str], where: str) -> None:
    """An optional leading system turn, then user and assistant turns alternating; tool results
    only after an assistant turn."""
    prev = None
    for i, (m, f) in enumerate(zip(msgs, fields)):
        if m["role"] == "system":
            if i != 0:
                _fail(where, f, "a system turn may only come first")
            continue
        allowed = _NEXT[prev]
        if m["role"] not in allowed:
            _fail(where, f, f"role '{m['role']}' where {' or '.join(repr(a) for a in allowed)} was expected "
                            "(turns must alternate user, assistant, user, ...; tool results follow an assistant turn)")
        prev = m["role"]


def _is_empty_answer(m: dict) -> bool:
    return m["role"] == "assistant" and not m.get("tool_calls") and not m["content"].strip()


def _prompt_messages(value: Any, where: str, field: str, obj: dict) -> list[dict]:
    """A prompt given as a string or a message list, with optional system/history prefix."""
    msgs, fields = _prefix(obj, where)
    if isinstance(value, str):
        msgs.append({"role": "user", "content": _text(value, where, field)})
        fields.append(field)
    else:
        m, f = _turns(value, where, field)
        msgs, fields = _merge(msgs, fields, m, f)
    _check_order(msgs, fields, where)
    if msgs[-1]["role"] != "user":
        _fail(where, fields[-1], "a prompt must end with a user turn")
    return msgs


# ---------------------------------------------------------------- converters (one per kind)

def _to_pt(obj: dict, where: str, tally: Tally) -> list[dict]:
    return [{"text": _text(obj.get("text"), where, "text")}]


def _to_sft(obj: dict, where: str, tally: Tally) -> list[dict]:
    msgs, fields = _conversation(obj, where, need_answer=True, tally=tally)
    _check_order(msgs, fields, where)
    tools = _tools(obj, where)
    trailing = msgs[-1]["role"] in ("user", "tool")
    # MedicalGPT pairs turns and ignores an unanswered last query; do the same, but count it.
    while msgs and msgs[-1]["role"] in ("user", "tool"):
        msgs, fields = msgs[:-1], fields[:-1]
    if not any(m["role"] == "assistant" for m in msgs):
        if trailing:  # a question nobody answered (MedicalGPT skips these too)
            tally.add("unanswered_record", where)
            return []
        _fail(where, fields[-1] if fields else "conversations", "no user and assistant turns")
    if trailing:
        tally.add("trailing_user", where)
    empty = [i for i, m in enumerate(msgs) if _is_empty_answer(m)]
    if empty:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        if empty != [last]:  # later turns were written after an empty answer: no consistent context
            tally.add("empty_answer_record", where)
            return []
        msgs, fields = msgs[:last], fields[:last]
        while msgs and msgs[-1]["role"] in ("user", "tool"):
            msgs, fields = msgs[:-1], fields[:-1]
        if not any(m["role"] == "assistant" for m in msgs):
            tally.add("empty_answer_record", where)
            return []
        tally.add("empty_answer_turn", where)
    return [{"messages": msgs, "tools": tools} if tools else {"messages": msgs}]


def _reply(msg: dict) -> Any:
    """Canonical reply: the text, or the assistant message when it calls tools."""
    if msg.get("tool_calls"):
        return {"role": "assistant", "content": msg["content"], "tool_calls": msg["tool_calls"]}
    return msg["content"]


def _response(value: Any, where: str, field: str) -> Any:
    """A chosen/rejected response: a string, a function call {"name", "arguments"}, one turn, or a
    message list (its last assistant message) -> a string or an assistant message with tool_calls."""
    if isinstance(value, dict):
        if "name" in value or "function" in value:
            return {"role": "assistant", "content": "", "tool_calls": [_call(value, where, field)]}
        value = [value]
    if isinstance(value, list):
        msgs, _ = _turns(value, where, field)
        replies = [m for m in msgs if m["role"] == "assistant"]
        if not replies:
            _fail(where, field, "no assistant message")
        if _is_empty_answer(replies[-1]):
            _fail(where, field, "empty")
        return _reply(replies[-1])
    return _text(value, where, field)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    return a == b


def _to_preference(obj: dict, where: str, tally: Tally) -> list[dict]:
    if "conversations" in obj:  # MedicalGPT: prompt history (may end on a tool result) + chosen/rejected
        msgs, fields = _conversation(obj, where, need_answer=False)
        _check_order(msgs, fields, where)
        if msgs[-1]["role"] not in ("user", "tool"):
            _fail(where, fields[-1], "the prompt history must end with a human turn (or an observation)")
        prompt = msgs
        chosen, rejected = _response(obj.get("chosen"), where, "chosen"), \
            _response(obj.get("rejected"), where, "rejected")
    elif "question" in obj:  # older MedicalGPT: question/response_chosen/response_rejected
        prompt = _prompt_messages(obj["question"], where, "question", obj)
        ck = "response_chosen" if "response_chosen" in obj else "chosen"
        rk = "response_rejected" if "response_rejected" in obj else "rejected"
        chosen, rejected = _response(obj.get(ck), where, ck), _response(obj.get(rk), where, rk)
    elif "prompt" in obj:  # TRL explicit prompt
        prompt = _prompt_messages(obj["prompt"], where, "prompt", obj)
        chosen, rejected = _response(obj.get("chosen"), where, "chosen"), \
            _response(obj.get("rejected"), where, "rejected")
    elif isinstance(obj.get("chosen"), list) and isinstance(obj.get("rejected"), list):
        prompt, chosen, rejected = _implicit_prompt(obj, where)
    else:
        _fail(where, "conversations", "missing (expected MedicalGPT 'conversations'+'chosen'+"
                                      "'rejected' or TRL 'prompt'+'chosen'+'rejected')")
    if any(_is_empty_answer(m) for m in prompt):
        tally.add("empty_answer_record", where)
        return []
    if _same(chosen, rejected):
        tally.add("same_pair", where)
        return []
    tools = _tools(obj, where)
    rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if tools:
        rec["tools"] = tools
    return [rec]


def _implicit_prompt(obj: dict, where: str) -> tuple[list[dict], Any, Any]:
    """TRL implicit prompt: chosen/rejected message lists whose shared prefix is the prompt."""
    chosen, cf = _turns(obj["chosen"], where, "chosen")
    rejected, _ = _turns(obj["rejected"], where, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if len(msgs) != n + 1 or msgs[n]["role"] != "assistant":
            _fail(where, name, "implicit prompt: chosen and rejected must share every turn but "
                               "a final assistant reply")
        if _is_empty_answer(msgs[n]):
            _fail(where, name, "empty")
    prompt = chosen[:n]
    if not prompt:
        _fail(where, "chosen", "implicit prompt: no shared prompt turns")
    _check_order(prompt, cf[:n], where)
    if prompt[-1]["role"] not in ("user", "tool"):
        _fail(where, cf[n - 1], "a prompt must end with a user turn")
    return prompt, _reply(chosen[n]), _reply(rejected[n])


def _answer(value: Any, where: str, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # numeric GRPO answers ("72") are compared as text
    if not isinstance(value, str):
        _fail(where, field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        _fail(where, field, "empty (leave the field out for no reference answer)")
    return value


def _to_prompts(obj: dict, where: str, tally: Tally) -> list[dict]:
    for key in ("question", "prompt"):  # MedicalGPT grpo `question`, or `prompt`
        if key in obj:
            prompt = _prompt_messages(obj[key], where, key, obj)
            answer = _answer(obj.get("answer"), where, "answer")
            if answer is None:
                tally.add("no_answer", where)
            return [{"prompt": prompt, "answer": answer}]
    # An sft conversation: every user turn, with the history before it, is one prompt.
    msgs, fields = _conversation(obj, where, need_answer=False)
    _check_order(msgs, fields, where)
    if any(_is_empty_answer(m) for m in msgs):
        tally.add("empty_answer_record", where)
        return []
    tools = _tools(obj, where)
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in msgs):
        # Rollouts render plain messages: tool calls and results as MedicalGPT's default text format.
        from medgpt_ds.data.templates import chat_messages

        msgs, _ = chat_messages(msgs, tools, "default")
    out = []
    for i, m in enumerate(msgs):
        if m["role"] == "user":
            answer = msgs[i + 1]["content"] if i + 1 < len(msgs) else None
            if answer is None:
                tally.add("no_answer", where)
            out.append({"prompt": msgs[:i + 1], "answer": answer})
    return out
