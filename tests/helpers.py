"""Helpers shared by several test modules (fixtures are in conftest.py, launchers in launch_utils.py):
the bigram chat model of the inference/serving tests, the RL stage assets and rule reward, and the
preference records and files of the preference stage tests."""
from __future__ import annotations

import json
import os
import random
import types
from pathlib import Path

import torch

from tests.launch_utils import ROOT

# --- the hand-built bigram chat model (inference, serving, web demo, evaluation) -------------------

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
ANSWER = "A B"
# next token after each token (None: every other token); a margin of 4 * sqrt(32) in the logits
BIGRAM = {None: "A", "A": "Ġ", "Ġ": "B", "B": "<|im_end|>"}


def save_chat_tokenizer(tokenizer, out: Path, chat_template: str | None = CHATML):
    """A fresh copy of `tokenizer` with the ChatML template, saved to `out` (the session fixture is shared)."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = chat_template
    tok.save_pretrained(out)
    return tok


def bigram_lm(tok, make_llama, table: dict[str | None, str], scale: float = 4.0):
    """A tiny Llama whose next token depends only on the current one, as given by `table`."""
    model = make_llama(len(tok))
    with torch.no_grad():
        for layer in model.model.layers:  # attention and MLP add nothing to the residual stream
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0  # direction 0: "any other token"
        head.zero_()
        for d, (cur, nxt) in enumerate(table.items()):
            if cur is not None:
                i = tok.convert_tokens_to_ids(cur)
                emb[i] = 0.0
                emb[i, d] = 1.0
            head[tok.convert_tokens_to_ids(nxt), d] = scale
    return model


# The echo chat model: the bigram above, plus one attention head that finds a key digit in the
# context. A chat whose messages contain 7, 8 or 9 is answered "<digit> B"; any other chat "A B". So
# a batch (or concurrent requests) shows when an answer went to the wrong row. The pad token is a key
# too, answered "P": a batch whose padding is attended (a missing or wrong attention mask) answers
# "P..." in its padded rows.
ECHO_KEYS = {"7": "7", "8": "8", "9": "9", "<|pad|>": "P"}


def echo_answer(text: str) -> str:
    """What the echo model answers to a chat whose messages hold ``text`` (one key digit at most)."""
    digits = [c for c in text if c in "789"]
    return f"{digits[-1]} B" if digits else ANSWER


def echo_lm(tok, make_llama):
    """A tiny Llama (hidden 32) answering as `echo_answer` says.

    Residual directions: 0 "any other token", 1.. one per bigram row (A, Ġ, B and the digits, read
    by the LM head at scale 32), then one echo direction per key, 30 "is a key", 31 "every token".
    Layer 0's head 0 scores keys only (query: the every-token direction, key: the is-a-key direction,
    on the slowest rotary pair, whose angle moves 0.001 rad a position: position-free over a chat),
    copies the key's own direction into its echo direction, which the head reads at scale 4: above
    the default next token "A" (4 x 1) at the first answer position, below every bigram row after it.
    """
    table = {None: "A", "A": "Ġ", "Ġ": "B", "B": "<|im_end|>", **{k: "Ġ" for k in "789"}}
    model = bigram_lm(tok, make_llama, table, scale=32.0)
    ids = {k: tok.convert_tokens_to_ids(k) for k in ECHO_KEYS}
    assert all(i != tok.unk_token_id and i is not None for i in ids.values()), ids
    with torch.no_grad():
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        head[tok.convert_tokens_to_ids("A"), 0] = 4.0  # the default row is weaker than the others
        emb[:, 31] = 1.0
        attn = model.model.layers[0].self_attn
        for w in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight):
            w.zero_()
        attn.q_proj.weight[3, 31] = 1.0  # head 0, rotary pair (3, 7): inverse frequency 1e4 ** -0.75
        attn.k_proj.weight[3, 30] = 5.0  # kv head 0 (heads 0 and 1 read it)
        for n, (key, answer) in enumerate(ECHO_KEYS.items()):
            i, own, echo = ids[key], 8 + n, 12 + n
            if key == "<|pad|>":
                emb[i] = 0.0
                emb[i, 31] = 1.0
            emb[i, own] = 1.0
            emb[i, 30] = 1.0
            attn.v_proj.weight[n, own] = 1.0
            attn.o_proj.weight[echo, n] = 1.0  # head 0's value dims are o_proj's inputs 0..7
            head[tok.convert_tokens_to_ids(answer), echo] = 4.0
    return model


# --- ppo / grpo ----------------------------------------------------------------------------------


def starts_with_space(completions, answers):
    """The learnable rule reward of the stage tests: 1 when the response starts a new word (a space).
    About a quarter of a random tiny model's responses do; with --top_k 8 it learns this in ~10 steps."""
    return [1.0 if c.startswith(" ") else 0.0 for c in completions]


def make_rl_assets(out: str, tokenizer_dir: str, tiny_llama) -> dict:
    """A tiny actor (Llama, hidden 32) and a reward model (sequence classifier, num_labels=1, same
    config) saved with the ChatML demo tokenizer: {"actor": dir, "rm": dir}."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    actor = tiny_llama(len(tok), seed=3, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    paths = {"actor": os.path.join(out, "actor"), "rm": os.path.join(out, "rm")}
    actor.save_pretrained(paths["actor"])
    tok.save_pretrained(paths["actor"])
    config = actor.config.__class__(**{**actor.config.to_dict(), "num_labels": 1})
    torch.manual_seed(4)
    LlamaForSequenceClassification(config).save_pretrained(paths["rm"])
    tok.save_pretrained(paths["rm"])
    return paths


# --- preference pairs (rm, dpo, orpo) -------------------------------------------------------------


def pair_data_args(**kw):
    """The data flags encode_pair reads."""
    base = dict(max_source_length=64, max_target_length=64, truncation_mode="truncate")
    base.update(kw)
    return types.SimpleNamespace(**base)


def pair_record(q, c, r, history=()):
    """A preference record: question ``q`` (after the ``history`` turns), chosen ``c``, rejected ``r``."""
    msgs = [m for turn in history for m in ({"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]})]
    return {"prompt": msgs + [{"role": "user", "content": q}], "chosen": c, "rejected": r}


RECS = [
    pair_record("What causes a fever?", "A fever is usually caused by an infection.", "No idea."),
    pair_record("How should I take the tablet?", "Take one tablet with water after a meal, twice a day.", "Whenever."),
    pair_record("And for a cough?", "Rest and fluids; see a doctor if it lasts.", "Cough syrup fixes everything always.",
                history=[("I have a cold.", "Sorry to hear that.")]),
]

_WORDS = ["fever", "cough", "headache", "patient", "doctor", "infection", "virus", "treatment", "dose", "tablet",
          "blood", "pressure", "heart", "lung", "pain", "symptom"]


def write_synthetic_pairs(folder, n_train: int = 256, n_eval: int = 64) -> tuple[str, str]:
    """A preference set with a rule a tiny model learns in a few dozen steps: the chosen answer
    ends with " yes", the rejected one is the same answer ending with " no". Returns (train, eval)
    jsonl paths (MedicalGPT format; disjoint random prompts and bodies)."""
    paths = []
    for name, n, seed in (("train", n_train, 0), ("eval", n_eval, 1)):
        rng = random.Random(seed)
        path = folder / f"{name}.jsonl"
        with open(path, "w") as f:
            for _ in range(n):
                q = "Tell me about " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 5))) + "?"
                body = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 8)))
                f.write(json.dumps({"conversations": [{"from": "human", "value": q}],
                                    "chosen": body + " yes", "rejected": body + " no"}) + "\n")
        paths.append(str(path))
    return paths[0], paths[1]


def split_demo_pairs(folder, n_eval: int = 8) -> tuple[str, str]:
    """The bundled demo reward data split into train / eval files (so tests can re-read the eval pairs)."""
    lines = open(os.path.join(ROOT, "data", "demo", "reward", "train.jsonl")).read().splitlines()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("\n".join(lines[:-n_eval]) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(lines[-n_eval:]) + "\n")
    return str(folder / "train.jsonl"), str(folder / "eval.jsonl")
