#!/usr/bin/env python
"""Convert datasets between formats: alpaca <-> sharegpt <-> messages, and preference pairs
MedicalGPT <-> TRL.

    python tools/convert_data.py --input data/alpaca.json --output data/sft.jsonl --to sharegpt
    python tools/convert_data.py --input data/reward --output data/trl_pairs.jsonl --to trl

Input is read by the trainer's own reader (any accepted format, file or folder; a bad record stops
with file:line: run tools/validate_data.py to list them all). Targets:

  sft:        sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value"}]}  (MedicalGPT)
              messages  {"messages": [{"role", "content"}]}                            (OpenAI / TRL)
              alpaca    {"instruction", "input": "", "output", "system"?, "history"?: [[q, a], ...]}
  preference: medicalgpt  {"conversations": prompt turns (sharegpt), "chosen": str, "rejected": str}
              trl         {"prompt": [messages], "chosen": [assistant msg], "rejected": [assistant msg]}
              trl_text    {"prompt": str, "chosen": str, "rejected": str}   (single-turn prompts only)

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
    return [{"from": _FROM[m["role"]], "value": m["content"]} for m in messages]


def _alpaca(messages: list[dict]) -> dict:
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
        return {"conversations": _sharegpt(rec["messages"])}
    if to == "messages":
        return {"messages": [dict(m) for m in rec["messages"]]}
    if to == "alpaca":
        return _alpaca(rec["messages"])
    if to == "medicalgpt":
        return {"conversations": _sharegpt(rec["prompt"]), "chosen": rec["chosen"], "rejected": rec["rejected"]}
    if to == "trl":
        return {"prompt": [dict(m) for m in rec["prompt"]],
                "chosen": [{"role": "assistant", "content": rec["chosen"]}],
                "rejected": [{"role": "assistant", "content": rec["rejected"]}]}
    if to == "trl_text":
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
    from medgpt_ds.data.formats import find_files, load_records

    if not args.output.endswith((".jsonl", ".json")):
        raise UserError("--output must end in .jsonl or .json")
    kind = "sft" if args.to in SFT_TARGETS else "preference"
    files = [f for p in args.input for f in find_files(p)]
    if os.path.abspath(args.output) in {os.path.abspath(f) for f in files}:
        raise UserError("--output must not be one of the input files")
    records = load_records(files, kind, log=lambda m: print(m, file=sys.stderr))
    out = [convert_record(r, args.to, i) for i, r in enumerate(records, 1)]
    write_records(out, args.output)
    print(f"wrote {len(out)} {kind} records as {args.to} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
