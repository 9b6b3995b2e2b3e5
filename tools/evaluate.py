r"""Evaluate a trained model: perplexity, multiple-choice accuracy, reward-model pairwise accuracy and
generation samples, written as report.json + report.md (+ report.png with matplotlib).

    python tools/evaluate.py --model_name_or_path outputs/sft --output_dir outputs/eval \
        --ppl_files data/demo/pretrain --mc_files cmexam_dev.jsonl --prompt_files data/demo/grpo
    python tools/evaluate.py --reward_model_name_or_path outputs/rm --preference_files data/demo/reward \
        --output_dir outputs/eval_rm
    torchrun --nproc_per_node 8 tools/evaluate.py ...        # or: deepspeed --num_gpus 8 tools/evaluate.py ...

Inputs: --ppl_files .txt (one document per line) / jsonl with "text"; --mc_files jsonl (or json list)
of {"question", "options": {"A": ...} or [...], "answer": "B"}; --preference_files in any preference
format training reads (MedicalGPT conversations/chosen/rejected, TRL prompt/chosen/rejected);
--prompt_files in any prompt format (question/answer, prompt/answer, sft conversations).
Across ranks each file's records are split (rank r takes r, r + world, ...) and rank 0 writes the
report; the numbers are the same for any number of ranks.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import AutoModelForSequenceClassification

from medgpt_ds import dist
from medgpt_ds.data.formats import DEFAULT_EXTS, RECORD_EXTS, find_files, load_records
from medgpt_ds.data.templates import get_chat_template
from medgpt_ds.errors import main_boundary
from medgpt_ds.evaluation import (
    MC_INSTRUCTION,
    generation_samples,
    multiple_choice,
    perplexity,
    reward_pairwise,
    write_report,
)
from medgpt_ds.inference import (
    add_generation_args,
    add_model_args,
    generation_config,
    init_ranks,
    load_chat_tokenizer,
    load_from_args,
    pick_device,
    pick_dtype,
    read_jsonl,
)
from medgpt_ds.model import check_inference_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_generation_args(p, max_new_tokens=256)
    g = p.add_argument_group("evaluation")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--ppl_files", nargs="+", default=[], help="text files or dirs for perplexity")
    g.add_argument("--mc_files", nargs="+", default=[], help="multiple-choice jsonl files")
    g.add_argument("--preference_files", nargs="+", default=[], help="preference files or dirs (reward model)")
    g.add_argument("--prompt_files", nargs="+", default=[], help="prompt files or dirs for generation samples")
    g.add_argument("--reward_model_name_or_path", help="reward model (AutoModelForSequenceClassification, "
                   "num_labels=1) for --preference_files")
    g.add_argument("--num_samples", type=int, default=8, help="generation samples taken from --prompt_files")
    g.add_argument("--max_samples", type=int, default=None, help="use at most this many records per file")
    g.add_argument("--max_length", type=int, default=1024, help="perplexity window / reward-model sequence length")
    g.add_argument("--batch_size", type=int, default=8)
    g.add_argument("--mc_instruction", default=MC_INSTRUCTION, help="line appended after the options")
    args = p.parse_args(argv)
    if not (args.ppl_files or args.mc_files or args.preference_files or args.prompt_files):
        p.error("nothing to evaluate: pass --ppl_files, --mc_files, --preference_files and/or --prompt_files")
    if (args.ppl_files or args.mc_files or args.prompt_files) and not (args.model_name_or_path or args.adapter_name_or_path):
        p.error("--ppl_files/--mc_files/--prompt_files need --model_name_or_path")
    if args.preference_files and not args.reward_model_name_or_path:
        p.error("--preference_files need --reward_model_name_or_path")
    return args


def _records(path: str, kind: str, max_samples: int | None) -> list[dict]:
    quiet = print if dist.is_main() else (lambda *a, **k: None)
    # pt text may be .txt; every other kind reads records (a .txt beside them is named as skipped)
    files = find_files(path, DEFAULT_EXTS if kind == "pt" else RECORD_EXTS, log=quiet)
    return load_records(files, kind, max_samples=max_samples, log=quiet)


def _mc_records(path: str, max_samples: int | None) -> list[dict]:
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        rows = rows.get("data", rows) if isinstance(rows, dict) else rows
    else:
        rows = read_jsonl(path)
    return rows[:max_samples] if max_samples else rows


def load_reward_model(path: str, dtype: str, device: str, trust_remote_code: bool, template_name: str | None):
    dev = pick_device(device)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=pick_dtype(dtype, dev), trust_remote_code=trust_remote_code)
    tok = load_chat_tokenizer(path, template_name, trust_remote_code)
    return model.to(dev).eval(), tok, get_chat_template(None, tok)


@main_boundary
def main(argv: list[str] | None = None) -> dict | None:
    """Run the evaluation; the report on rank 0 (None elsewhere), 2 after a user error's one line."""
    args = parse_args(argv)
    _, world = init_ranks()
    report: dict = {"world_size": world, "settings": {"max_length": args.max_length, "batch_size": args.batch_size,
                                                       "mc_instruction": args.mc_instruction}}
    if args.ppl_files or args.mc_files or args.prompt_files:
        check_inference_model(args)
        chat = load_from_args(args)
        report["model"] = args.adapter_name_or_path or args.model_name_or_path
        report["perplexity"] = []
        for path in args.ppl_files:
            texts = [r["text"] for r in _records(path, "pt", args.max_samples)]
            res = perplexity(chat.model, chat.tokenizer, texts, args.max_length, args.batch_size)
            if res is not None:
                report["perplexity"].append({"file": path, **res})
                dist.print0(f"[eval] perplexity {path}: {res['perplexity']:.4f} ({res['tokens']} tokens)")
        report["multiple_choice"] = []
        for path in args.mc_files:
            res = multiple_choice(chat, _mc_records(path, args.max_samples), args.batch_size, args.mc_instruction,
                                  args.system_prompt, source=path)
            if res is not None:
                report["multiple_choice"].append({"file": path, **res})
                dist.print0(f"[eval] multiple choice {path}: accuracy {res['accuracy']:.4f} "
                            f"({res['correct']}/{res['total']})")
        samples = []
        for path in args.prompt_files:
            recs = _records(path, "prompt", args.num_samples)
            if args.system_prompt:
                recs = [{**r, "prompt": [{"role": "system", "content": args.system_prompt}, *r["prompt"]]}
                        if r["prompt"][0]["role"] != "system" else r for r in recs]
            res = generation_samples(chat, recs, generation_config(args), args.batch_size)
            if res is not None:
                samples += [{"file": path, **s} for s in res]
        report["samples"] = samples
        del chat
    if args.preference_files:
        model, tok, template = load_reward_model(args.reward_model_name_or_path, args.dtype, args.device,
                                                 args.trust_remote_code, args.template_name)
        report["reward_model"] = args.reward_model_name_or_path
        report["reward_pairwise"] = []
        for path in args.preference_files:
            res = reward_pairwise(model, tok, template, _records(path, "preference", args.max_samples),
                                  args.batch_size, args.max_length)
            if res is not None:
                report["reward_pairwise"].append({"file": path, **res})
                dist.print0(f"[eval] reward pairwise {path}: accuracy {res['accuracy']:.4f} "
                            f"({res['correct']}/{res['total']})")
    if not dist.is_main():
        return None
    report.setdefault("model", report.get("reward_model"))
    paths = write_report(report, args.output_dir)
    print("[eval] wrote " + ", ".join(paths.values()), flush=True)
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
