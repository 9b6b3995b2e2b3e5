#!/usr/bin/env python
"""Convert datasets between formats: alpaca <-> sharegpt <-> messages, and preference pairs
MedicalGPT <-> TRL.

    python tools/convert_data.py --input data/alpaca.json --output data/sft.jsonl --to sharegpt
    python tools/convert_data.py --input data/reward --output data/trl_pairs.jsonl --to trl

Input is read by the trainer's own reader (any accepted format, file or folder; a bad record stops
with file:line: run tools/validate_data.py to list them all). Targets:

  sft:        sharegpt  {"conversations": [{"from": "system"|"human"|"gpt"|"function_call"|"observation",
                        "value"}], "tools"?: JSON string}                              (MedicalGPT)
              messages  {"messages": [{"role", "content", "tool_calls"?}], "tools"?: [...]}  (OpenAI / TRL)
              alpaca    {"instruction", "input": "", "output", "system"?, "history"?: [[q, a], ...]}
  preference: medicalgpt  {"conversations": prompt turns (sharegpt), "chosen": str, "rejected": str,
                           "tools"?: JSON string}; a tool call is written as MedicalGPT ships it
                           ("Action: name\nAction Input: {json}")
              trl         {"prompt": [messages], "chosen": [assistant msg], "rejected": [assistant msg], "tools"?}
              trl_text    {"prompt": str, "chosen": str, "rejected": str}   (single-turn prompts only)

Tool calls (assistant tool_calls, role tool, a tools schema list) carry over between sharegpt,
messages, medicalgpt and trl; alpaca and trl_text have no place for them (an error naming the record).

Output: .jsonl (one record per line) or .json (a list), UTF-8 with the text as written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medgpt_ds.errors import UserError, main_boundary  # noqa: E402

SFT_TARGETS = ("sharegpt", "messages", "alpaca")
PREF_TARGETS = ("medicalgpt", "trl", "trl_text")
_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def _sharegpt(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"from": "observation", "value": m["content"]})
            continue
        if m["content"] or not m.get("tool_calls"):
            out.append({"from": _FROM[m["role"]], "value": m["content"]})
        out += [{"from": "function_call", "value": json.dumps(c, ensure_ascii=False)} for c in m.get("tool_calls", [])]
    return out


def _openai(messages: list[dict]) -> list[dict]:
    from medgpt_ds.data.templates import chat_messages

    return [dict(m) for m in chat_messages(messages, None, "native")[0]]


def _with_tools(out: dict, rec: dict, as_json: bool) -> dict:
    if rec.get("tools"):
        out["tools"] = json.dumps(rec["tools"], ensure_ascii=False) if as_json else \
            [{"type": "function", "function": t} for t in rec["tools"]]
    return out


def _no_tools(rec: dict, messages: list[dict], to: str, index: int) -> None:
    from medgpt_ds.data.templates import has_tool_content

    replies = [r for r in (rec.get("chosen"), rec.get("rejected")) if isinstance(r, dict)]
    if has_tool_content(messages + replies, rec.get("tools")):
        raise UserError(f"record {index}: tool calls have no {to} form (use --to sharegpt/messages for sft, "
                         "medicalgpt/trl for preference pairs)")


def _reply_text(reply) -> str:
    """A reply for MedicalGPT's preference files: text, or a call in its default text format."""
    if isinstance(reply, str):
        return reply
    from medgpt_ds.data.templates import chat_messages

    return chat_messages([reply], None, "default")[0][0]["content"]


def _alpaca(messages: list[dict]) -> dict:  # plain user/assistant turns only (see _no_tools)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns) - 1, 2)]
    out = {"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1]}
    if system is not None:
        out["system"] = system
    if len(pairs) > 1:
        out["history"] = [list(p) for p in pairs[:-1]]
    return out


def convert_record(rec: dict, to: str, index: int = 0) -> dict:
    """One canonical record (medgpt_ds.data.formats shapes) -> the ``to`` format."""
    if to == "sharegpt":
        return _with_tools({"conversations": _sharegpt(rec["messages"])}, rec, as_json=True)
    if to == "messages":
        return _with_tools({"messages": _openai(rec["messages"])}, rec, as_json=False)
    if to == "alpaca":
        _no_tools(rec, rec["messages"], to, index)
        return _alpaca(rec["messages"])
    if to == "medicalgpt":
        return _with_tools({"conversations": _sharegpt(rec["prompt"]), "chosen": _reply_text(rec["chosen"]),
                            "rejected": _reply_text(rec["rejected"])}, rec, as_json=True)
    if to == "trl":
        def reply(r):
            return _openai([r] if isinstance(r, dict) else [{"role": "assistant", "content": r}])

        return _with_tools({"prompt": _openai(rec["prompt"]), "chosen": reply(rec["chosen"]),
                            "rejected": reply(rec["rejected"])}, rec, as_json=False)
    if to == "trl_text":
        _no_tools(rec, rec["prompt"], to, index)
        if len(rec["prompt"]) != 1:
            raise UserError(f"record {index}: a {len(rec['prompt'])}-turn prompt has no plain-string TRL form "
                             "(use --to trl, the conversational form)")
        return {"prompt": rec["prompt"][0]["content"], "chosen": rec["chosen"], "rejected": rec["rejected"]}
    raise UserError(f"unknown target format {to!r}")


def write_records(records: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if path.endswith(".json"):
            json.dump(records, f, ensure_ascii=False, indent=1)
            f.write("\n")
        else:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


@main_boundary
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="files or folders in any accepted format")
    ap.add_argument("--output", required=True, help="output .jsonl or .json file")
    ap.add_argument("--to", required=True, choices=SFT_TARGETS + PREF_TARGETS)
    args = ap.parse_args(argv)
    from medgpt_ds.data.formats import RECORD_EXTS, find_files, load_records

    if not args.output.endswith((".jsonl", ".json")):
        raise UserError("--output must end in .jsonl or .json")
    kind = "sft" if args.to in SFT_TARGETS else "preference"
    files = [f for p in args.input for f in find_files(p, RECORD_EXTS, log=lambda m: print(m, file=sys.stderr))]
    if os.path.abspath(args.output) in {os.path.abspath(f) for f in files}:
        raise UserError("--output must not be one of the input files")
    records = load_records(files, kind, log=lambda m: print(m, file=sys.stderr))
    out = [convert_record(r, args.to, i) for i, r in enumerate(records, 1)]
    write_records(out, args.output)
    print(f"wrote {len(out)} {kind} records as {args.to} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
