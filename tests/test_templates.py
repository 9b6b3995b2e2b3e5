"""Chat templates: exact renderings, prefix consistency, label masking, preference encoding."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from medgpt_ds.data.formats import find_files, load_records
from medgpt_ds.data.templates import (
    TEMPLATES,
    encode_conversation,
    encode_preference,
    encode_prompt,
    end_of_turn,
    get_chat_template,
    render_with_spans,
    turn_terminators,
)

pytestmark = pytest.mark.unit

MEDICALGPT = Path(__file__).parents[1].parent / "shared/data/medicalgpt"
EOS = "<|endoftext|>"

SYSTEM = {"role": "system", "content": "You are a doctor."}
Q1 = {"role": "user", "content": "What causes fever?"}
A1 = {"role": "assistant", "content": "Usually an infection."}
Q2 = {"role": "user", "content": "How should I take the tablet?"}
A2 = {"role": "assistant", "content": "With water, twice a day."}
CONV = [SYSTEM, Q1, A1, Q2, A2]

# What each template renders for CONV (bos "<s>", eos "<|endoftext|>"): pinned against the
# MedicalGPT / LLaMA-Factory / model-card renderings.
RENDERED = {
    "base": "You are a doctor.\n\nWhat causes fever?Usually an infection.<|endoftext|>"
            "How should I take the tablet?With water, twice a day.<|endoftext|>",
    "chatml": "<|im_start|>system\nYou are a doctor.<|im_end|>\n"
              "<|im_start|>user\nWhat causes fever?<|im_end|>\n"
              "<|im_start|>assistant\nUsually an infection.<|im_end|>\n"
              "<|im_start|>user\nHow should I take the tablet?<|im_end|>\n"
              "<|im_start|>assistant\nWith water, twice a day.<|im_end|>\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nYou are a doctor.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWhat causes fever?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nUsually an infection.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHow should I take the tablet?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nWith water, twice a day.<|eot_id|>",
    "vicuna": "You are a doctor. USER: What causes fever? ASSISTANT: Usually an infection."
              "<|endoftext|>USER: How should I take the tablet? ASSISTANT: With water, twice a day."
              "<|endoftext|>",
    "alpaca": "You are a doctor.\n\n### Instruction:\nWhat causes fever?\n\n### Response:\n"
              "Usually an infection.<|endoftext|>\n\n### Instruction:\nHow should I take the "
              "tablet?\n\n### Response:\nWith water, twice a day.<|endoftext|>",
    "chatglm3": "[gMASK]sop<|system|>\n You are a doctor.<|user|>\n What causes fever?"
                "<|assistant|>\n Usually an infection.<|endoftext|><|user|>\n How should I take "
                "the tablet?<|assistant|>\n With water, twice a day.<|endoftext|>",
    "deepseek": "<s>You are a doctor.\n\nUser: What causes fever?\n\nAssistant: Usually an "
                "infection.<|endoftext|>User: How should I take the tablet?\n\nAssistant: With "
                "water, twice a day.<|endoftext|>",
    "mistral": "<s>[INST] You are a doctor.\n\nWhat causes fever? [/INST]Usually an infection."
               "<|endoftext|>[INST] How should I take the tablet? [/INST]With water, twice a day."
               "<|endoftext|>",
    "llama2": "<s>[INST] <<SYS>>\nYou are a doctor.\n<</SYS>>\n\nWhat causes fever? [/INST] "
              "Usually an infection. <|endoftext|><s>[INST] How should I take the tablet? [/INST] "
              "With water, twice a day. <|endoftext|>",
}
RENDERED["qwen"] = RENDERED["chatml"]

# The labelled text of one assistant turn: the reply plus the template's end-of-turn marker.
REPLY_SEGMENT = {
    "base": "{}" + EOS, "chatml": "{}<|im_end|>\n", "qwen": "{}<|im_end|>\n",
    "llama3": "{}<|eot_id|>", "vicuna": " {}" + EOS, "alpaca": "{}" + EOS,
    "chatglm3": "\n {}" + EOS, "deepseek": " {}" + EOS, "mistral": "{}" + EOS,
    "llama2": " {} " + EOS,
}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    """The tiny tokenizer with a bos token, so templates that use bos_token show it."""
    t = copy.deepcopy(tiny_tokenizer)
    t.add_special_tokens({"bos_token": "<s>"})
    return t


def _render(tok, name, messages, gen=False):
    return tok.apply_chat_template(messages, chat_template=TEMPLATES[name], tokenize=False,
                                   add_generation_prompt=gen)


def _label_runs(enc):
    """Contiguous runs of labelled token ids."""
    runs, cur = [], []
    for x in enc["labels"]:
        if x == -100:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(x)
    return runs + ([cur] if cur else [])


def test_every_template_is_pinned():
    assert set(TEMPLATES) == set(RENDERED) == set(REPLY_SEGMENT)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_rendering(tok, name):
    assert _render(tok, name, CONV) == RENDERED[name]


def test_default_system_prompts(tok):
    assert _render(tok, "qwen", [Q1], gen=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat causes fever?<|im_end|>\n<|im_start|>assistant\n")
    assert _render(tok, "chatml", [Q1], gen=True).startswith("<|im_start|>user\n")
    assert _render(tok, "vicuna", [Q1], gen=True) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: What causes "
        "fever? ASSISTANT:")
    assert _render(tok, "alpaca", [Q1], gen=True).startswith(
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n")
    assert _render(tok, "llama2", [Q1], gen=True) == "<s>[INST] What causes fever? [/INST]"


@pytest.mark.parametrize("system", [True, False], ids=["system", "no_system"])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_prefix_consistency(tok, name, system):
    conv = CONV if system else CONV[1:]
    for k in range(1, len(conv)):
        longer = _render(tok, name, conv[: k + 1])
        assert longer.startswith(_render(tok, name, conv[:k]))
        if conv[k]["role"] == "assistant":
            assert longer.startswith(_render(tok, name, conv[:k], gen=True))


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_labels_are_exactly_the_replies(tok, name):
    enc = encode_conversation(tok, TEMPLATES[name], CONV, max_length=4096)
    assert tok.decode(enc["input_ids"]) == RENDERED[name]
    assert not enc["truncated"]
    assert all(lab in (-100, t) for lab, t in zip(enc["labels"], enc["input_ids"]))
    runs = [tok.decode(r) for r in _label_runs(enc)]
    assert runs == [REPLY_SEGMENT[name].format(A1["content"]),
                    REPLY_SEGMENT[name].format(A2["content"])]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_end_of_turn_and_prompt(tok, name):
    assert REPLY_SEGMENT[name].format("").strip() == end_of_turn(tok, TEMPLATES[name]).strip()
    # The generation prompt plus the labelled reply tokens is the whole one-turn conversation.
    prompt = encode_prompt(tok, TEMPLATES[name], [SYSTEM, Q1])
    enc = encode_conversation(tok, TEMPLATES[name], [SYSTEM, Q1, A1], max_length=4096)
    assert prompt + _label_runs(enc)[0] == enc["input_ids"]


def test_turn_terminators(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert turn_terminators(tok, TEMPLATES["qwen"]) == ([tok.eos_token_id, im_end], [])
    assert turn_terminators(tok, TEMPLATES["vicuna"]) == ([tok.eos_token_id], [])
    assert turn_terminators(tok, TEMPLATES["llama2"]) == ([tok.eos_token_id], [])


def test_train_on_inputs(tok):
    enc = encode_conversation(tok, TEMPLATES["qwen"], CONV, 4096, train_on_inputs=True)
    assert enc["labels"] == enc["input_ids"]


def test_truncation_and_drop(tok):
    full = encode_conversation(tok, TEMPLATES["chatml"], CONV, 4096)
    n = len(full["input_ids"])
    first_label = next(i for i, x in enumerate(full["labels"]) if x != -100)
    cut = encode_conversation(tok, TEMPLATES["chatml"], CONV, n - 3)
    assert cut["truncated"] and cut["input_ids"] == full["input_ids"][: n - 3]
    assert cut["labels"] == full["labels"][: n - 3]
    # Cut right after the first reply token: one label left, still a sample.
    one = encode_conversation(tok, TEMPLATES["chatml"], CONV, first_label + 1)
    assert one is not None and sum(x != -100 for x in one["labels"]) == 1
    # Cut inside the first prompt: nothing left to learn -> None (the caller counts drops).
    assert encode_conversation(tok, TEMPLATES["chatml"], CONV, first_label) is None


def test_multi_turn_masking_counts(tok):
    enc = encode_conversation(tok, TEMPLATES["chatml"], CONV, 4096)
    want = sum(len(tok(REPLY_SEGMENT["chatml"].format(a["content"]),
                       add_special_tokens=False)["input_ids"]) for a in (A1, A2))
    assert sum(x != -100 for x in enc["labels"]) == want


def test_not_prefix_consistent_is_an_error(tok):
    # Renders older assistant turns differently from the last (like templates that strip
    # reasoning from history): masking by prefixes is impossible.
    bad = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[old]"
           "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="not prefix-consistent at message 2"):
        encode_conversation(tok, bad, CONV, 4096)


def test_get_chat_template(tiny_tokenizer):
    t = copy.deepcopy(tiny_tokenizer)
    t.chat_template = None
    with pytest.raises(ValueError, match="--template_name.*qwen"):
        get_chat_template(None, t)
    with pytest.raises(ValueError, match="--template_name"):
        get_chat_template("auto", t)
    assert get_chat_template("vicuna", t) == TEMPLATES["vicuna"]
    with pytest.raises(ValueError, match="unknown template_name 'nope'.*chatml"):
        get_chat_template("nope", t)
    t.chat_template = TEMPLATES["llama3"]
    assert get_chat_template("auto", t) == TEMPLATES["llama3"]
    assert get_chat_template(None, t) == TEMPLATES["llama3"]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_preference_matches_conversation(tok, name):
    prompt = CONV[:4]
    out = encode_preference(tok, TEMPLATES[name], prompt, "Rest and fluids.", "No idea.",
                            max_source_length=4096, max_target_length=4096)
    assert not out["truncated"]
    for reply, ids in (("Rest and fluids.", out["chosen_ids"]), ("No idea.", out["rejected_ids"])):
        conv = encode_conversation(tok, TEMPLATES[name],
                                   prompt + [{"role": "assistant", "content": reply}], 4096)
        assert out["prompt_ids"] + ids == conv["input_ids"]
        assert ids == _label_runs(conv)[-1]
        assert tok.decode(ids) == REPLY_SEGMENT[name].format(reply)


def test_preference_truncation(tok):
    tmpl = TEMPLATES["chatml"]
    full = encode_preference(tok, tmpl, CONV[:4], "Rest and fluids.", "No idea.", 4096, 4096)
    cut = encode_preference(tok, tmpl, CONV[:4], "Rest and fluids.", "No idea.", 10, 3)
    assert cut["truncated"]
    assert cut["prompt_ids"] == full["prompt_ids"][-10:]  # latest context kept
    assert cut["chosen_ids"] == full["chosen_ids"][:3]
    assert cut["rejected_ids"] == full["rejected_ids"][:3]
    assert encode_preference(tok, tmpl, CONV[:4], "Rest and fluids.", "No idea.", 10, 3,
                             truncation="drop") is None
    kept = encode_preference(tok, tmpl, CONV[:4], "Rest and fluids.", "No idea.", 4096, 4096,
                             truncation="drop")
    assert kept == full
    with pytest.raises(ValueError, match="truncation"):
        encode_preference(tok, tmpl, CONV[:4], "a", "b", 8, 8, truncation="left")


def test_tokens_merging_across_the_boundary(tok):
    # `base` glues the reply to the query: "f" + "ever" tokenizes as "fe" "ver", so "fe"
    # straddles the boundary. It stays unlabelled (it holds prompt text)...
    prompt = [{"role": "user", "content": "f"}]
    assert tok.tokenize("fever") == ["fe", "ver"]
    enc = encode_conversation(tok, TEMPLATES["base"], prompt + [
        {"role": "assistant", "content": "ever"}], 64)
    assert [tok.decode(r) for r in _label_runs(enc)] == ["ver" + EOS]
    # ...and a preference pair still gets one prompt shared by both replies.
    out = encode_preference(tok, TEMPLATES["base"], prompt, "ever", "xyz", 64, 64)
    assert out["prompt_ids"] == encode_prompt(tok, TEMPLATES["base"], prompt)
    assert tok.decode(out["chosen_ids"]) == "ever" + EOS
    assert tok.decode(out["rejected_ids"]) == "xyz" + EOS


def test_render_with_spans(tok):
    text, spans = render_with_spans(tok, TEMPLATES["chatml"], CONV)
    assert [text[s:e] for s, e in spans] == ["Usually an infection.<|im_end|>\n",
                                             "With water, twice a day.<|im_end|>\n"]


def _medicalgpt(sub):
    path = MEDICALGPT / sub
    if not path.exists():
        pytest.skip(f"MedicalGPT sample data not found at {path}")
    return find_files(str(path))


def test_medicalgpt_sft_labels(tiny_tokenizer):
    records = load_records(_medicalgpt("sft"), "sft", log=lambda s: None)
    tmpl = TEMPLATES["qwen"]
    for r in records:
        enc = encode_conversation(tiny_tokenizer, tmpl, r["messages"], max_length=100_000)
        reply = r["messages"][-1]["content"]
        assert tiny_tokenizer.decode(_label_runs(enc)[-1]) == reply + "<|im_end|>\n"


def test_medicalgpt_preference_pairs(tiny_tokenizer):
    records = load_records(_medicalgpt("reward"), "preference", log=lambda s: None)
    tmpl = TEMPLATES["qwen"]
    for r in records[:100]:
        out = encode_preference(tiny_tokenizer, tmpl, r["prompt"], r["chosen"], r["rejected"],
                                100_000, 100_000)
        text = tiny_tokenizer.apply_chat_template(
            r["prompt"] + [{"role": "assistant", "content": r["chosen"]}], chat_template=tmpl,
            tokenize=False)
        assert tiny_tokenizer.decode(out["prompt_ids"] + out["chosen_ids"]) == text
