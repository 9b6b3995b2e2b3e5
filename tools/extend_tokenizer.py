#!/usr/bin/env python
"""Add domain vocabulary to a base tokenizer (MedicalGPT's tokenizer-extension step).

    python tools/extend_tokenizer.py --base_tokenizer models/Qwen2.5-0.5B --domain_corpus data/pretrain \
        --output_dir tokenizers/qwen-med --vocab_size 20000
    python tools/extend_tokenizer.py --base_tokenizer models/llama-2-7b --domain_sp_model med_sp.model --output_dir ...

A SentencePiece model is trained on the domain corpus (or given with --domain_sp_model). For a
SentencePiece base (tokenizer.model) its pieces are merged into the base model (MedicalGPT's
merge_tokenizers.py); for a byte-level BPE base they become added tokens. Old ids keep their
meaning; new ids follow. Train from the result with --tokenizer_name_or_path: the trainer grows the
embeddings (medgpt_ds.tokenizer.resize_embeddings_for). Prints the counts and the token savings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medgpt_ds.errors import PathNotFound, main_boundary  # noqa: E402


@main_boundary
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base_tokenizer", required=True, help="folder of the base model's tokenizer")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--domain_corpus", nargs="+", help="files or folders of domain text (any pt format)")
    src.add_argument("--domain_sp_model", help="a trained SentencePiece model of the domain")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--vocab_size", type=int, default=20000, help="size of the domain SentencePiece model")
    ap.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"])
    ap.add_argument("--max_new_tokens", type=int, default=None)
    ap.add_argument("--min_piece_length", type=int, default=2, help="shortest added token (BPE bases)")
    ap.add_argument("--ascii_pieces", action="store_true",
                    help="also add pure-ASCII pieces to a byte-level BPE base (off: they lose their space)")
    ap.add_argument("--max_docs", type=int, default=None)
    args = ap.parse_args(argv)

    from medgpt_ds.tokenizer import extend_tokenizer

    if not os.path.isdir(args.base_tokenizer):
        raise PathNotFound(f"base tokenizer folder not found: {args.base_tokenizer}")
    docs = None
    if args.domain_corpus:
        from train_tokenizer import read_corpus

        docs = read_corpus(args.domain_corpus, args.max_docs)
    _, report = extend_tokenizer(args.base_tokenizer, args.output_dir, domain_texts=docs,
                                 sp_model=args.domain_sp_model, vocab_size=args.vocab_size,
                                 model_type=args.model_type, min_piece_length=args.min_piece_length,
                                 max_new_tokens=args.max_new_tokens, ascii_pieces=args.ascii_pieces,
                                 log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(report, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
