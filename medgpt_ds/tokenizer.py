"""Tokenizer training: the from-scratch path (a byte-level BPE trained on a corpus).

Byte-level BPE never produces <unk> and round-trips any text, including Chinese, so a tokenizer
trained on a small corpus still encodes every user prompt.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from medgpt_ds.errors import PathNotFound, UserError

# ChatML markers double as the special tokens of the default template (qwen/chatml).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def _iter_text_files(paths: Iterable[str]) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    yield line


def train_bpe_tokenizer(
    files: list[str] | None = None,
    texts: Iterable[str] | None = None,
    vocab_size: int = 2000,
    min_frequency: int = 2,
    output_dir: str | None = None,
    chat_template: str | None = None,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on text files (one document per line) and/or texts.

    Returns a transformers fast tokenizer with eos=<|endoftext|>, pad=<|pad|> and the ChatML
    markers as special tokens; saved to ``output_dir`` when given.
    """
    if not files and texts is None:
        raise ValueError("train_bpe_tokenizer needs files or texts")
    corpus: list[Iterable[str]] = []
    if files:
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise PathNotFound(f"tokenizer corpus file not found: {missing[0]}")
        corpus.append(_iter_text_files(files))
    if texts is not None:
        corpus.append(texts)

    def all_text() -> Iterator[str]:
        for it in corpus:
            yield from it

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(all_text(), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=model_max_length,
    )
    if chat_template:
        hf.chat_template = chat_template
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        hf.save_pretrained(output_dir)
    return hf


# ---------------------------------------------------------------------------------------------
# SentencePiece: training, extending a base tokenizer with domain vocabulary, resizing embeddings
# ---------------------------------------------------------------------------------------------

SP_SPECIAL = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
SP_USER_SYMBOLS = ("<|im_start|>", "<|im_end|>")


def _train_sp_model(sentences: Iterable[str], vocab_size: int, model_type: str, *,
                    character_coverage: float, byte_fallback: bool, user_symbols: Iterable[str] = (),
                    with_specials: bool = True, max_sentence_length: int = 16384) -> bytes:
    """Train a SentencePiece model in memory; returns the serialized ModelProto."""
    import io

    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    sentences = list(sentences)
    if not sentences:
        raise UserError("the tokenizer corpus is empty")
    buf = io.BytesIO()
    ids = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3} if with_specials else \
        {"unk_id": 0, "bos_id": -1, "eos_id": -1, "pad_id": -1}
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, byte_fallback=byte_fallback, split_digits=True,
            user_defined_symbols=list(user_symbols), max_sentence_length=max_sentence_length,
            # Keep text as written (no NFKC folding, no whitespace squeezing, no dummy prefix
            # space): the tokenizer must round-trip code, tables and indented answers.
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, num_threads=os.cpu_count() or 1, minloglevel=2,
            hard_vocab_limit=False, **ids)
    except RuntimeError as e:  # SentencePiece's messages carry the reason after its source location
        raise UserError(f"SentencePiece training failed: {str(e).split('] ')[-1]}") from None
    return buf.getvalue()


def _hf_from_sp(model_bytes: bytes, config: dict, chat_template: str | None = None,
                output_dir: str | None = None):
    """A transformers tokenizer from a SentencePiece model and a tokenizer_config (transformers
    converts it to a fast tokenizer). With ``output_dir`` it is saved there, with the raw model as
    tokenizer.model."""
    import json
    import shutil
    import tempfile

    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from transformers import AutoTokenizer

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": False,
              # Whether a space is prepended is the model's own setting, not the converter's guess.
              "add_prefix_space": proto.normalizer_spec.add_dummy_prefix, **config}
    with tempfile.TemporaryDirectory() as work:  # fresh: a stale tokenizer.json would win
        with open(os.path.join(work, "tokenizer.model"), "wb") as f:
            f.write(model_bytes)
        if proto.trainer_spec.model_type == sp_pb2.TrainerSpec.UNIGRAM:
            # transformers' Llama converter assumes BPE merges: build the unigram model directly.
            tok = _unigram_from_sp(proto, config)
        else:
            with open(os.path.join(work, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump(config, f)
            tok = AutoTokenizer.from_pretrained(work)
        if chat_template:
            tok.chat_template = chat_template
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            tok.save_pretrained(output_dir)
            shutil.copy2(os.path.join(work, "tokenizer.model"), os.path.join(output_dir, "tokenizer.model"))
    return tok


def _unigram_from_sp(proto, config: dict):
    from tokenizers import Tokenizer, normalizers
    from tokenizers.models import Unigram
    from transformers.convert_slow_tokenizer import SpmConverter

    normal = (proto.SentencePiece.NORMAL, proto.SentencePiece.BYTE)
    # Control/unknown pieces must never be chosen by the model (SentencePiece never emits them).
    vocab = [(p.piece, p.score if p.type in normal else -1e9) for p in proto.pieces]
    tk = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if not isinstance(tk, Tokenizer) or not isinstance(tk.model, Unigram):
        raise ValueError("could not convert the SentencePiece unigram model")
    if proto.normalizer_spec.add_dummy_prefix:
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    kw = {k: v for k, v in config.items() if k in ("bos_token", "eos_token", "unk_token", "pad_token",
                                                   "model_max_length", "additional_special_tokens")}
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kw)


def train_sentencepiece_tokenizer(
    files: list[str] | None = None,
    texts: Iterable[str] | None = None,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    output_dir: str | None = None,
    chat_template: str | None = None,
    model_max_length: int = 2048,
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
):
    """Train a SentencePiece (BPE or unigram) tokenizer, LLaMA-style: <unk>=0, <s>=1, </s>=2,
    <pad>=3, byte fallback (no <unk> on unseen characters), digits split, text kept verbatim, the
    ChatML markers as single tokens. Returns a transformers tokenizer; with ``output_dir`` it is
    saved there together with the raw ``tokenizer.model``.
    """
    if not files and texts is None:
        raise ValueError("train_sentencepiece_tokenizer needs files or texts")
    if files:
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise PathNotFound(f"tokenizer corpus file not found: {missing[0]}")

    def all_text() -> Iterator[str]:
        if files:
            yield from _iter_text_files(files)
        if texts is not None:
            yield from (t for t in texts if t.strip())

    model = _train_sp_model(all_text(), vocab_size, model_type, character_coverage=character_coverage,
                            byte_fallback=byte_fallback, user_symbols=SP_USER_SYMBOLS)
    config = {"bos_token": SP_SPECIAL["bos"], "eos_token": SP_SPECIAL["eos"], "unk_token": SP_SPECIAL["unk"],
              "pad_token": SP_SPECIAL["pad"], "add_bos_token": False, "add_eos_token": False,
              "model_max_length": model_max_length, "additional_special_tokens": list(SP_USER_SYMBOLS)}
    return _hf_from_sp(model, config, chat_template, output_dir)


def _has_non_ascii(s: str) -> bool:
    return any(ord(c) > 127 for c in s)


def extend_tokenizer(
    base_dir: str,
    output_dir: str,
    *,
    domain_files: list[str] | None = None,
    domain_texts: Iterable[str] | None = None,
    sp_model: str | None = None,
    vocab_size: int = 20000,
    model_type: str = "bpe",
    min_piece_length: int = 2,
    max_new_tokens: int | None = None,
    ascii_pieces: bool = False,
    log=print,
) -> tuple[Any, dict]:
    """Add domain vocabulary to a base tokenizer (MedicalGPT's tokenizer-extension step).

    Domain pieces come from ``sp_model`` (a trained SentencePiece model) or from a SentencePiece
    model trained here on ``domain_files``/``domain_texts`` (``vocab_size`` pieces). Two ways in:

    * the base is SentencePiece (its folder has ``tokenizer.model``): new pieces are appended to
      its ModelProto (score 0, like MedicalGPT's merge_tokenizers.py) and the merged model is the
      new tokenizer; old ids keep their meaning.
    * otherwise (byte-level BPE: Qwen, Llama-3, ...): new pieces become added tokens, matched
      before the BPE. Only pieces with a non-ASCII character (Chinese terms, symbols) are added
      by default: ASCII words would lose the space they are glued to.

    Added tokens shorter than ``min_piece_length`` or already one token are skipped (SentencePiece
    merges keep every piece: BPE builds long pieces from short ones). Old ids are kept,
    new ids follow, so embeddings only grow (see ``resize_embeddings_for``). Returns
    (tokenizer, report) and writes both to ``output_dir`` (report: extend_report.json).
    """
    import json

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from transformers import AddedToken, AutoTokenizer

    base = AutoTokenizer.from_pretrained(base_dir)
    base_vocab = len(base)
    sample = []
    if sp_model is not None:
        with open(sp_model, "rb") as f:
            domain_bytes = f.read()
    else:
        if not domain_files and domain_texts is None:
            raise ValueError("extend_tokenizer needs domain_files/domain_texts or sp_model")
        missing = [p for p in (domain_files or []) if not os.path.isfile(p)]
        if missing:
            raise PathNotFound(f"domain corpus file not found: {missing[0]}")
        corpus = list(_iter_text_files(domain_files or [])) + [t for t in (domain_texts or []) if t.strip()]
        sample = corpus[:2000]
        domain_bytes = _train_sp_model(corpus, vocab_size, model_type, character_coverage=0.9995,
                                       byte_fallback=False, with_specials=False)
    domain = sp_pb2.ModelProto()
    domain.ParseFromString(domain_bytes)
    normal = sp_pb2.ModelProto.SentencePiece.NORMAL
    pieces = [p.piece for p in domain.pieces if p.type == normal]

    base_sp = os.path.join(base_dir, "tokenizer.model")
    mode = "sentencepiece" if os.path.isfile(base_sp) else "added_tokens"
    candidates, seen = [], set()
    for piece in pieces:
        text = piece.replace("▁", " ") if mode == "added_tokens" else piece
        key = text.strip() if mode == "added_tokens" else piece
        # SentencePiece BPE only reaches a long piece through its shorter ones: merge them all.
        shortest = min_piece_length if mode == "added_tokens" else 1
        if len(key) < shortest or key in seen or not key.strip():
            continue
        if mode == "added_tokens" and not ascii_pieces and not _has_non_ascii(key):
            continue
        seen.add(key)
        candidates.append(key)

    os.makedirs(output_dir, exist_ok=True)
    if mode == "sentencepiece":
        proto = sp_pb2.ModelProto()
        with open(base_sp, "rb") as f:
            proto.ParseFromString(f.read())
        have = {p.piece for p in proto.pieces}
        new = [p for p in candidates if p not in have][:max_new_tokens]
        for piece in new:
            proto.pieces.add(piece=piece, score=0.0)
        base_config = {}
        cfg_path = os.path.join(base_dir, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                base_config = {k: v for k, v in json.load(f).items() if k != "added_tokens_decoder"}
        spm.SentencePieceProcessor(model_proto=proto.SerializeToString())  # the merged model must load
        tok = _hf_from_sp(proto.SerializeToString(), base_config, base.chat_template, output_dir)
        added = len(tok) - base_vocab
    else:
        tok = AutoTokenizer.from_pretrained(base_dir)  # `base` stays as it was, for the report
        new = [p for p in candidates if len(base.tokenize(p)) > 1][:max_new_tokens]
        added = tok.add_tokens([AddedToken(p, normalized=False) for p in new])
        tok.save_pretrained(output_dir)

    report = {"mode": mode, "base_vocab": base_vocab, "domain_pieces": len(pieces),
              "candidates": len(candidates), "added": added, "new_vocab": len(tok)}
    if sample:
        before = sum(len(base(t, add_special_tokens=False)["input_ids"]) for t in sample)
        after = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in sample)
        chars = sum(len(t) for t in sample)
        report.update(sample_docs=len(sample), tokens_before=before, tokens_after=after,
                      chars_per_token_before=round(chars / max(before, 1), 3),
                      chars_per_token_after=round(chars / max(after, 1), 3))
    with open(os.path.join(output_dir, "extend_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    log(f"extended {base_dir} ({mode}): +{added} tokens, vocab {base_vocab} -> {len(tok)}"
        + (f"; domain sample {report['tokens_before']} -> {report['tokens_after']} tokens" if sample else ""))
    return tok, report


def resize_embeddings_for(model, tokenizer, base_tokenizer=None, pad_to_multiple_of: int | None = None) -> dict:
    """Grow the model's input (and untied output) embeddings to ``len(tokenizer)``.

    Call it when training starts from an extended tokenizer, BEFORE deepspeed.initialize (and not
    under zero.Init: partitioned ZeRO-3 weights cannot be resized in place). Never shrinks: many
    checkpoints pad the vocabulary beyond the tokenizer. New rows start as the mean of the
    embeddings of the pieces ``base_tokenizer`` splits the new token into (the model then reads a
    new medical term roughly as it read its pieces); without ``base_tokenizer``, transformers'
    mean initialization. Returns {"old", "new", "from_pieces"}.
    """
    import torch

    emb = model.get_input_embeddings()
    if hasattr(emb.weight, "ds_id"):
        raise RuntimeError("resize_embeddings_for: the embeddings are ZeRO-3 partitioned; resize before "
                           "deepspeed.initialize / outside deepspeed.zero.Init")
    old, want = emb.weight.shape[0], len(tokenizer)
    if want <= old:
        return {"old": old, "new": old, "from_pieces": 0}
    model.resize_token_embeddings(want, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=True)
    new_rows = model.get_input_embeddings().weight.shape[0]
    from_pieces = 0
    if base_tokenizer is not None:
        inp = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        out_w = out.weight if out is not None and out.weight is not inp else None
        with torch.no_grad():
            for i in range(old, want):
                text = tokenizer.decode([i])
                ids = [j for j in base_tokenizer(text, add_special_tokens=False)["input_ids"] if j < old]
                if not ids:
                    continue
                inp[i] = inp[ids].mean(0)
                if out_w is not None:
                    out_w[i] = out_w[ids].mean(0)
                from_pieces += 1
    return {"old": old, "new": new_rows, "from_pieces": from_pieces}
