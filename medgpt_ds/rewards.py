"""Rule-based rewards for GRPO: output format and answer match, plus loading user reward functions.

A reward function takes ``(completions: list[str], answers: list[str | None])`` and returns one float
per completion. Completions may also be chat messages (``[{"role": "assistant", "content": ...}]``);
the content of the last message is scored.
"""

from __future__ import annotations

import functools
import importlib
import re
import unicodedata
from collections.abc import Callable, Sequence

RewardFn = Callable[[list, list], list[float]]
RULE_REWARDS = ("format", "answer_exact", "answer_normalized", "answer_choice")  # the --reward_funcs names

_FORMAT_RE = re.compile(r"^\s*<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>\s*$", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _text(completion) -> str:
    """The completion's text: a string, or the content of the last chat message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return completion.get("content") or ""
    if isinstance(completion, Sequence) and completion:
        return _text(completion[-1])
    return ""


def extract_answer(text: str) -> str:
    """Content of the last ``<answer>...</answer>`` block, else the whole text, stripped."""
    found = _ANSWER_RE.findall(text)
    return (found[-1] if found else text).strip()


def normalize_text(text: str) -> str:
    """NFKC (full-width -> half-width), casefold, drop whitespace and punctuation (ASCII and CJK)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if not ch.isspace() and not unicodedata.category(ch).startswith("P"))


_CHOICE_PATTERNS = [
    # "答案是B", "答案：(C)", "正确答案为 D", "选B", "选择 A"
    re.compile(r"(?:答案|选项|选择|应选|选)\s*(?:是|为|应为|应该是)?\s*[:：]?\s*[(（\[【]?\s*([A-E])(?![A-Za-z])"),
    # "the answer is (B)", "Answer: C", "option D"
    re.compile(r"(?i:answer|option|choice)\s*(?i:is|:)?\s*[(\[]?\s*([A-E])(?![A-Za-z])"),
    # "(B)", "（B）", "[b]"
    re.compile(r"[(（\[【]\s*([A-Ea-e])\s*[)）\]】]"),
    # a standalone capital letter: "B", "B.", "B、阿司匹林"
    re.compile(r"(?<![A-Za-z])([A-E])(?![A-Za-z])"),
]


def extract_choice(text: str) -> str | None:
    """The multiple-choice letter (A-E) in ``text`` (the ``<answer>`` block if any), or None.

    Tries, in order: the text being just one letter; "答案是B" / "answer is B" phrases; a bracketed letter;
    the first standalone capital A-E. Full-width letters count (NFKC).
    """
    text = unicodedata.normalize("NFKC", extract_answer(text))
    bare = normalize_text(text)
    if len(bare) == 1 and bare in "abcde":
        return bare.upper()
    for pattern in _CHOICE_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1).upper()
    return None


def format_reward(completions: list) -> list[float]:
    """1.0 when a completion is exactly ``<think>...</think><answer>...</answer>`` (whitespace allowed
    around and between the blocks, no nested tags), else 0.0 (DeepSeek-R1 format reward)."""
    return [1.0 if _FORMAT_RE.match(_text(c)) else 0.0 for c in completions]


def answer_match_reward(completions: list, answers: list[str | None], mode: str = "exact") -> list[float]:
    """1.0 when the completion's answer (its last ``<answer>`` block, else the whole text) matches the reference.

    Modes: ``exact`` (stripped strings equal); ``normalized`` (equal after :func:`normalize_text`:
    NFKC full-width -> half-width, casefold, no whitespace or punctuation); ``choice`` (same A-E letter,
    see :func:`extract_choice`; the reference may be "B" or "B. 阿司匹林"). A None reference scores 0.0.
    """
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    if mode not in ("exact", "normalized", "choice"):
        raise ValueError(f"unknown answer match mode {mode!r}; expected 'exact', 'normalized' or 'choice'")
    rewards = []
    for completion, answer in zip(completions, answers, strict=True):
        if answer is None:
            rewards.append(0.0)
            continue
        got = extract_answer(_text(completion))
        if mode == "exact":
            ok = got == extract_answer(str(answer))
        elif mode == "normalized":
            ok = normalize_text(got) == normalize_text(extract_answer(str(answer))) != ""
        else:
            letter = extract_choice(got)
            ok = letter is not None and letter == extract_choice(str(answer))
        rewards.append(1.0 if ok else 0.0)
    return rewards


def load_reward_function(spec: str) -> RewardFn:
    """Import ``"package.module:function"`` and return the callable; ValueError (TypeError if not callable) with the reason."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {spec!r} must look like 'module.path:function_name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"reward function {spec!r}: {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise TypeError(f"reward function {spec!r} is not callable (got {type(fn).__name__})")
    return fn


def combine_rewards(
    fns_with_weights: Sequence[tuple[RewardFn, float]], completions: list, answers: list[str | None]
) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted sum of reward functions.

    Returns ``(total, per_function)``: ``total[i] = sum_k w_k * f_k(completions, answers)[i]`` and the
    unweighted scores keyed by function name (``__name__``; duplicates get ``_2``, ``_3``...).
    Raises ValueError when a function returns the wrong number of scores.
    """
    total = [0.0] * len(completions)
    per_fn: dict[str, list[float]] = {}
    for fn, weight in fns_with_weights:
        # functools.partial (e.g. answer_match_reward with a mode) has no __name__: use the wrapped one
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", type(fn).__name__)
        key, k = name, 1
        while key in per_fn:
            k += 1
            key = f"{name}_{k}"
        scores = [float(s) for s in fn(completions, answers)]
        if len(scores) != len(completions):
            raise ValueError(f"reward function {name!r} returned {len(scores)} scores for {len(completions)} completions")
        per_fn[key] = scores
        total = [t + weight * s for t, s in zip(total, scores, strict=True)]
    return total, per_fn


def rule_reward_functions(names: list[str], weights: list[float]) -> list[tuple[RewardFn, float]]:
    """[(fn(completions, answers) -> floats, weight)] for --reward_funcs / --reward_weights: the
    RULE_REWARDS by name, anything else imported as ``module.path:function``; the functions carry the
    given names (metrics are logged per name)."""
    out = []
    for name, weight in zip(names, weights, strict=True):
        if name == "format":
            fn = _named(lambda completions, answers: format_reward(completions), name)
        elif name.startswith("answer_"):
            fn = _named(functools.partial(answer_match_reward, mode=name.split("_", 1)[1]), name)
        else:
            fn = load_reward_function(name)
        out.append((fn, weight))
    return out


def _named(fn, name: str) -> RewardFn:
    def wrapped(completions, answers):
        return fn(completions, answers)

    wrapped.__name__ = name
    return wrapped
