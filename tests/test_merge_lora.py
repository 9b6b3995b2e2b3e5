"""tools/merge_lora.py: base folder + PEFT adapter folder -> merged model, checked against PEFT itself."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from medgpt_ds.convert import CheckpointError, merge_lora_folders

ROOT = Path(__file__).resolve().parents[1]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QUIET = {"log": lambda msg: None}
PROBE = torch.tensor([[5, 17, 33, 90, 120, 7, 250], [9, 8, 7, 6, 5, 4, 3]])


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from medgpt_ds.tokenizer import train_bpe_tokenizer

    texts = [f"the patient reports headache and nausea on day {i}" for i in range(100)]
    return train_bpe_tokenizer(texts=texts, vocab_size=300, output_dir=str(tmp_path_factory.mktemp("tok")),
                               chat_template=CHATML)


def _config(tok, tied: bool, hidden: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)


def _randomize_adapter(model) -> None:
    """Fresh LoRA B is zero (a no-op adapter); give every trainable tensor real values."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _make(tmp_path, tok, *, tied=False, reward=False, hidden=32, extra_tokens=0):
    """Save a causal-LM base and train-free adapter (random LoRA weights) like a finished run."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    cfg = _config(tok, tied, hidden)
    LlamaForCausalLM(cfg).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    if reward:
        cfg.num_labels = 1
        model = LlamaForSequenceClassification.from_pretrained(base_dir, num_labels=1)
        lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    else:
        model = LlamaForCausalLM.from_pretrained(base_dir)
        modules_to_save = None
        if extra_tokens:
            model.resize_token_embeddings(cfg.vocab_size + extra_tokens)
            modules_to_save = ["embed_tokens", "lm_head"]
        lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=16, use_rslora=True,
                          target_modules=["q_proj", "v_proj", "down_proj", "o_proj"], modules_to_save=modules_to_save)
    model = get_peft_model(model, lora)
    _randomize_adapter(model)
    model.save_pretrained(adapter_dir)
    tok.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def _peft_reference(base_dir, adapter_dir, reward=False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if reward:
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_dir)
    rows = None
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.endswith("embed_tokens.weight"):
                rows = f.get_slice(k).get_shape()[0]
    if rows:
        base.resize_token_embeddings(rows)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.mark.unit
@pytest.mark.parametrize("tied", [False, True])
def test_merge_matches_peft(tmp_path, tok, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter_dir = _make(tmp_path, tok, tied=tied)
    out = tmp_path / "merged"
    res = merge_lora_folders(str(base_dir), str(adapter_dir), str(out), max_shard_size="30KB", **QUIET)
    assert len(res.files) > 1 and (out / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=PROBE).logits, _peft_reference(base_dir, adapter_dir)(
            input_ids=PROBE).logits, rtol=0, atol=1e-5)
    assert merged.config.tie_word_embeddings is tied
    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2.chat_template == CHATML
    from transformers import GenerationConfig

    assert tok2.convert_tokens_to_ids("<|im_end|>") in GenerationConfig.from_pretrained(out).eos_token_id


@pytest.mark.unit
def test_merge_reward_adapter_keeps_score_head(tmp_path, tok):
    from transformers import AutoModelForSequenceClassification

    base_dir, adapter_dir = _make(tmp_path, tok, reward=True)
    out = tmp_path / "merged"
    res = merge_lora_folders(str(base_dir), str(adapter_dir), str(out), verify=True, **QUIET)
    assert res.verify["ok"]
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ref = _peft_reference(base_dir, adapter_dir, reward=True)
    with torch.no_grad():
        got, want = merged(input_ids=PROBE).logits, ref(input_ids=PROBE).logits
    assert got.shape == (2, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert not (out / "generation_config.json").exists()


@pytest.mark.unit
def test_merge_with_resized_vocabulary(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir = _make(tmp_path, tok, extra_tokens=12)
    out = tmp_path / "merged"
    merge_lora_folders(str(base_dir), str(adapter_dir), str(out), **QUIET)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.get_input_embeddings().weight.shape[0] == 312
    ids = torch.tensor([[5, 305, 311, 40]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits,
                                   _peft_reference(base_dir, adapter_dir)(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.unit
def test_merge_to_bf16(tmp_path, tok):
    from safetensors import safe_open

    base_dir, adapter_dir = _make(tmp_path, tok)
    out = tmp_path / "merged"
    res = merge_lora_folders(str(base_dir), str(adapter_dir), str(out), dtype="bf16", verify=True, **QUIET)
    assert res.verify["ok"] and res.dtype == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


@pytest.mark.unit
def test_bad_inputs(tmp_path, tok):
    base_dir, adapter_dir = _make(tmp_path / "a", tok)
    other_base, _ = _make(tmp_path / "b", tok, hidden=64)
    with pytest.raises(CheckpointError, match="different base model.*lora_A expects 32 inputs, the base layer has 64"):
        merge_lora_folders(str(other_base), str(adapter_dir), str(tmp_path / "o"), **QUIET)
    with pytest.raises(FileNotFoundError, match="adapter folder not found"):
        merge_lora_folders(str(base_dir), str(tmp_path / "nope"), str(tmp_path / "o"), **QUIET)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        merge_lora_folders(str(base_dir), str(base_dir), str(tmp_path / "o"), **QUIET)
    with pytest.raises(ValueError, match="unknown dtype"):
        merge_lora_folders(str(base_dir), str(adapter_dir), str(tmp_path / "o"), dtype="q4", **QUIET)


@pytest.mark.unit
def test_cli(tmp_path, tok, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import merge_lora
    finally:
        sys.path.pop(0)
    base_dir, adapter_dir = _make(tmp_path, tok)
    rc = merge_lora.main(["--base_model", str(base_dir), "--lora_model", str(adapter_dir),
                          "--output_dir", str(tmp_path / "m"), "--verify"])
    assert rc == 0 and "wrote merged model" in capsys.readouterr().out
    rc = merge_lora.main(["--base_model", str(tmp_path / "none"), "--adapter", str(adapter_dir),
                          "--output_dir", str(tmp_path / "m2")])
    assert rc == 2 and "base model folder not found" in capsys.readouterr().err
