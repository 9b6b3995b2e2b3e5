"""Train/eval record loading and cached tokenization through the ``datasets`` library.

The tokenized-data cache is keyed by everything that changes the tokenized result (data_key): the
bytes of every input file (hashed, streaming, on rank 0), the tokenizer's content (not its path),
the chat template and tool rendering, every data flag (lengths, truncation, packing, split, max
samples, system prompt), the seed when it picks the evaluation split, the source of the data code
and the stage, and the tokenizers/transformers versions. Editing one record, even in place within
the same second, or changing --seed gives a new key; a stale entry can never be hit, so
--overwrite_output_dir (which keeps output_dir/.cache) cannot bring old data back.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import random
import re
import time
from typing import Callable, Optional

from medgpt_ds import dist
from medgpt_ds.data.formats import (
    DEFAULT_EXTS,
    RECORD_EXTS,
    SYSTEM_PROMPT_PRESETS,
    DataError,
    Tally,
    find_files,
    load_records,
)

# Data flags that do not change what a record tokenizes to (kept out of the cache key).
_NOT_IN_KEY = ("train_file_dir", "validation_file_dir", "preprocessing_num_workers", "overwrite_cache",
               "dataloader_num_workers", "skip_bad_records")
_DATA_DIR = os.path.dirname(os.path.abspath(__file__))


def system_prompt_text(value: Optional[str]) -> Optional[str]:
    """--system_prompt: a preset name (SYSTEM_PROMPT_PRESETS) or the text itself; None/"" = none."""
    if not value:
        return None
    return SYSTEM_PROMPT_PRESETS.get(value, value)


def load_train_eval(data_args, kind: str, seed: int,
                    output_dir: Optional[str] = None) -> tuple[list[dict], list[dict], list[str]]:
    """Records for training and evaluation (validation dir, or a held-out split of train) and every
    input file read (train, then validation), for data_key.

    Bad records stop the run (DataError naming file:line:field) unless --skip_bad_records, which
    drops them, counts them and writes each one to ``output_dir``/rejected_records.jsonl. The
    --system_prompt is put in front of every record without a system turn of its own.
    """
    if not data_args.train_file_dir:
        raise DataError("--train_file_dir is required")
    exts = DEFAULT_EXTS if kind == "pt" else RECORD_EXTS
    skip = bool(getattr(data_args, "skip_bad_records", False))
    rejected: list[dict] = []
    tally = Tally()
    files = find_files(data_args.train_file_dir, exts, log=dist.print0)
    train = load_records(files, kind, max_samples=data_args.max_train_samples, log=dist.print0, skip_bad=skip,
                         rejected=rejected, tally=tally)
    evals: list[dict] = []
    all_files = list(files)
    if data_args.validation_file_dir:
        eval_files = find_files(data_args.validation_file_dir, exts, log=dist.print0)
        evals = load_records(eval_files, kind, max_samples=data_args.max_eval_samples, log=dist.print0,
                             skip_bad=skip, rejected=rejected, tally=tally)
        all_files += eval_files
    elif data_args.validation_split_percentage > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, len(train) * data_args.validation_split_percentage // 100)
        held = set(order[:n_eval])
        evals = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
        if data_args.max_eval_samples:
            evals = evals[:data_args.max_eval_samples]
        dist.print0(f"data: held out {len(evals)} of {len(train) + len(evals)} records for evaluation "
                    f"(validation_split_percentage={data_args.validation_split_percentage}, seed {seed})")
    _write_rejected(rejected, output_dir)
    _apply_system_prompt(train + evals, kind, system_prompt_text(getattr(data_args, "system_prompt", None)))
    return train, evals, all_files


def _write_rejected(rejected: list[dict], output_dir: Optional[str]) -> None:
    """output_dir/rejected_records.jsonl: one {"where", "error"} per dropped record (a stale file from
    an earlier run is removed, so the file always describes this run)."""
    if not dist.is_main():
        return
    path = os.path.join(output_dir, "rejected_records.jsonl") if output_dir else None
    if path and os.path.exists(path):
        os.remove(path)
    if not rejected:
        return
    if path:
        os.makedirs(output_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for r in rejected:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        dist.print0(f"data: {len(rejected)} bad records skipped (--skip_bad_records), each listed in {path}")
    else:
        shown = "; ".join(r["error"] for r in rejected[:20])
        dist.print0(f"data: {len(rejected)} bad records skipped (--skip_bad_records): {shown}"
                    + (" ..." if len(rejected) > 20 else ""))


def _apply_system_prompt(records: list[dict], kind: str, text: Optional[str]) -> None:
    if not text:
        return
    if kind == "pt":
        dist.print0("data: --system_prompt has no meaning for pt (plain text); ignored")
        return
    field = "messages" if kind == "sft" else "prompt"
    added = 0
    for rec in records:
        msgs = rec[field]
        if msgs[0]["role"] != "system":
            rec[field] = [{"role": "system", "content": text}] + msgs
            added += 1
    dist.print0(f"data: --system_prompt put before {added} records ({len(records) - added} kept their own system "
                "turn)")


def check_answers(items: list[dict], reason: str) -> int:
    """The number of prompt records/items without an 'answer'. Raises DataError when every one lacks
    it, since ``reason`` (e.g. "--reward_funcs answer_normalized") needs a reference answer."""
    missing = sum(1 for x in items if x.get("answer") is None)
    if items and missing == len(items):
        raise DataError(f"none of the {len(items)} prompt records has an 'answer', but {reason} scores completions "
                        "against it (every reward would be 0); add 'answer' to the data or drop that reward")
    return missing


# ---------------------------------------------------------------- the tokenized-data cache

def hash_files(files: list[str]) -> list[list]:
    """[[file name, size, blake2b of the bytes], ...] in reading order, streamed in 1 MiB blocks on
    rank 0 (the cost is logged) and shared with the other ranks."""
    digests = None
    if dist.is_main():
        start, total, digests = time.perf_counter(), 0, []
        for path in files:
            with open(path, "rb") as f:
                h = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=20))
            size = os.path.getsize(path)
            total += size
            digests.append([os.path.basename(path), size, h.hexdigest()])
        secs = time.perf_counter() - start
        dist.print0(f"tokenized cache: hashed {len(files)} input files ({total / 2**20:.1f} MiB) in {secs:.2f} s")
    if dist.world_size() > 1:
        digests = dist.broadcast_object(digests)
    return digests


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what the tokenizer does, not where it lives: its full serialization (vocabulary, merges,
    normalizer, pre-tokenizer, post-processor, added tokens), special tokens and class."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        sp = getattr(tokenizer, "sp_model", None)
        h.update(sp.serialized_model_proto() if sp is not None else
                 json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.special_tokens_map, getattr(tokenizer, "add_bos_token", None),
                         getattr(tokenizer, "add_eos_token", None), tokenizer.padding_side],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def code_version(stage: str) -> str:
    """Hash of the code that turns files into tokens: medgpt_ds/data/*.py and the stage module."""
    h = hashlib.sha256()
    paths = sorted(glob.glob(os.path.join(_DATA_DIR, "*.py")))
    paths.append(os.path.join(os.path.dirname(_DATA_DIR), "stages", f"{stage}.py"))
    for path in paths:
        if os.path.exists(path):
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def data_key(stage: str, data_args, tokenizer, files: list[str], seed: int, **extra) -> dict:
    """The cache key of a stage's tokenized data (see the module docstring). ``extra`` holds what
    the stage adds (e.g. the resolved tool format)."""
    import jinja2
    import tokenizers
    import transformers

    flags = dataclasses.asdict(data_args) if dataclasses.is_dataclass(data_args) else dict(vars(data_args))
    for name in _NOT_IN_KEY:
        flags.pop(name, None)
    split = None
    if not data_args.validation_file_dir and data_args.validation_split_percentage > 0:
        split = {"seed": seed, "percentage": data_args.validation_split_percentage}
    return {"stage": stage, "files": hash_files(files), "tokenizer": tokenizer_fingerprint(tokenizer),
            "chat_template": getattr(tokenizer, "chat_template", None), "data": flags, "split": split,
            "code": code_version(stage), "versions": [tokenizers.__version__, transformers.__version__,
                                                      jinja2.__version__], **extra}


def _fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


# Entries kept per kind of tokenized data (desc) in a cache folder: the newest by use; older ones are
# deleted (and the count and size logged) so that a long series of runs cannot fill the disk.
CACHE_KEEP = 4


def prune_cache(cache_dir: str, desc: str, keep: int = CACHE_KEEP) -> tuple[int, int]:
    """Delete all but the ``keep`` most recently used entries of ``desc`` in ``cache_dir``
    (an entry: ``{desc}-{key}.arrow`` or its ``_i_of_n`` shards). Returns (entries, bytes) removed."""
    pat = re.compile(rf"^{re.escape(desc)}-([0-9a-f]{{24}})(_\d+_of_\d+)?\.arrow$")
    entries: dict[str, list[str]] = {}
    for name in os.listdir(cache_dir):
        m = pat.match(name)
        if m:
            entries.setdefault(m.group(1), []).append(os.path.join(cache_dir, name))
    newest = sorted(entries, key=lambda k: max(os.path.getmtime(f) for f in entries[k]), reverse=True)
    removed, size = 0, 0
    for k in newest[keep:]:
        for f in entries[k]:
            size += os.path.getsize(f)
            os.remove(f)
        removed += 1
    return removed, size


def tokenize_records(records: list[dict], fn: Callable[[dict], Optional[dict]], *, cache_dir: Optional[str],
                     key, num_proc: Optional[int] = None, overwrite: bool = False,
                     desc: str = "tokenize") -> tuple[list[dict], dict]:
    """Map ``fn`` over records with the datasets cache (rank 0 builds it first, other ranks reuse
    it). ``key`` must cover everything ``fn``'s output depends on (data_key + the split's name).
    ``fn`` returns a dict of token lists, or None to drop the record. Returns the kept items and
    counts {records, kept, dropped, truncated}. Logs `tokenized cache: hit|miss (key ...)`."""
    import datasets

    datasets.disable_progress_bars()
    fp = _fingerprint(key, len(records))
    cache_file = None
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        cache_file = os.path.join(cache_dir, f"{desc}-{fp}.arrow")
        stem = cache_file[:-len(".arrow")]
        hit = not overwrite and (os.path.exists(cache_file) or bool(glob.glob(f"{stem}_*_of_*.arrow")))
        state = "hit" if hit else ("miss, rebuilt (--overwrite_cache)" if overwrite else "miss")
        dist.print0(f"tokenized cache: {state} (key {fp}) {desc}: {cache_file}")
    else:
        dist.print0(f"tokenized cache: off (key {fp}) {desc}")

    def wrapped(rec: dict) -> dict:
        out = fn(rec)
        if out is None:
            return {"_keep": False, "_truncated": False, "_data": ""}
        truncated = bool(out.pop("truncated", False))
        return {"_keep": True, "_truncated": truncated, "_data": json.dumps(out)}

    def build():
        ds = datasets.Dataset.from_list([{"_rec": json.dumps(r, ensure_ascii=False)} for r in records])
        return ds.map(lambda ex: wrapped(json.loads(ex["_rec"])), remove_columns=["_rec"],
                      num_proc=num_proc if num_proc and num_proc > 1 else None,
                      cache_file_name=cache_file, load_from_cache_file=not overwrite,
                      new_fingerprint=fp, desc=desc)

    if dist.is_main():
        ds = build()
        if cache_file:
            for f in [cache_file] + glob.glob(f"{stem}_*_of_*.arrow"):
                if os.path.exists(f):
                    os.utime(f)  # most recently used: kept by the pruning below
            removed, size = prune_cache(cache_dir, desc)
            if removed:
                dist.print0(f"tokenized cache: removed {removed} older {desc} entries ({size / 2**20:.1f} MiB), "
                            f"keeping the {CACHE_KEEP} most recently used")
    dist.barrier()
    if not dist.is_main():
        ds = build()  # loads rank 0's cache file when there is one
    keep = ds["_keep"]
    truncated = sum(1 for k, t in zip(keep, ds["_truncated"]) if k and t)
    items = [json.loads(d) for k, d in zip(keep, ds["_data"]) if k]
    counts = {"records": len(records), "kept": len(items), "dropped": len(records) - len(items), "truncated": truncated}
    return items, counts


def resolve_tools(data_args, tokenizer, records: Optional[list[dict]] = None) -> str:
    """The tool rendering of this run (templates.resolve_tool_format), said in one log line when
    ``records`` (default: assume so) hold tool calls or tool schemas."""
    from medgpt_ds.data.templates import has_tool_content, resolve_tool_format
    from medgpt_ds.errors import UserError

    try:
        fmt = resolve_tool_format(tokenizer, tokenizer.chat_template, data_args.template_name, data_args.tool_format)
    except ValueError as e:
        raise UserError(str(e)) from None
    n = len(records) if records is None else sum(
        1 for r in records if has_tool_content(r.get("messages", r.get("prompt", [])), r.get("tools"))
        or isinstance(r.get("chosen"), dict) or isinstance(r.get("rejected"), dict))
    if records is not None and n == 0:
        return fmt
    what = f"{n} records with tool calls or tools: " if records is not None else "tools: "
    if fmt == "native":
        dist.print0(f"{what}rendered by the chat template itself (tools=, assistant tool_calls, role tool)")
    else:
        dist.print0(f"{what}MedicalGPT's '{fmt}' tool format (tool list in the system prompt, calls as assistant "
                    "text, results as user text)")
    return fmt
