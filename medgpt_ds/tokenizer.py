"""Tokenizer training: the from-scratch path (a byte-level BPE trained on a corpus).

Byte-level BPE never produces <unk> and round-trips any text, including Chinese, so a tokenizer
trained on a small corpus still encodes every user prompt.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

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
            raise FileNotFoundError(f"tokenizer corpus file not found: {missing[0]}")
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
