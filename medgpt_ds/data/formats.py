"""Dataset files -> canonical records, one shape per kind (see .spec.md).

    pt:         {"text": str}
    sft:        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    preference: {"prompt": [messages ending with a user turn], "chosen": str, "rejected": str}
    prompt:     {"prompt": [messages ending with a user turn], "answer": str | None}

Accepted inputs: .txt (pt, one document per line), .jsonl, .json (a list or {"data": [...]}),
.parquet; records in MedicalGPT's sharegpt `conversations`, OpenAI `messages`, alpaca
(`instruction`/`input`/`output`/`system`/`history`), `text`, MedicalGPT and TRL preference pairs,
and `question`/`answer` prompts. Every problem raises DataError naming file:line and the field,
so a bad record in a million-line file is found without bisecting.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from medgpt_ds.errors import UserError

KINDS = ("pt", "sft", "preference", "prompt")
DEFAULT_EXTS = (".jsonl", ".json", ".txt", ".parquet")

# Role names seen in the wild -> canonical role.
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


class DataError(UserError):
    """A problem in a data file; the message reads `path:LINE: field 'name': problem`."""


def _fail(where: str, field: str, problem: str):
    raise DataError(f"{where}: field '{field}': {problem}")


def find_files(path: str, exts=DEFAULT_EXTS) -> list[str]:
    """Data files under ``path`` (a file, or a directory searched recursively), sorted.

    Hidden files and directories (``.git``, ``.ipynb_checkpoints``) are skipped. Raises DataError
    when the path does not exist or holds no file with one of ``exts``.
    """
    exts = tuple(exts)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if not path.endswith(exts):
            raise DataError(f"{path}: unsupported file type (expected one of {', '.join(exts)})")
        return [path]
    found = []
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, n) for n in names
                  if n.endswith(exts) and not n.startswith(".")]
    if not found:
        raise DataError(f"{path}: no {', '.join(exts)} files found")
    return sorted(found)


def load_records(files: list[str], kind: str, *, max_samples: int | None = None,
                 log: Callable[[str], Any] = print) -> list[dict]:
    """Read ``files`` and return canonical records of ``kind`` (pt, sft, preference, prompt).

    Stops once ``max_samples`` records are collected. Logs per-file counts through ``log``.
    Raises DataError (file:line:field) on the first bad record, and when nothing was loaded.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    convert = {"pt": _to_pt, "sft": _to_sft, "preference": _to_preference,
               "prompt": _to_prompts}[kind]
    out: list[dict] = []
    for path in files:
        stats = {"rows": 0, "blank": 0, "dropped_trailing_user": 0}
        before = len(out)
        for where, obj in _iter_raw(path, kind, stats):
            stats["rows"] += 1
            out += convert(obj, where, stats)
            if max_samples is not None and len(out) >= max_samples:
                break
        extra = f", {stats['blank']} blank lines skipped" if stats["blank"] else ""
        if stats["dropped_trailing_user"]:
            extra += f", {stats['dropped_trailing_user']} unanswered final user turns dropped"
        log(f"[data] {path}: {len(out) - before} {kind} records from {stats['rows']} rows{extra}")
        if max_samples is not None and len(out) >= max_samples:
            del out[max_samples:]
            log(f"[data] stopped at max_samples={max_samples}")
            break
    if not out:
        raise DataError(f"no {kind} records found in {', '.join(files) or '(no files)'}")
    return out


# ---------------------------------------------------------------- file readers

def _iter_raw(path: str, kind: str, stats: dict) -> Iterator[tuple[str, Any]]:
    """Yield (``path:line``, record) pairs; blank lines are counted in stats['blank'].

    Text files are read as utf-8-sig so a byte-order mark (Windows editors) is not an error.
    """
    if path.endswith(".txt"):
        if kind != "pt":
            raise DataError(f"{path}: .txt files hold pretraining text (one document per line); "
                            f"'{kind}' data must be .jsonl, .json or .parquet records")
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                text = line.rstrip("\r\n")
                if not text.strip():
                    stats["blank"] += 1
                    continue
                yield f"{path}:{n}", {"text": text}
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    stats["blank"] += 1
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: malformed JSON: {e.msg} at column {e.colno}") \
                        from None
                yield f"{path}:{n}", _as_object(obj, f"{path}:{n}")
    elif path.endswith(".json"):
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} at column {e.colno}") \
                from None
        if isinstance(data, list):
            lines = _array_item_lines(text)
            for obj, n in zip(data, lines):
                yield f"{path}:{n}", _as_object(obj, f"{path}:{n}")
        elif isinstance(data, dict) and isinstance(data.get("data"), list):
            for i, obj in enumerate(data["data"], 1):
                yield f"{path}:record {i}", _as_object(obj, f"{path}:record {i}")
        else:
            raise DataError(f"{path}:1: expected a JSON list of records or {{\"data\": [...]}}")
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for obj in batch.to_pylist():
                row += 1
                yield f"{path}:row {row}", obj
    else:
        raise DataError(f"{path}: unsupported file type (expected one of {', '.join(DEFAULT_EXTS)})")


def _as_object(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


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
    if value is None:
        _fail(where, field, "missing")
    if not isinstance(value, str):
        _fail(where, field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        _fail(where, field, "empty")
    return value


def _turns(turns: Any, where: str, field: str) -> tuple[list[dict], list[str]]:
    """Parse a list of {from, value} or {role, content} turns -> (messages, field names)."""
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
        if role == "system" and isinstance(t.get(ck), str) and not t[ck].strip():
            continue  # an empty system turn (common in sharegpt exports) means no system prompt
        msgs.append({"role": _ROLES[role], "content": _text(t.get(ck), where, f"{f}.{ck}")})
        fields.append(f)
    if not msgs:
        _fail(where, field, "empty")
    return msgs, fields


def _prefix(obj: dict, where: str) -> tuple[list[dict], list[str]]:
    """Messages from optional top-level `system` and `history` ([[query, answer], ...])."""
    msgs, fields = [], []
    system = obj.get("system")
    if system is not None:
        if not isinstance(system, str):
            _fail(where, "system", f"expected a string, got {type(system).__name__}")
        if system.strip():
            msgs.append({"role": "system", "content": system})
            fields.append("system")
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


def _conversation(obj: dict, where: str, need_answer: bool) -> tuple[list[dict], list[str]]:
    """Messages of an sft-style record (sharegpt, messages or alpaca), order not yet checked."""
    msgs, fields = _prefix(obj, where)
    if "conversations" in obj or "messages" in obj:
        key = "conversations" if "conversations" in obj else "messages"
        m, f = _turns(obj[key], where, key)
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


def _check_order(msgs: list[dict], fields: list[str], where: str) -> None:
    """An optional leading system turn, then user and assistant turns alternating."""
    expected = "user"
    for i, (m, f) in enumerate(zip(msgs, fields)):
        if m["role"] == "system":
            if i != 0:
                _fail(where, f, "a system turn may only come first")
            continue
        if m["role"] != expected:
            _fail(where, f, f"role '{m['role']}' where '{expected}' was expected "
                            "(turns must alternate user, assistant, user, ...)")
        expected = "assistant" if expected == "user" else "user"


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

def _to_pt(obj: dict, where: str, stats: dict) -> list[dict]:
    return [{"text": _text(obj.get("text"), where, "text")}]


def _to_sft(obj: dict, where: str, stats: dict) -> list[dict]:
    msgs, fields = _conversation(obj, where, need_answer=True)
    _check_order(msgs, fields, where)
    if msgs[-1]["role"] == "user":
        # MedicalGPT pairs turns and ignores an unanswered last query; do the same, but count it.
        msgs, fields = msgs[:-1], fields[:-1]
        stats["dropped_trailing_user"] += 1
    if not any(m["role"] == "assistant" for m in msgs):
        _fail(where, fields[-1] if fields else "conversations",
              "no assistant turn after a user turn")
    return [{"messages": msgs}]


def _response(value: Any, where: str, field: str) -> str:
    """A chosen/rejected response: a string, or a message list (its last assistant content)."""
    if isinstance(value, list):
        msgs, _ = _turns(value, where, field)
        replies = [m["content"] for m in msgs if m["role"] == "assistant"]
        if not replies:
            _fail(where, field, "no assistant message")
        return replies[-1]
    return _text(value, where, field)


def _to_preference(obj: dict, where: str, stats: dict) -> list[dict]:
    if "conversations" in obj:  # MedicalGPT: prompt history + chosen/rejected strings
        msgs, fields = _conversation(obj, where, need_answer=False)
        _check_order(msgs, fields, where)
        if msgs[-1]["role"] != "user":
            _fail(where, fields[-1], "the prompt history must end with a human turn")
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
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]


def _implicit_prompt(obj: dict, where: str) -> tuple[list[dict], str, str]:
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
    prompt = chosen[:n]
    if not prompt:
        _fail(where, "chosen", "implicit prompt: no shared prompt turns")
    _check_order(prompt, cf[:n], where)
    if prompt[-1]["role"] != "user":
        _fail(where, cf[n - 1], "a prompt must end with a user turn")
    return prompt, chosen[n]["content"], rejected[n]["content"]


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


def _to_prompts(obj: dict, where: str, stats: dict) -> list[dict]:
    if "question" in obj:  # MedicalGPT grpo
        prompt = _prompt_messages(obj["question"], where, "question", obj)
        return [{"prompt": prompt, "answer": _answer(obj.get("answer"), where, "answer")}]
    if "prompt" in obj:
        prompt = _prompt_messages(obj["prompt"], where, "prompt", obj)
        return [{"prompt": prompt, "answer": _answer(obj.get("answer"), where, "answer")}]
    # An sft conversation: every user turn, with the history before it, is one prompt.
    msgs, fields = _conversation(obj, where, need_answer=False)
    _check_order(msgs, fields, where)
    out = []
    for i, m in enumerate(msgs):
        if m["role"] == "user":
            answer = msgs[i + 1]["content"] if i + 1 < len(msgs) else None
            out.append({"prompt": msgs[:i + 1], "answer": answer})
    return out
