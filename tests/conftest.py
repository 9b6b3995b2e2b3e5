"""Shared fixtures: a tiny BPE tokenizer trained on generated text, a tiny Llama factory."""
from __future__ import annotations

import random

import pytest

_WORDS = ["fever", "cough", "headache", "patient", "doctor", "infection", "virus", "bacteria",
          "treatment", "dose", "tablet", "blood", "pressure", "heart", "lung", "liver", "kidney",
          "pain", "chronic", "acute", "symptom", "diagnosis", "test", "what", "is", "the", "a",
          "of", "and", "to", "in", "for", "with", "how", "should", "I", "take", "can", "be",
          "caused", "by", "usually", "hello", "yes", "no", "thank", "you", "please", "help",
          "answer", "question", "reply", "system", "user", "assistant"]
_HANZI = "发热咳嗽头痛病人医生感染病毒细菌治疗剂量药片血压心脏肺肝肾疼痛慢性急性症状诊断检查什么怎么是的了吗"


def _generated_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i % 3 == 0:
            lines.append("".join(rng.choice(_HANZI) for _ in range(rng.randint(4, 20))) + "。")
        else:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
            lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]))
    return lines


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE (vocab 512) with eos <|endoftext|>, pad <|pad|>, ChatML markers."""
    from medgpt_ds.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(texts=_generated_corpus(), vocab_size=512)


@pytest.fixture(scope="session")
def tiny_llama():
    """Factory: tiny_llama(vocab_size, attn_implementation="sdpa", seed=0, **config) -> a
    randomly initialised 2-layer LlamaForCausalLM (hidden 32) in float32, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(vocab_size: int, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
        cfg = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 512}
        cfg.update(overrides)
        torch.manual_seed(seed)
        config = LlamaConfig(**cfg)
        config._attn_implementation = attn_implementation
        return LlamaForCausalLM(config).eval()

    return make


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory):
    """A BPE tokenizer trained on the bundled demo corpus, saved (path), with ChatML template."""
    import os

    from medgpt_ds.data.templates import TEMPLATES
    from medgpt_ds.tokenizer import train_bpe_tokenizer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path_factory.mktemp("demo_tok"))
    train_bpe_tokenizer(files=[os.path.join(root, "data", "demo", "pretrain", "medical_notes.txt")],
                        vocab_size=600, output_dir=out, chat_template=TEMPLATES["chatml"])
    return out


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, demo_tokenizer_dir, tiny_llama):
    """A saved tiny Llama (random init, hidden 32) + the demo tokenizer: a `--model_name_or_path`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    out = str(tmp_path_factory.mktemp("tiny_base"))
    model = tiny_llama(len(tok), seed=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tiny_tokenizer, tiny_llama):
    """A merged HF model dir (weights + tokenizer with the ChatML template) that answers "A B"
    (the bigram of tests/helpers.py)."""
    from tests.helpers import BIGRAM, bigram_lm, save_chat_tokenizer

    out = tmp_path_factory.mktemp("bigram")
    tok = save_chat_tokenizer(tiny_tokenizer, out)
    bigram_lm(tok, tiny_llama, BIGRAM).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def digit_model_dir(tmp_path_factory, tiny_tokenizer, tiny_llama):
    """A merged HF model dir whose answer depends on the chat: "7 B" / "8 B" / "9 B" when its
    messages hold that digit, else "A B" (tests.helpers.echo_lm / echo_answer)."""
    from tests.helpers import echo_lm, save_chat_tokenizer

    out = tmp_path_factory.mktemp("echo")
    tok = save_chat_tokenizer(tiny_tokenizer, out)
    echo_lm(tok, tiny_llama).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, model_dir):
    """A LoRA adapter (on lm_head) over model_dir that makes the first answer token "B": answers "B"."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("lora")
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=["lm_head"]))
    with torch.no_grad():
        lora = peft_model.base_model.model.lm_head
        lora.lora_A["default"].weight.zero_()
        lora.lora_A["default"].weight[0, 0] = 1.0  # reads direction 0 ("any other token")
        lora.lora_B["default"].weight.zero_()
        lora.lora_B["default"].weight[tok.convert_tokens_to_ids("B"), 0] = 8.0  # B beats A (4.0)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def echo_model_dir(tmp_path_factory, tiny_tokenizer, tiny_llama):
    """A merged HF model dir (ChatML tokenizer, context 4096) whose answer depends on the prompt:
    "A <keyword>" for the keyword the conversation names most (tests/echo_model.py); " pain" loops."""
    from tests.echo_model import echo_lm
    from tests.helpers import save_chat_tokenizer

    out = tmp_path_factory.mktemp("echo")
    tok = save_chat_tokenizer(tiny_tokenizer, out)
    echo_lm(tok, tiny_llama).save_pretrained(out)
    return out
