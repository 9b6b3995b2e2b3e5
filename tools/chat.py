"""Talk to a trained model: interactive multi-turn chat with streamed tokens, or batch inference.

    # interactive (commands: /clear resets the conversation, /exit or Ctrl-D quits)
    python tools/chat.py --model_name_or_path outputs/sft
    # one question, answer streamed, then exit
    python tools/chat.py --model_name_or_path outputs/sft --prompt "What are the symptoms of influenza?"
    python tools/chat.py --model_name_or_path Qwen/Qwen2.5-0.5B --adapter_name_or_path outputs/sft_lora

    # batch: one chat per jsonl row (messages / conversations / prompt / question / instruction),
    # answers written in input order as the row plus "response"; a plain-text file (one question a
    # line) gives MedicalGPT's {"Input": question, "Output": answer} rows
    python tools/chat.py --model_name_or_path outputs/sft --input_file q.jsonl --output_file a.jsonl
    # MedicalGPT's demo/inference.py flags work as they are
    python tools/chat.py --base_model Qwen/Qwen2.5-0.5B --lora_model outputs/sft_lora --interactive
    python tools/chat.py --base_model outputs/sft --data_file questions.txt --predictions_file answers.jsonl
    torchrun --nproc_per_node 8 tools/chat.py ... --input_file q.jsonl --output_file a.jsonl   # split over ranks

The prompt is rendered with the tokenizer's chat template (the one training exported), so the model
sees exactly the format it was trained on.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medgpt_ds.errors import UserError, main_boundary
from medgpt_ds.inference import (
    add_generation_args,
    add_model_args,
    generation_config,
    init_ranks,
    load_from_args,
    read_prompt_file,
    record_to_messages,
    shard_map,
)
from medgpt_ds.model import check_inference_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_generation_args(p)
    p.add_argument("--prompt", help="ask this one question (answer streamed to stdout) and exit")
    p.add_argument("--interactive", action="store_true",
                   help="multi-turn chat in the terminal (the default without --input_file or --prompt)")
    p.add_argument("--single_turn", "--single_tune", dest="single_turn", action="store_true",
                   help="interactive chat without history: each question is asked alone (MedicalGPT's --single_tune)")
    g = p.add_argument_group("batch mode")
    g.add_argument("--input_file", "--data_file", dest="input_file",
                   help="prompts: jsonl, or plain text with one question a line (MedicalGPT's --data_file); "
                        "without it the chat is interactive")
    g.add_argument("--output_file", "--predictions_file", dest="output_file",
                   help="jsonl of answers (default: stdout)")
    g.add_argument("--batch_size", "--eval_batch_size", dest="batch_size", type=int, default=8,
                   help="chats per generate call on each rank")
    args = p.parse_args(argv)
    if args.output_file and not args.input_file:
        p.error("--output_file (--predictions_file) needs --input_file (--data_file)")
    if args.prompt is not None and args.input_file:
        p.error("--prompt and --input_file exclude each other")
    if args.interactive and (args.input_file or args.prompt is not None):
        p.error("--interactive excludes --input_file (--data_file) and --prompt")
    if args.model_name_or_path is None and args.adapter_name_or_path is None:
        p.error("pass --model_name_or_path (MedicalGPT: --base_model)")
    return args


def answer(chat, cfg, history: list[dict[str, str]]) -> str:
    """Stream one answer to stdout after "Assistant: "; Ctrl-C stops it and keeps what was said."""
    print("Assistant: ", end="", flush=True)
    text = ""
    try:
        for piece in chat.stream(history, cfg):
            text += piece
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        print(" [interrupted]", end="")
    print(flush=True)
    return text


def interactive(chat, cfg, system_prompt: str | None, single_turn: bool = False) -> None:
    print(f"medgpt-ds chat with {chat.name}: /clear resets the conversation, /exit quits.", flush=True)
    history: list[dict[str, str]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    while True:
        try:
            query = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not query:
            continue
        if query in ("/exit", "/quit", "exit", "quit"):
            return
        if query in ("/clear", "clear"):
            history = history[:1] if system_prompt else []
            print("(conversation cleared)", flush=True)
            continue
        if single_turn:
            history = history[:1] if system_prompt else []
        history.append({"role": "user", "content": query})
        history.append({"role": "assistant", "content": answer(chat, cfg, history)})


def batch(chat, cfg, args) -> None:
    rows, plain = read_prompt_file(args.input_file)
    chats = [record_to_messages(r, args.system_prompt) for r in rows]  # errors surface before generating
    done = shard_map(lambda part: chat.generate(part, cfg), chats, args.batch_size)
    if done is None:  # not rank 0
        return
    with open(args.output_file, "w", encoding="utf-8") if args.output_file else contextlib.nullcontext(sys.stdout) as out:
        for row, c in zip(rows, done):
            # plain-text questions: MedicalGPT's predictions layout; jsonl: the row plus its answer
            result = {"Input": row["question"], "Output": c.text} if plain else {**row, "response": c.text}
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
    if args.output_file:
        print(f"wrote {len(done)} answers to {args.output_file}", file=sys.stderr)


@main_boundary
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_inference_model(args)
    _, world = init_ranks()
    if args.input_file is None and world > 1:
        raise UserError("interactive chat and --prompt run on one rank; launch several ranks only with --input_file")
    chat = load_from_args(args)
    cfg = generation_config(args)
    if args.input_file:
        batch(chat, cfg, args)
    elif args.prompt is not None:
        history = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        print(f"User: {args.prompt}", flush=True)
        answer(chat, cfg, [*history, {"role": "user", "content": args.prompt}])
    else:
        interactive(chat, cfg, args.system_prompt, args.single_turn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
