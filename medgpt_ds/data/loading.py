"""Train/eval record loading and cached tokenization through the ``datasets`` library."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional

from medgpt_ds import dist
from medgpt_ds.data.formats import find_files, load_records


def load_train_eval(data_args, kind: str, seed: int) -> tuple[list[dict], list[dict], list[str]]:
    """Records for training and evaluation (validation dir, or a held-out split of train)."""
    if not data_args.train_file_dir:
        raise SystemExit("error: --train_file_dir is required")
    files = find_files(data_args.train_file_dir)
    train = load_records(files, kind, max_samples=data_args.max_train_samples, log=dist.print0)
    evals: list[dict] = []
    if data_args.validation_file_dir:
        evals = load_records(find_files(data_args.validation_file_dir), kind,
                             max_samples=data_args.max_eval_samples, log=dist.print0)
    elif data_args.validation_split_percentage > 0:
        import random

        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, len(train) * data_args.validation_split_percentage // 100)
        held = set(order[:n_eval])
        evals = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
        if data_args.max_eval_samples:
            evals = evals[:data_args.max_eval_samples]
        dist.print0(f"data: held out {len(evals)} of {len(train) + len(evals)} records for evaluation "
                    f"(validation_split_percentage={data_args.validation_split_percentage})")
    return train, evals, files


def _fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def tokenize_records(records: list[dict], fn: Callable[[dict], Optional[dict]], *, cache_dir: Optional[str],
                     key: list, num_proc: Optional[int] = None, overwrite: bool = False,
                     desc: str = "tokenize") -> tuple[list[dict], dict]:
    """Map ``fn`` over records with the datasets cache (rank 0 builds it first, other ranks reuse
    it). ``fn`` returns a dict of token lists, or None to drop the record. Returns the kept items
    and counts {kept, dropped, truncated}."""
    import datasets

    datasets.disable_progress_bars()
    fp = _fingerprint(key, len(records), records[:3], records[-3:])
    cache_file = None
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        cache_file = os.path.join(cache_dir, f"{desc}-{fp}.arrow")

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
    dist.barrier()
    if not dist.is_main():
        ds = build()  # loads rank 0's cache file when there is one
    keep = ds["_keep"]
    truncated = sum(1 for k, t in zip(keep, ds["_truncated"]) if k and t)
    items = [json.loads(d) for k, d in zip(keep, ds["_data"]) if k]
    counts = {"records": len(records), "kept": len(items), "dropped": len(records) - len(items), "truncated": truncated}
    return items, counts
