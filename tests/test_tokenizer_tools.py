"""Tokenizers: BPE / SentencePiece training, extension with domain vocabulary, embedding resize."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from medgpt_ds.tokenizer import (
    extend_tokenizer,
    resize_embeddings_for,
    train_bpe_tokenizer,
    train_sentencepiece_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "medicalgpt"
QUIET = {"log": lambda msg: None}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Project-written text: general clinical notes and a denser cardiology/endocrinology domain.
GENERAL = [f"病人{i}号主诉头痛{i % 5 + 1}天，伴有发热、咳嗽，既往体健。Patient {i} reports a headache "
           f"for {i % 5 + 1} days with fever and cough." for i in range(200)]
TERMS = ["急性心肌梗死", "冠状动脉介入治疗", "糖尿病酮症酸中毒", "心房颤动", "肺动脉高压", "胰岛素抵抗",
         "甲状腺功能亢进", "慢性阻塞性肺疾病"]
DOMAIN = [f"{TERMS[i % 8]}患者第{i}例：{TERMS[(i * 3) % 8]}与{TERMS[(i * 5 + 1) % 8]}的鉴别诊断需结合病史。"
          for i in range(300)]
PROBES = ["高血压 patient, day 12: 😀 emoji, tab\tand  two spaces", "  leading spaces\n\nand blank lines ",
          DOMAIN[7], "<|im_start|>user\n头痛怎么办？<|im_end|>\n"]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(texts=GENERAL, vocab_size=400, output_dir=str(root / "bpe"), chat_template=CHATML)
    train_sentencepiece_tokenizer(texts=GENERAL, vocab_size=400, output_dir=str(root / "sp"), chat_template=CHATML)
    return root


@pytest.mark.unit
@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_round_trip(tmp_path, model_type):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out = tmp_path / "sp"
    tok = train_sentencepiece_tokenizer(texts=GENERAL + DOMAIN, vocab_size=500, model_type=model_type,
                                        output_dir=str(out), chat_template=CHATML)
    reloaded = AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for text in PROBES:
        ids = _ids(reloaded, text)
        assert reloaded.decode(ids) == text  # byte fallback: emoji and tabs survive, no <unk>
        assert reloaded.unk_token_id not in ids
        assert ids == sp.encode(text) == _ids(tok, text)  # identical to SentencePiece itself
    assert [reloaded.convert_ids_to_tokens(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert reloaded.pad_token == "<pad>" and reloaded.eos_token == "</s>"
    marker = _ids(reloaded, "<|im_start|>")
    assert len(marker) == 1 and marker[0] == reloaded.convert_tokens_to_ids("<|im_start|>")
    assert reloaded.chat_template == CHATML
    assert reloaded.apply_chat_template([{"role": "user", "content": "头痛"}], tokenize=False) == \
        "<|im_start|>user\n头痛<|im_end|>\n"


@pytest.mark.unit
def test_bpe_round_trip(bases):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bases / "bpe")
    for text in PROBES:
        assert tok.decode(_ids(tok, text)) == text
    assert tok.chat_template == CHATML and tok.eos_token == "<|endoftext|>"


@pytest.mark.unit
@pytest.mark.parametrize("base", ["sp", "bpe"])
def test_extend_adds_domain_tokens_that_are_used(bases, tmp_path, base):
    from transformers import AutoTokenizer

    base_tok = AutoTokenizer.from_pretrained(bases / base)
    tok, report = extend_tokenizer(str(bases / base), str(tmp_path / "ext"), domain_texts=DOMAIN, vocab_size=400,
                                   **QUIET)
    assert report["mode"] == ("sentencepiece" if base == "sp" else "added_tokens")
    assert report["base_vocab"] == len(base_tok) and report["new_vocab"] == len(tok) == len(base_tok) + report["added"]
    assert report["added"] > 10 and report["tokens_after"] < report["tokens_before"] / 2
    assert json.loads((tmp_path / "ext" / "extend_report.json").read_text()) == report
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "ext")
    for text in PROBES:
        ids = _ids(reloaded, text)
        assert reloaded.decode(ids) == text and ids == _ids(tok, text)
    # Domain text now uses the new ids; general text encodes exactly as before (old ids kept).
    domain_ids = _ids(reloaded, DOMAIN[11])
    assert any(i >= len(base_tok) for i in domain_ids) and len(domain_ids) < len(_ids(base_tok, DOMAIN[11]))
    assert "急性心肌梗死" in reloaded.convert_ids_to_tokens(_ids(reloaded, "急性心肌梗死"))[0]
    for text in GENERAL[:20]:
        assert _ids(reloaded, text) == _ids(base_tok, text)
    assert reloaded.chat_template == CHATML


@pytest.mark.unit
def test_extend_with_a_given_sentencepiece_model(bases, tmp_path):
    train_sentencepiece_tokenizer(texts=DOMAIN, vocab_size=350, output_dir=str(tmp_path / "domain_sp"))
    tok, report = extend_tokenizer(str(bases / "bpe"), str(tmp_path / "ext"),
                                   sp_model=str(tmp_path / "domain_sp" / "tokenizer.model"), max_new_tokens=5, **QUIET)
    assert report["added"] == 5 and "tokens_before" not in report  # no corpus: no savings measured


@pytest.mark.unit
@pytest.mark.parametrize("tied", [False, True])
def test_resize_embeddings_for_extended_tokenizer(bases, tmp_path, tied):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    base_tok = AutoTokenizer.from_pretrained(bases / "bpe")
    tok, _ = extend_tokenizer(str(bases / "bpe"), str(tmp_path / "ext"), domain_texts=DOMAIN, vocab_size=400, **QUIET)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(base_tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=tied))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    info = resize_embeddings_for(model, tok, base_tokenizer=base_tok)
    assert info == {"old": len(base_tok), "new": len(tok), "from_pieces": len(tok) - len(base_tok)}
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(tok) and model.config.vocab_size == len(tok)
    assert torch.equal(emb[: len(base_tok)], old_in) and torch.equal(head[: len(base_tok)], old_out)
    assert (emb.data_ptr() == head.data_ptr()) is tied
    new_id = tok.convert_tokens_to_ids("急性心肌梗死")
    pieces = _ids(base_tok, "急性心肌梗死")
    torch.testing.assert_close(emb[new_id], old_in[pieces].mean(0))
    torch.testing.assert_close(head[new_id], old_out[pieces].mean(0))
    with torch.no_grad():  # the model runs on text with the new ids
        assert torch.isfinite(model(input_ids=torch.tensor([_ids(tok, DOMAIN[3])])).logits).all()
    # Already big enough (e.g. a vocabulary padded to a multiple of 64): nothing changes.
    assert resize_embeddings_for(model, base_tok) == {"old": len(tok), "new": len(tok), "from_pieces": 0}


@pytest.mark.unit
def test_resize_refuses_zero3_partitioned_weights(bases):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    model.get_input_embeddings().weight.ds_id = 0  # what deepspeed.zero.Init leaves on a parameter
    with pytest.raises(RuntimeError, match="before deepspeed.initialize"):
        resize_embeddings_for(model, AutoTokenizer.from_pretrained(bases / "bpe"))


@pytest.mark.unit
def test_bad_inputs(tmp_path, bases):
    with pytest.raises(ValueError, match="Vocabulary size is smaller than required_chars"):
        train_sentencepiece_tokenizer(texts=DOMAIN, vocab_size=20)
    with pytest.raises(ValueError, match="corpus is empty"):
        train_sentencepiece_tokenizer(texts=["", "  "], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        extend_tokenizer(str(bases / "bpe"), str(tmp_path / "x"), domain_files=[str(tmp_path / "none.txt")], **QUIET)
    with pytest.raises(ValueError, match="needs domain_files/domain_texts or sp_model"):
        extend_tokenizer(str(bases / "bpe"), str(tmp_path / "x"), **QUIET)


def _tool(name):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


@pytest.mark.unit
def test_cli_on_medicalgpt_pretrain_data(tmp_path, capsys):
    if not (DATA / "pretrain").is_dir():
        pytest.skip(f"MedicalGPT sample data not found at {DATA}")
    train_tokenizer, extend = _tool("train_tokenizer"), _tool("extend_tokenizer")
    en = str(DATA / "pretrain" / "en_article_tail500.txt")
    assert train_tokenizer.main(["--corpus", en, "--type", "sentencepiece", "--vocab_size", "800",
                                 "--output_dir", str(tmp_path / "sp")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["vocab_size"] == 800 and stats["round_trip_exact"] == "426/426" and stats["unk_tokens"] == 0
    assert train_tokenizer.main(["--corpus", str(DATA / "pretrain"), "--vocab_size", "3000",
                                 "--output_dir", str(tmp_path / "bpe")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["documents"] == 1411 and stats["round_trip_exact"] == "1000/1000"
    # The English tokenizer learns Chinese medical vocabulary from fever.txt.
    assert extend.main(["--base_tokenizer", str(tmp_path / "sp"), "--domain_corpus",
                        str(DATA / "pretrain" / "fever.txt"), "--vocab_size", "3000",
                        "--output_dir", str(tmp_path / "ext")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "sentencepiece" and report["added"] > 1000
    assert report["chars_per_token_after"] > 3 * report["chars_per_token_before"]
    assert extend.main(["--base_tokenizer", str(tmp_path / "missing"), "--domain_corpus", en,
                        "--output_dir", str(tmp_path / "x")]) == 2
    assert "base tokenizer folder not found" in capsys.readouterr().err
    assert train_tokenizer.main(["--corpus", str(tmp_path / "none"), "--output_dir", str(tmp_path / "y")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
