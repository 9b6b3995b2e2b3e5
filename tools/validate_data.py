#!/usr/bin/env python
"""Check training data before a run: every bad record (file:line: field: problem), then a summary.

    python tools/validate_data.py --stage sft data/finetune
    python tools/validate_data.py --kind preference --data data/reward --tokenizer models/base --max_length 2048
    python tools/validate_data.py --stage grpo --data data/grpo --json

Reads files exactly as the trainer does (medgpt_ds.data.formats: sharegpt, messages, alpaca, text,
MedicalGPT/TRL preference pairs, question/answer prompts; .jsonl/.json/.txt/.parquet) but does not
stop at the first problem: all of them are listed. The summary counts rows, records, blank lines,
duplicates and suspicious records (chosen == rejected), with character lengths and, given a
tokenizer, token lengths through the chat template (and how many exceed --max_length).
Exit status: 0 clean, 1 errors found, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medgpt_ds.config import STAGE_DATA as STAGE_KINDS  # noqa: E402 - stage -> the kind of data it reads
from medgpt_ds.data import formats  # noqa: E402
from medgpt_ds.errors import UserError, main_boundary  # noqa: E402
from medgpt_ds.model import check_model_path  # noqa: E402

# One converter per kind: the trainer's own (formats.load_records stops at the first error; here
# each record is converted on its own so every error is reported).
CONVERTERS = {"pt": formats._to_pt, "sft": formats._to_sft, "preference": formats._to_preference,
              "prompt": formats._to_prompts}


def _pct(values: list[int], q: float) -> int:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def length_stats(values: list[int]) -> dict | None:
    if not values:
        return None
    return {"min": min(values), "mean": round(sum(values) / len(values), 1), "p50": _pct(values, 0.5),
            "p95": _pct(values, 0.95), "max": max(values)}


def _flat(messages: list[dict], tools=None) -> list[dict]:
    """Plain messages for counting: tool calls and results in MedicalGPT's default text format."""
    from medgpt_ds.data.templates import chat_messages

    return chat_messages(messages, tools, "default")[0]


def _reply_text(reply: Any) -> str:
    if isinstance(reply, str):
        return reply
    return _flat([reply])[0]["content"]


def _chars(rec: dict, kind: str) -> int:
    if kind == "pt":
        return len(rec["text"])
    if kind == "sft":
        return sum(len(m["content"]) for m in _flat(rec["messages"], rec.get("tools")))
    prompt = sum(len(m["content"]) for m in _flat(rec["prompt"], rec.get("tools")))
    if kind == "preference":
        return prompt + max(len(_reply_text(rec["chosen"])), len(_reply_text(rec["rejected"])))
    return prompt + len(rec.get("answer") or "")


def _tokens(rec: dict, kind: str, tok: Any, template: str | None, tool_format: str = "default") -> int:
    from medgpt_ds.data.templates import chat_messages, reply_message

    def render(messages, generation=False):
        messages, tools = chat_messages(messages, rec.get("tools"), tool_format)
        kwargs = {"tools": tools} if tools else {}
        return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                       add_generation_prompt=generation, **kwargs)

    def count(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    if kind == "pt":
        return count(rec["text"])
    if kind == "sft":
        return count(render(rec["messages"]))
    if kind == "preference":
        return max(count(render(rec["prompt"] + [reply_message(rec[k], rec.get("tools"), tool_format)]))
                   for k in ("chosen", "rejected"))
    return count(render(rec["prompt"], generation=True))


def validate(paths: list[str], kind: str, *, tokenizer: Any = None, template: str | None = None,
             max_length: int | None = None, tool_format: str = "default") -> dict:
    """Validate every record under ``paths``; returns the report (errors, warnings, summary).

    Files are read by the trainer's own reader (formats.iter_raw, so a line that is not UTF-8 is an
    error naming file:line like any other) and each record converted on its own, so every problem is
    listed. What the trainer changes or drops on purpose (empty or unanswered turns, chosen ==
    rejected, prompts without an answer) and files it would skip are warnings."""
    errors: list[str] = []
    warnings: list[str] = []
    files: list[str] = []
    exts = formats.DEFAULT_EXTS if kind == "pt" else formats.RECORD_EXTS
    for p in paths:
        try:
            files += formats.find_files(p, exts, log=lambda m: warnings.append(m.removeprefix("[data] ")))
        except formats.DataError as e:
            errors.append(str(e))
    convert = CONVERTERS[kind]
    totals = {"files": len(files), "rows": 0, "blank": 0, "records": 0, "bad_rows": 0, "duplicates": 0}
    chars, tokens, turns, per_file = [], [], [], {}
    seen: dict[str, str] = {}
    over = 0
    all_events = formats.Tally()
    for path in files:
        tally = formats.Tally()
        rows, before_err, before_rec = 0, len(errors), totals["records"]

        unreadable: list[str] = []  # lines (or files) the reader could not turn into an object

        def on_error(where: str, message: str) -> None:
            errors.append(message)
            unreadable.append(where)

        for where, obj in formats.iter_raw(path, kind, tally, on_error):
            rows += 1
            try:
                records = convert(obj, where, tally)
            except formats.DataError as e:
                errors.append(str(e))
                continue
            except Exception as e:  # noqa: BLE001 - a value the reader did not anticipate
                errors.append(f"{where}: unexpected {type(e).__name__}: {e}")
                continue
            for rec in records:
                totals["records"] += 1
                key = hashlib.sha1(json.dumps(rec, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
                if key in seen:
                    totals["duplicates"] += 1
                    if totals["duplicates"] <= 20:
                        warnings.append(f"{where}: duplicate of {seen[key]}")
                else:
                    seen[key] = where
                chars.append(_chars(rec, kind))
                if kind == "sft":
                    turns.append(len(rec["messages"]))
                if tokenizer is not None:
                    n = _tokens(rec, kind, tokenizer, template, tool_format)
                    tokens.append(n)
                    over += int(max_length is not None and n > max_length)
        rows += tally["blank"] + len(unreadable)  # every line or element read
        totals["rows"] += rows
        totals["blank"] += tally["blank"]
        warnings += [f"{path}: {line}" for line in tally.lines()]
        all_events.update(tally)
        per_file[path] = {"rows": rows, "records": totals["records"] - before_rec, "errors": len(errors) - before_err}
        if per_file[path]["records"] == 0 and per_file[path]["errors"] == 0:
            errors.append(f"{path}: no {kind} records")
    totals["bad_rows"] = len(errors)
    summary = {"kind": kind, **totals, "errors": len(errors), "warnings": len(warnings),
               "chars": length_stats(chars), "per_file": per_file,
               "events": {k: v for k, v in all_events.counts.items() if k != "blank"}}
    if kind == "sft":
        summary["turns"] = length_stats(turns)
    if tokenizer is not None:
        summary["tokens"] = length_stats(tokens)
        if max_length is not None:
            summary["over_max_length"] = over
            summary["max_length"] = max_length
    return {"errors": errors, "warnings": warnings, "summary": summary}


def print_report(report: dict, max_errors: int, out=None) -> None:
    out = out or sys.stdout
    errors, warnings, s = report["errors"], report["warnings"], report["summary"]
    if errors:
        print(f"ERRORS ({len(errors)}):", file=out)
        for e in errors[:max_errors]:
            print(f"  {e}", file=out)
        if len(errors) > max_errors:
            print(f"  ... and {len(errors) - max_errors} more (--max_errors)", file=out)
    if warnings:
        print(f"WARNINGS ({len(warnings)}):", file=out)
        for w in warnings[:max_errors]:
            print(f"  {w}", file=out)
    print(f"SUMMARY ({s['kind']}): {s['files']} files, {s['rows']} rows, {s['records']} valid records, "
          f"{s['errors']} errors, {s['blank']} blank lines, {s['duplicates']} duplicates", file=out)
    for name in ("chars", "tokens", "turns"):
        if s.get(name):
            st = s[name]
            print(f"  {name:6s} min {st['min']}  mean {st['mean']}  p50 {st['p50']}  p95 {st['p95']}  max {st['max']}",
                  file=out)
    if "over_max_length" in s:
        print(f"  {s['over_max_length']} records longer than --max_length {s['max_length']} tokens "
              "(they will be truncated)", file=out)
    print("OK" if not errors else "FAILED", file=out)


@main_boundary
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", help="files or folders (or pass them with --data)")
    ap.add_argument("--data", nargs="+", default=[], help="files or folders")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--kind", choices=formats.KINDS)
    group.add_argument("--stage", choices=sorted(STAGE_KINDS), help="the kind this stage reads")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder: report token lengths")
    ap.add_argument("--template_name", default=None, help="chat template (default: the tokenizer's own)")
    ap.add_argument("--tool_format", default=None, help="tool-call rendering for token counts, as in training: auto "
                                                        "(default), native, default, qwen, glm4, llama3, mistral")
    ap.add_argument("--max_length", type=int, default=None, help="count records longer than this (tokens)")
    ap.add_argument("--max_errors", type=int, default=50, help="errors/warnings printed (all are counted)")
    ap.add_argument("--json", action="store_true", help="print the full report as JSON")
    args = ap.parse_args(argv)
    paths = args.paths + args.data
    if not paths:
        ap.error("no data: pass files or folders")
    kind = args.kind or STAGE_KINDS[args.stage]
    tok = template = None
    tool_format = "default"
    if args.tokenizer:
        from transformers import AutoTokenizer

        from medgpt_ds.data.templates import get_chat_template, resolve_tool_format

        check_model_path(args.tokenizer, "--tokenizer", weights=False, tokenizer=True)
        try:
            tok = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as e:
            raise UserError(f"--tokenizer {args.tokenizer}: {str(e).splitlines()[0]}") from None
        if kind != "pt":
            template = get_chat_template(args.template_name, tok)
            tool_format = resolve_tool_format(tok, template, args.template_name, args.tool_format)
    report = validate(paths, kind, tokenizer=tok, template=template, max_length=args.max_length,
                      tool_format=tool_format)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=1))
    else:
        print_report(report, args.max_errors)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
