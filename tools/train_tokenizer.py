#!/usr/bin/env python
"""Train a tokenizer from a corpus (the from-scratch path): byte-level BPE or SentencePiece.

    python tools/train_tokenizer.py --corpus data/pretrain --output_dir tokenizers/med-bpe --vocab_size 32000
    python tools/train_tokenizer.py --corpus data/pretrain --type sentencepiece --output_dir tokenizers/med-sp

--corpus takes files or folders (.txt one document per line, .jsonl/.json/.parquet with a text
field; whatever `--stage pt` reads). The chat template (--template_name, default chatml) is stored
in the tokenizer, so training and inference render conversations identically. Prints vocabulary
size, characters per token and a decode round-trip check on the corpus.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medgpt_ds.errors import main_boundary  # noqa: E402


def read_corpus(paths: list[str], max_docs: int | None = None) -> list[str]:
    """Documents from files/folders in any pt format, via the trainer's own reader."""
    from medgpt_ds.data.formats import find_files, load_records

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    files = [f for p in paths for f in find_files(p, log=log)]  # other files in a folder are named as skipped
    return [r["text"] for r in load_records(files, "pt", max_samples=max_docs, log=log)]


def corpus_stats(tok, docs: list[str], n: int = 1000) -> dict:
    sample = docs[:n]
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in sample]
    tokens = sum(len(i) for i in ids)
    exact = sum(tok.decode(i) == d for i, d in zip(ids, sample))
    unk = tok.unk_token_id
    return {"vocab_size": len(tok), "docs_checked": len(sample), "chars_per_token": round(
        sum(len(d) for d in sample) / max(tokens, 1), 3), "round_trip_exact": f"{exact}/{len(sample)}",
        "unk_tokens": sum(i.count(unk) for i in ids) if unk is not None else 0}


@main_boundary
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", nargs="+", required=True, help="files or folders")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--type", default="bpe", choices=["bpe", "sentencepiece", "unigram"],
                    help="bpe: byte-level BPE (tokenizers); sentencepiece: SentencePiece BPE; unigram: SentencePiece unigram")
    ap.add_argument("--vocab_size", type=int, default=32000)
    ap.add_argument("--min_frequency", type=int, default=2, help="byte-level BPE only")
    ap.add_argument("--template_name", default="chatml", help="chat template stored in the tokenizer ('none': none)")
    ap.add_argument("--model_max_length", type=int, default=4096)
    ap.add_argument("--max_docs", type=int, default=None)
    args = ap.parse_args(argv)

    from medgpt_ds.tokenizer import train_bpe_tokenizer, train_sentencepiece_tokenizer

    docs = read_corpus(args.corpus, args.max_docs)
    template = None
    if args.template_name and args.template_name != "none":
        from medgpt_ds.data.templates import get_chat_template

        template = get_chat_template(args.template_name, None)
    if args.type == "bpe":
        tok = train_bpe_tokenizer(texts=docs, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                                  output_dir=args.output_dir, chat_template=template,
                                  model_max_length=args.model_max_length)
    else:
        tok = train_sentencepiece_tokenizer(
            texts=docs, vocab_size=args.vocab_size, model_type="bpe" if args.type == "sentencepiece" else "unigram",
            output_dir=args.output_dir, chat_template=template, model_max_length=args.model_max_length)
    stats = corpus_stats(tok, docs)
    stats.update(type=args.type, documents=len(docs), output_dir=args.output_dir)
    print(json.dumps(stats, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
