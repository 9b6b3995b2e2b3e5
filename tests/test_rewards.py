"""Rule rewards for GRPO: format, answer match (exact / normalized / choice), loading and combining."""

import functools
import json
from pathlib import Path

import pytest

from medgpt_ds.rewards import (
    answer_match_reward,
    combine_rewards,
    extract_answer,
    extract_choice,
    format_reward,
    load_reward_function,
    normalize_text,
)

pytestmark = pytest.mark.unit

DATA = Path(__file__).parents[1].parent / "shared/data/medicalgpt"


def test_format_reward():
    completions = [
        "<think>先想一想：发热伴咳嗽。</think><answer>肺炎</answer>",  # 1
        "<think>\nreasoning\n</think>\n<answer>\n42\n</answer>\n",  # 1: whitespace allowed
        "<answer>肺炎</answer>",  # 0: no think
        "<think>a</think> text in between <answer>b</answer>",  # 0
        "<think>a</think><answer>b</answer> trailing words",  # 0
        "<think>a<think>b</think><answer>c</answer>",  # 0: nested think
        "<answer>b</answer><think>a</think>",  # 0: wrong order
        "",  # 0
        [{"role": "assistant", "content": "<think>x</think><answer>y</answer>"}],  # 1: chat message form
    ]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_extract_answer_takes_last_block_or_whole_text():
    assert extract_answer("<answer> 1 </answer> then <answer>2</answer>") == "2"
    assert extract_answer("  就是 3  ") == "就是 3"


def test_answer_match_exact():
    completions = ["<think>7×8</think><answer>56</answer>", "<answer> 56 </answer>", "56。", "<answer>57</answer>"]
    assert answer_match_reward(completions, ["56"] * 4, mode="exact") == [1.0, 1.0, 0.0, 0.0]


def test_normalize_text_full_width_case_punctuation():
    assert normalize_text("Ａｓｐｉｒｉｎ， １００ｍｇ。") == "aspirin100mg"
    assert normalize_text(" 阿司匹林！ ") == "阿司匹林"
    assert normalize_text("第3肋间隙，距前正中线4寸。") == "第3肋间隙距前正中线4寸"


def test_answer_match_normalized():
    completions = [
        "<answer>第３肋间隙，距前正中线４寸</answer>",  # full-width digits, no final full stop
        "<answer>ASPIRIN.</answer>",
        "<answer>食管 克罗恩病！</answer>",
        "<answer>克罗恩病</answer>",  # different answer
        "<answer>  。</answer>",  # empty after normalisation never matches
        "<answer>x</answer>",
    ]
    answers = ["第3肋间隙，距前正中线4寸。", "aspirin", "食管克罗恩病", "食管克罗恩病", "。", None]
    assert answer_match_reward(completions, answers, mode="normalized") == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("b", "B"),
        ("（Ｃ）", "C"),  # full-width brackets and letter
        ("<think>A 不对, 因为...</think><answer>D</answer>", "D"),  # the answer block wins
        ("答案是B", "B"),
        ("正确答案为：(E) 阿司匹林", "E"),
        ("我选 C。", "C"),
        ("The answer is (a)", "A"),
        ("Answer: D", "D"),
        ("B. 阿司匹林", "B"),
        ("B、阿司匹林", "B"),
        ("阿司匹林", None),
        ("Based on the data", None),  # no standalone A-E capital
        ("the answer is a bit unclear", None),  # a lowercase letter counts only alone or in brackets
    ],
)
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_answer_match_choice():
    completions = ["<answer>B</answer>", "<answer>答案是 C</answer>", "<answer>我不知道</answer>", "<answer>(A)</answer>"]
    answers = ["B. 阿司匹林", "B", "A", "A"]
    assert answer_match_reward(completions, answers, mode="choice") == [1.0, 0.0, 0.0, 1.0]


def test_answer_match_errors():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        answer_match_reward(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown answer match mode"):
        answer_match_reward(["a"], ["a"], mode="fuzzy")


def test_load_reward_function():
    assert load_reward_function("medgpt_ds.rewards:format_reward") is format_reward
    assert load_reward_function("json:dumps") is json.dumps
    with pytest.raises(ValueError, match="must look like"):
        load_reward_function("medgpt_ds.rewards.format_reward")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_reward_function("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_reward_function("medgpt_ds.rewards:nope")
    with pytest.raises(TypeError, match="not callable"):
        load_reward_function("medgpt_ds.rewards:_FORMAT_RE.pattern")


def test_combine_rewards():
    completions = ["<think>算</think><answer>56</answer>", "56", "<think>算</think><answer>57</answer>"]
    answers = ["56", "56", "56"]
    fns = [
        (format_reward_2args := (lambda c, a: format_reward(c)), 0.5),
        (functools.partial(answer_match_reward, mode="normalized"), 1.0),
        (functools.partial(answer_match_reward, mode="exact"), 2.0),
    ]
    total, per_fn = combine_rewards(fns, completions, answers)
    # format [1, 0, 1] * 0.5 + normalized [1, 1, 0] + exact [1, 1, 0] * 2
    assert total == [3.5, 3.0, 0.5]
    assert per_fn == {
        "<lambda>": [1.0, 0.0, 1.0],
        "answer_match_reward": [1.0, 1.0, 0.0],
        "answer_match_reward_2": [1.0, 1.0, 0.0],
    }
    assert format_reward_2args(["x"], [None]) == [0.0]
    with pytest.raises(ValueError, match="returned 1 scores for 3"):
        combine_rewards([(lambda c, a: [1.0], 1.0)], completions, answers)


def test_rewards_on_medicalgpt_grpo_sample():
    path = DATA / "grpo/sample.jsonl"
    if not path.exists():
        pytest.skip(f"MedicalGPT sample data not found at {path}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    answers = [r["answer"] for r in rows]
    # A perfect, well-formatted policy (answers re-written with full-width characters) scores 1 everywhere.
    full_width = {chr(c): chr(c + 0xFEE0) for c in range(0x21, 0x7F)}
    perfect = [f"<think>{r['question']}</think>\n<answer>{r['answer'].translate(str.maketrans(full_width))}</answer>"
               for r in rows]
    assert format_reward(perfect) == [1.0] * len(rows)
    assert answer_match_reward(perfect, answers, mode="normalized") == [1.0] * len(rows)
    # A policy that answers the previous question is rewarded only where two answers coincide.
    shifted = perfect[1:] + perfect[:1]
    scores = answer_match_reward(shifted, answers, mode="normalized")
    assert scores == [float(normalize_text(a) == normalize_text(b)) for a, b in zip(answers[1:] + answers[:1], answers)]
