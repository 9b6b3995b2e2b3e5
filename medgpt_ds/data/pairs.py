"""Preference pairs for rm / dpo / orpo: tokenized items with order-independent ids, and the
collator that puts the chosen and the rejected answer of every pair into ONE forward.

Layout of a batch of B pairs: a (2B, T) batch, rows 0..B-1 = prompt + chosen, rows B..2B-1 =
prompt + rejected, right-padded, with an attention_mask. Each row is its own sequence, so chosen
and rejected never attend to each other, and every attention backend (eager, sdpa, flash-attn
with a mask) handles it. Labels are -100 on the prompt and on padding.
"""
from __future__ import annotations

import hashlib
import json

import torch

from medgpt_ds import dist, long_context
from medgpt_ds.data.formats import DataError
from medgpt_ds.data.templates import encode_preference
from medgpt_ds.logprobs import IGNORE_INDEX, token_logprobs, token_logprobs_from_hidden


def pair_id(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]) -> str:
    """Content hash of the tokenized pair: the key of cached reference log-probs. It does not
    depend on file order, shuffling, rank or epoch, and changes whenever truncation does."""
    blob = json.dumps([prompt_ids, chosen_ids, rejected_ids], separators=(",", ":")).encode()
    return hashlib.sha1(blob).hexdigest()[:20]


def encode_pair(tokenizer, chat_template: str, rec: dict, data_args, tool_format: str = "default") -> dict | None:
    """A preference record -> {"id", "prompt_ids", "chosen_ids", "rejected_ids", "truncated"},
    or None when the pair is over-long and --truncation_mode drop. Tool calls in the prompt or in
    chosen/rejected, and the record's tools, are rendered per ``tool_format``."""
    out = encode_preference(tokenizer, chat_template, rec["prompt"], rec["chosen"], rec["rejected"],
                            data_args.max_source_length, data_args.max_target_length, data_args.truncation_mode,
                            tools=rec.get("tools"), tool_format=tool_format)
    if out is not None:
        out["id"] = pair_id(out["prompt_ids"], out["chosen_ids"], out["rejected_ids"])
    return out


def load_pairs(cfg, tokenizer, stage: str) -> tuple[list[dict], list[dict]]:
    """Read, tokenize (datasets cache) and count the train / eval pairs of a preference stage."""
    from medgpt_ds.data.loading import data_key, load_train_eval, resolve_tools, tokenize_records

    d, t = cfg.data, cfg.train
    train_recs, eval_recs, files = load_train_eval(d, "preference", t.seed, output_dir=t.output_dir)
    tool_format = resolve_tools(d, tokenizer, train_recs + eval_recs)
    key = [data_key(t.stage, d, tokenizer, files, t.seed, tool_format=tool_format)]
    cache = f"{t.output_dir}/.cache/tokenized" if not cfg.model.cache_dir else f"{cfg.model.cache_dir}/tokenized"

    def encode(rec: dict):
        return encode_pair(tokenizer, tokenizer.chat_template, rec, d, tool_format)

    out = []
    for split, recs in (("train", train_recs), ("eval", eval_recs)):
        if not recs:
            out.append([])
            continue
        items, c = tokenize_records(recs, encode, cache_dir=cache, key=key + [split], num_proc=d.preprocessing_num_workers,
                                    overwrite=d.overwrite_cache, desc=f"{stage}-{split}")
        what = "truncated (prompt from the left, answers from the right)" if d.truncation_mode == "truncate" else \
            "dropped as over-long (--truncation_mode drop)"
        n = c["truncated"] if d.truncation_mode == "truncate" else c["dropped"]
        dist.print0(f"{stage} {split}: {c['kept']} of {c['records']} pairs kept, {n} {what} "
                    f"[max_source_length {d.max_source_length}, max_target_length {d.max_target_length}]")
        out.append(items)
    if not out[0]:
        raise DataError(f"no training pair left (all {len(train_recs)} dropped as over-long); "
                        "raise --max_source_length / --max_target_length or use --truncation_mode truncate")
    return out[0], out[1]


class PairCollator:
    """Pairs -> one (2B, T) batch: input_ids, attention_mask, labels; num_pairs (B), num_tokens
    (real tokens of both halves), ids (list of pair ids); and ``ref_logps`` (B, 4) = reference
    [chosen sum, rejected sum, chosen tokens, rejected tokens] when the items carry ``ref``."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        rows = [(x["prompt_ids"], x["chosen_ids"]) for x in items] + [(x["prompt_ids"], x["rejected_ids"]) for x in items]
        width = max(len(p) + len(a) for p, a in rows)
        ids, mask, labels = [], [], []
        for p, a in rows:
            pad = width - len(p) - len(a)
            ids.append(list(p) + list(a) + [self.pad_token_id] * pad)
            mask.append([1] * (len(p) + len(a)) + [0] * pad)
            labels.append([IGNORE_INDEX] * len(p) + list(a) + [IGNORE_INDEX] * pad)
        batch = {"input_ids": torch.tensor(ids, dtype=torch.long),  # (2B, T)
                 "attention_mask": torch.tensor(mask, dtype=torch.long),  # (2B, T)
                 "labels": torch.tensor(labels, dtype=torch.long),  # (2B, T)
                 "num_pairs": torch.tensor(len(items), dtype=torch.long),
                 "num_tokens": torch.tensor(sum(len(p) + len(a) for p, a in rows), dtype=torch.long),
                 "ids": [x["id"] for x in items]}
        if all("ref" in x for x in items):
            batch["ref_logps"] = torch.tensor([x["ref"] for x in items], dtype=torch.float64)  # (B, 4)
        return batch


def pair_logps(model, batch: dict, chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of the (2B, T) batch -> per-row answer log-prob sums (2B,) and answer token
    counts (2B,). ``model`` is a DeepSpeed engine or any causal LM.

    ``chunk_size`` > 0: log-probs from the final hidden states through the output head in chunks of
    tokens (logprobs.token_logprobs_from_hidden), never the (2B, T, V) logits. A sequence-parallel
    shard (``shift_labels``) sums its slice of each row, then the group's slices (differentiably)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
              "position_ids": batch.get("position_ids"), "use_cache": False}
    if chunk_size:
        hidden = long_context.final_hidden_states(model, **inputs)
        head = long_context.OutputHead(model)
        with head.gathered() as head_fn:
            logps, mask = token_logprobs_from_hidden(hidden, head_fn, batch.get("labels"), chunk_size=chunk_size,
                                                     shift_labels=batch.get("shift_labels"), frozen_head=head.frozen)
    else:
        logps, mask = token_logprobs(model(**inputs).logits, batch["labels"])  # (2B, T-1)
    sums, counts = (logps * mask).sum(-1), mask.sum(-1).to(logps.dtype)
    if "shift_labels" in batch:
        sums, counts = dist.sp_all_reduce_sum(sums), dist.sp_all_reduce_sum(counts.detach())
    return sums, counts
