"""Evaluation metrics: perplexity on text, multiple-choice accuracy (CMExam / MedQA style),
reward-model pairwise accuracy on preference pairs, generation samples; and the report writer.

Every metric splits its records across ranks with inference.shard_map (rank r takes records
r, r + world, ...); rank 0 gets every per-record result in input order and returns the summary,
other ranks return None. So the numbers do not depend on the number of ranks.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from medgpt_ds.data.templates import encode_preference
from medgpt_ds.inference import ChatModel, GenerationConfig, shard_map
from medgpt_ds.logprobs import IGNORE_INDEX
from medgpt_ds.scoring import LastTokenScore

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_INSTRUCTION = "Answer with the letter of the correct option."


# ---------------------------------------------------------------- perplexity

def _windows(ids: list[int], max_length: int) -> list[list[int]]:
    """Non-overlapping windows; a window of one token predicts nothing and is dropped."""
    return [w for w in (ids[i:i + max_length] for i in range(0, len(ids), max_length)) if len(w) > 1]


def _right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), mask (B, T) long): rows right-padded, so positions match unpadded runs."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


@torch.no_grad()
def _nll_rows(model, rows: list[list[int]], pad_id: int) -> list[tuple[float, int]]:
    """(summed next-token NLL, predicted tokens) per row; right-padded, one forward."""
    ids, mask = _right_pad(rows, pad_id, next(model.parameters()).device)  # (B, T)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)[:, 1:]  # (B, T-1)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")  # (B, T-1)
    return [(float(s), int(n)) for s, n in zip(nll.sum(1).tolist(), (labels != IGNORE_INDEX).sum(1).tolist())]


def perplexity(model, tokenizer, texts: Sequence[str], max_length: int = 1024, batch_size: int = 8) -> dict | None:
    """exp(total NLL / total predicted tokens) over `texts`, each tokenized as the tokenizer does by
    default (bos when it has one) and cut into non-overlapping windows of `max_length`."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def score(batch: list[str]) -> list[tuple[float, int]]:
        per_text = [_windows(tokenizer(t)["input_ids"], max_length) for t in batch]
        flat = [w for ws in per_text for w in ws]
        stats = [s for i in range(0, len(flat), batch_size) for s in _nll_rows(model, flat[i:i + batch_size], pad)]
        out, k = [], 0
        for ws in per_text:
            part = stats[k:k + len(ws)]
            k += len(ws)
            out.append((sum(s for s, _ in part), sum(n for _, n in part)))
        return out

    results = shard_map(score, list(texts), batch_size)
    if results is None:
        return None
    nll, tokens = sum(s for s, _ in results), sum(n for _, n in results)
    if tokens == 0:
        raise ValueError("perplexity: no text long enough to predict a token")
    return {"perplexity": math.exp(nll / tokens), "nll_per_token": nll / tokens, "tokens": tokens,
            "documents": len(results)}


# ---------------------------------------------------------------- multiple choice

def parse_mc(record: dict[str, Any], where: str) -> tuple[str, list[str], list[str], str]:
    """(question, letters, option texts, answer letters) from {"question", "options", "answer"}.
    options: {"A": text, ...} or [text, ...] (a leading "A." / "A、" / "A:" is dropped); answer:
    a letter ("B", "B.", "B、..."), several letters for multi-answer items ("AC"), or an option's text."""
    q, opts, ans = record.get("question"), record.get("options"), record.get("answer")
    if not isinstance(q, str) or not q.strip():
        raise ValueError(f"{where}: field 'question': missing or empty")
    if isinstance(opts, dict):
        letters = sorted(str(k).strip().upper() for k in opts)
        texts = [str(opts[k]).strip() for k in sorted(opts, key=lambda k: str(k).strip().upper())]
    elif isinstance(opts, list):
        letters = list(LETTERS[:len(opts)])
        texts = [re.sub(rf"^\s*{L}\s*[.、:：)]\s*", "", str(o)).strip() for L, o in zip(letters, opts)]
    else:
        raise ValueError(f"{where}: field 'options': expected a dict {{'A': text}} or a list")
    if len(letters) < 2 or any(len(L) != 1 or L not in LETTERS for L in letters):
        raise ValueError(f"{where}: field 'options': needs at least 2 options keyed by single letters, got {letters}")
    if not isinstance(ans, str) or not ans.strip():
        raise ValueError(f"{where}: field 'answer': missing or empty")
    a = ans.strip()
    if a in texts:
        return q.strip(), letters, texts, letters[texts.index(a)]
    m = re.match(r"^([A-Z]+)(?:$|[\s.、:：)，,])", a.upper())
    if not m or not set(m.group(1)) <= set(letters):
        raise ValueError(f"{where}: field 'answer': {ans!r} is neither option letters ({''.join(letters)}) "
                         "nor an option's text")
    return q.strip(), letters, texts, "".join(sorted(set(m.group(1))))


def mc_messages(question: str, letters: list[str], texts: list[str], instruction: str = MC_INSTRUCTION,
                system: str | None = None) -> list[dict[str, str]]:
    body = question + "\n" + "\n".join(f"{L}. {t}" for L, t in zip(letters, texts))
    if instruction:
        body += "\n" + instruction
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": body}]


def letter_token_ids(tokenizer, letters: Sequence[str]) -> list[int]:
    """The first token of each bare letter: what the model emits first when it answers "B"."""
    ids = [tokenizer(L, add_special_tokens=False)["input_ids"][0] for L in letters]
    if len(set(ids)) != len(ids):
        raise ValueError(f"letters {list(letters)} do not map to distinct first tokens")
    return ids


@torch.no_grad()
def _last_logits(model, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Next-token logits after each row (right padding, so positions match unpadded runs). (B, V)"""
    dev = next(model.parameters()).device
    ids, mask = _right_pad(rows, pad_id, dev)  # (B, T)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
    last = torch.tensor([len(r) - 1 for r in rows], device=dev)
    return logits[torch.arange(len(rows), device=dev), last].float()


def multiple_choice(chat: ChatModel, records: Sequence[dict[str, Any]], batch_size: int = 8,
                    instruction: str = MC_INSTRUCTION, system: str | None = None,
                    source: str = "records") -> dict | None:
    """Accuracy of the option letter the model ranks highest as the first answer token, over the
    chat-template prompt of each question. Items with several correct letters cannot be answered
    by one letter: they are counted in `skipped_multi_answer` and left out of the accuracy."""
    items = [parse_mc(r, f"{source}:{i + 1}") for i, r in enumerate(records)]
    pad = chat.tokenizer.pad_token_id

    def score(batch):
        prompts = [chat.encode(mc_messages(q, L, t, instruction, system)) for q, L, t, _ in batch]
        logits = _last_logits(chat.model, prompts, pad)
        out = []
        for row, (_, letters, _, _) in zip(logits, batch):
            ids = letter_token_ids(chat.tokenizer, letters)
            out.append(letters[int(torch.argmax(row[ids]))])
        return out

    single = [it for it in items if len(it[3]) == 1]
    preds = shard_map(score, single, batch_size)
    if preds is None:
        return None
    answers = [it[3] for it in single]
    correct = sum(p == a for p, a in zip(preds, answers))
    return {"accuracy": correct / len(single) if single else float("nan"), "correct": correct,
            "total": len(single), "skipped_multi_answer": len(items) - len(single),
            "answer_counts": dict(sorted(Counter(answers).items())),
            "prediction_counts": dict(sorted(Counter(preds).items())),
            "predictions": [{"answer": a, "prediction": p} for a, p in zip(answers, preds)]}


# ---------------------------------------------------------------- reward model

@torch.no_grad()
def _rewards(model, rows: list[list[int]], pad_id: int) -> list[float]:
    """Scalar reward of each row, read where transformers' sequence classifiers (and so reward-model
    training and the RL stages) read it: the last token that is not the config's pad id
    (scoring.LastTokenScore), so right padding added here never moves the read position."""
    dev = next(model.parameters()).device
    if getattr(model, "score", None) is None:  # other heads: one unpadded row at a time
        return [float(model(input_ids=torch.tensor([r], device=dev)).logits[0, 0]) for r in rows]
    ids, mask = _right_pad(rows, pad_id, dev)  # (B, T)
    return LastTokenScore(model)(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)).tolist()


def reward_pairwise(model, tokenizer, chat_template: str, records: Sequence[dict[str, Any]], batch_size: int = 8,
                    max_length: int = 1024) -> dict | None:
    """Share of preference pairs whose chosen reply gets the higher reward (ties count as wrong).
    Pairs are tokenized as reward-model training does (templates.encode_preference: prompt + reply
    with its end-of-turn marker; the prompt cut from the left to fit `max_length`) and scored at the
    same token (see _rewards)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    half = max_length // 2

    def score(batch):
        rows = []
        for r in batch:
            enc = encode_preference(tokenizer, chat_template, r["prompt"], r["chosen"], r["rejected"],
                                    max_source_length=max(max_length - half, 1), max_target_length=half)
            rows += [enc["prompt_ids"] + enc["chosen_ids"], enc["prompt_ids"] + enc["rejected_ids"]]
        rewards = _rewards(model, rows, pad)
        return list(zip(rewards[0::2], rewards[1::2]))

    pairs = shard_map(score, list(records), batch_size)
    if pairs is None:
        return None
    wins = sum(c > r for c, r in pairs)
    n = len(pairs)
    return {"accuracy": wins / n, "correct": wins, "total": n, "ties": sum(c == r for c, r in pairs),
            "mean_chosen_reward": sum(c for c, _ in pairs) / n, "mean_rejected_reward": sum(r for _, r in pairs) / n,
            "mean_margin": sum(c - r for c, r in pairs) / n}


# ---------------------------------------------------------------- generation samples

def generation_samples(chat: ChatModel, records: Sequence[dict[str, Any]], cfg: GenerationConfig,
                       batch_size: int = 8) -> list[dict] | None:
    """Answers to canonical prompt records ({"prompt": messages, "answer": reference or None})."""
    done = shard_map(lambda b: chat.generate([r["prompt"] for r in b], cfg), list(records), batch_size)
    if done is None:
        return None
    return [{"prompt": r["prompt"][-1]["content"], "reference": r.get("answer"), "response": c.text,
             "finish_reason": c.finish_reason} for r, c in zip(records, done)]


# ---------------------------------------------------------------- report

def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _short(s: str | None, n: int = 200) -> str:
    s = (s or "").replace("\n", " ").replace("|", "\\|")
    return s if len(s) <= n else s[:n] + "..."


def write_report(report: dict[str, Any], output_dir: str) -> dict[str, str]:
    """report.json (everything), report.md (tables people read), report.png (bars; needs matplotlib).
    Returns the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"json": os.path.join(output_dir, "report.json"), "markdown": os.path.join(output_dir, "report.md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=2)
    lines = [f"# Evaluation: {report.get('model', '')}", ""]
    rows = [(task, e["file"], metric, e[metric], e.get("total", e.get("documents", "")))
            for task, metric in (("perplexity", "perplexity"), ("multiple_choice", "accuracy"),
                                 ("reward_pairwise", "accuracy"))
            for e in report.get(task, [])]
    if rows:
        lines += ["| task | file | metric | value | n |", "| --- | --- | --- | ---: | ---: |"]
        lines += [f"| {t} | {os.path.basename(f)} | {m} | {_fmt(v)} | {n} |" for t, f, m, v, n in rows]
        lines.append("")
    for e in report.get("multiple_choice", []):
        lines.append(f"- {os.path.basename(e['file'])}: predicted letters {e['prediction_counts']}, "
                     f"answers {e['answer_counts']}"
                     + (f", {e['skipped_multi_answer']} multi-answer items skipped" if e["skipped_multi_answer"] else ""))
    samples = report.get("samples", [])
    if samples:
        lines += ["", "## Generation samples", "", "| prompt | response | reference |", "| --- | --- | --- |"]
        lines += [f"| {_short(s['prompt'])} | {_short(s['response'])} | {_short(s['reference'])} |" for s in samples]
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    png = _plot(rows, os.path.join(output_dir, "report.png"))
    if png:
        paths["png"] = png
    return paths


def _plot(rows: list[tuple], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    acc = [(f"{t}\n{os.path.basename(f)}", v) for t, f, m, v, _ in rows if m == "accuracy"]
    ppl = [(os.path.basename(f), v) for t, f, m, v, _ in rows if m == "perplexity"]
    panels = [p for p in ((acc, "accuracy", (0, 1), "%.3f"), (ppl, "perplexity", None, "%.4g")) if p[0]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (data, label, ylim, fmt) in zip(axes[0], panels):
        bars = ax.bar([d[0] for d in data], [d[1] for d in data], color="#4c72b0")
        ax.bar_label(bars, fmt=fmt)
        ax.set_ylabel(label)
        if ylim:
            ax.set_ylim(*ylim)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
