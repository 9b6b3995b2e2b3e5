#!/usr/bin/env python
"""dpo against TRL's DPOTrainer, fair and interleaved (not a test).

    python bench/bench_preference.py                        # writes bench/results/dpo_peers.json
    python bench/bench_preference.py --nproc 2 --zero zero3 --groups live-gc_off --rounds 3

Both sides train the same saved random-init Llama on the same pairs (MedicalGPT's
reward/dpo_zh_500.jsonl, only pairs whose prompt and answers fit --max_source/target_length, so
nothing is truncated), with the same DeepSpeed JSON (torch AdamW pinned), micro batch of pairs,
precision (fp32 on CPU), gradient checkpointing (both off or both on), sdpa attention, sigmoid loss,
beta 0.1, learning rate and constant schedule, and the same reference handling:

  live         a frozen reference model forwarded every step (ours: --reference model)
  precomputed  reference log-probs computed once before training (ours: --reference precomputed;
               TRL: precompute_ref_log_probs); the precompute pass is not in the per-step figure

Figure per run: median over the steps after --warmup of (real tokens of the step / its time), real
tokens = non-pad tokens forwarded (prompt + chosen + prompt + rejected). Sides alternate A B A B;
the result is the median per-round ratio ours / TRL with its spread.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (PAIRS_SAMPLE, ROOT, bench_ds_config, bench_env, interleave, launcher, median_after, run,  # noqa: E402
                    step_clock, tagged_json, write_result)

GROUPS = {"live-gc_off": ("live", False), "live-gc_on": ("live", True), "precomputed-gc_off": ("precomputed", False),
          "precomputed-gc_on": ("precomputed", True)}


def make_workspace(wd: str, a) -> dict:
    """Tokenizer + random-init Llama (saved), the fitting pairs in our and TRL's formats."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from medgpt_ds.data.formats import load_records
    from medgpt_ds.data.templates import TEMPLATES, encode_preference
    from medgpt_ds.tokenizer import train_bpe_tokenizer

    if os.path.exists(PAIRS_SAMPLE) and not a.synthetic:
        recs = load_records([PAIRS_SAMPLE], "preference", log=lambda *x: None)
    else:
        rng = random.Random(0)
        words = "fever cough headache patient doctor infection virus treatment dose tablet blood pressure heart lung pain".split()
        recs = [{"prompt": [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))}],
                 "chosen": " ".join(rng.choice(words) for _ in range(rng.randint(40, 150))),
                 "rejected": " ".join(rng.choice(words) for _ in range(rng.randint(40, 150)))} for _ in range(400)]
    texts = [m["content"] for r in recs for m in r["prompt"]] + [r["chosen"] for r in recs] + [r["rejected"] for r in recs]
    base = os.path.join(wd, "base")
    tok = train_bpe_tokenizer(texts=texts, vocab_size=4000, output_dir=base, chat_template=TEMPLATES["qwen"])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4, num_hidden_layers=a.layers,
                      num_attention_heads=max(1, a.hidden // 64), num_key_value_heads=max(1, a.hidden // 128),
                      max_position_embeddings=4096, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(base)
    keep, tokens = [], 0
    for r in recs:
        e = encode_preference(tok, tok.chat_template, r["prompt"], r["chosen"], r["rejected"], 10**6, 10**6)
        if len(e["prompt_ids"]) <= a.max_source_length and max(len(e["chosen_ids"]), len(e["rejected_ids"])) <= a.max_target_length:
            keep.append(r)
            tokens += 2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
    pairs, trl = os.path.join(wd, "pairs.jsonl"), os.path.join(wd, "trl.jsonl")
    with open(pairs, "w") as f1, open(trl, "w") as f2:
        for r in keep:
            f1.write(json.dumps(r, ensure_ascii=False) + "\n")
            f2.write(json.dumps({"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                 "rejected": [{"role": "assistant", "content": r["rejected"]}]}, ensure_ascii=False) + "\n")
    print(f"data: {len(keep)} of {len(recs)} pairs fit {a.max_source_length}/{a.max_target_length} tokens; "
          f"{tokens / len(keep):.0f} real tokens per pair", flush=True)
    return {"base": base, "pairs": pairs, "trl": trl, "n_pairs": len(keep), "tokens_per_pair": tokens / len(keep),
            "deepspeed": bench_ds_config(os.path.join(wd, f"{a.zero}.json"), a.zero, cuda=torch.cuda.is_available())}


def run_ours(ws: dict, wd: str, a, reference: str, gc: bool, tag: str) -> dict:
    out = os.path.join(wd, f"ours_{tag}")
    shutil.rmtree(out, ignore_errors=True)  # logs/metrics.jsonl appends: a previous round's records would mix in
    cmd = launcher(a.nproc) + [
        os.path.join(ROOT, "launch", "train.py"), "--stage", "dpo", "--model_name_or_path", ws["base"],
        "--template_name", "qwen", "--train_file_dir", ws["pairs"], "--max_source_length", str(a.max_source_length),
        "--max_target_length", str(a.max_target_length), "--reference", "model" if reference == "live" else "precomputed",
        "--per_device_train_batch_size", str(a.batch), "--gradient_accumulation_steps", "1", "--max_steps", str(a.steps),
        "--logging_steps", "1", "--save_steps", "0", "--report_to", "none", "--learning_rate", "1e-5",
        "--lr_scheduler_type", "constant", "--gradient_checkpointing", str(gc), "--attn_implementation", "sdpa",
        "--deepspeed", ws["deepspeed"], "--output_dir", out, "--overwrite_output_dir", "--export_hf", "False"]
    r = run(cmd, bench_env(a.threads, **a.env), timeout=a.timeout)
    recs = [json.loads(line) for line in open(os.path.join(out, "logs", "metrics.jsonl"))]
    recs = [x for x in recs if x["split"] == "train"]
    return {"tokens_per_s": median_after([x["tokens_per_s"] for x in recs], a.warmup),
            "peak_rss_mib": r["peak_rss_mib"], "wall_s": round(r["wall_s"], 1)}


def run_trl(ws: dict, wd: str, a, reference: str, gc: bool, tag: str) -> dict:
    cmd = launcher(a.nproc) + [
        os.path.abspath(__file__), "--_trl_peer", "--base", ws["base"], "--data", ws["trl"],
        "--out", os.path.join(wd, f"trl_{tag}"), "--deepspeed", ws["deepspeed"], "--steps", str(a.steps),
        "--warmup", str(a.warmup), "--batch", str(a.batch), "--gc", str(int(gc)),
        "--max_source_length", str(a.max_source_length), "--max_target_length", str(a.max_target_length)]
    if reference == "precomputed":
        cmd.append("--precompute")
    r = run(cmd, bench_env(a.threads, **a.env), timeout=a.timeout)
    res = tagged_json(r["stdout"], "PEER_RESULT")
    res.update(peak_rss_mib=r["peak_rss_mib"], wall_s=round(r["wall_s"], 1))
    return res


def trl_peer(a) -> None:
    """TRL's DPOTrainer on the same model, pairs, batch and DeepSpeed config; prints PEER_RESULT."""
    if "RANK" not in os.environ:  # plain `python` (1 rank): DeepSpeed would otherwise try MPI discovery
        from medgpt_ds.dist import _free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    ds = datasets.load_dataset("json", data_files=a.data, split="train")
    tok = AutoTokenizer.from_pretrained(a.base)
    model = AutoModelForCausalLM.from_pretrained(a.base, attn_implementation="sdpa")
    cfg = DPOConfig(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                    learning_rate=1e-5, lr_scheduler_type="constant", beta=0.1, loss_type=["sigmoid"],
                    max_length=a.max_source_length + a.max_target_length + 16, precompute_ref_log_probs=a.precompute,
                    logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataset_num_proc=1,
                    bf16=False, fp16=False, gradient_checkpointing=bool(a.gc),  # TRL defaults differ: set explicitly
                    gradient_checkpointing_kwargs={"use_reentrant": False}, use_cpu=not torch.cuda.is_available(),
                    deepspeed=a.deepspeed)
    per_batch: list[int] = []
    clock, ends = step_clock()

    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[clock])
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        per_batch.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else
                         int((batch["input_ids"] != tok.pad_token_id).sum()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    from medgpt_ds.dist import unlink_cpu_shm_segment

    unlink_cpu_shm_segment()  # DeepSpeed (via the HF Trainer) leaves its CPU shm segments otherwise
    dts = [t1 - t0 for t0, t1 in zip(ends, ends[1:])]
    # the training batches are the last ones collated (precomputing the reference comes first);
    # accelerate prefetches one batch ahead, so drop the extra one at the end
    train_batches = per_batch[-(len(dts) + 1):-1] if len(per_batch) > len(dts) else per_batch[-len(dts):]
    tokens = torch.tensor(train_batches, dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tokens)  # real tokens of each step over all ranks
    rates = [n / t for n, t in zip(tokens.tolist(), dts)]
    if int(os.environ.get("RANK", "0")) == 0:
        print("PEER_RESULT " + json.dumps({"tokens_per_s": statistics.median(rates[a.warmup:] or rates)}), flush=True)


def peer_args():
    p = argparse.ArgumentParser()
    for k in ("--base", "--data", "--out", "--deepspeed"):
        p.add_argument(k, required=True)
    for k in ("--steps", "--warmup", "--batch", "--gc", "--max_source_length", "--max_target_length", "--local_rank"):
        p.add_argument(k, type=int, default=0)
    p.add_argument("--_trl_peer", action="store_true")
    p.add_argument("--precompute", action="store_true")
    return p.parse_args()


def main(argv=None) -> None:
    if "--_trl_peer" in sys.argv:  # this file launched again as the TRL peer
        return trl_peer(peer_args())
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", default="live-gc_off,live-gc_on,precomputed-gc_off", help=f"comma list of {', '.join(GROUPS)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--zero", default="zero2", help="ds_configs/<name>.json")
    ap.add_argument("--batch", type=int, default=4, help="pairs per micro batch per rank")
    ap.add_argument("--max_source_length", type=int, default=192)
    ap.add_argument("--max_target_length", type=int, default=320)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--synthetic", action="store_true", help="generated pairs even when the real sample is present")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per process on both sides (1 on a shared CPU machine; default: torch's)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--name", default="dpo_peers")
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
    a = ap.parse_args(argv)
    a.env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // a.nproc))} if a.nproc > 1 and not a.threads else {}
    wd = a.workdir or tempfile.mkdtemp(prefix="medgpt_bench_pref_")
    os.makedirs(wd, exist_ok=True)
    ws = make_workspace(wd, a)
    settings = {"model": f"llama hidden {a.hidden} x {a.layers} layers (random init, saved once, both sides load it)",
                "data": f"{os.path.basename(PAIRS_SAMPLE) if not a.synthetic else 'generated pairs'}: {ws['n_pairs']} pairs "
                        f"that fit {a.max_source_length}/{a.max_target_length} tokens, {ws['tokens_per_pair']:.0f} real "
                        "tokens per pair", "zero": f"{a.zero} (torch AdamW pinned)", "ranks": a.nproc,
                "micro batch": f"{a.batch} pairs", "grad_accum": 1, "precision": "fp32", "attention": "sdpa",
                "loss": "sigmoid, beta 0.1",
                "torch threads per process": a.threads or "torch default", "lr": "1e-5 constant", "steps": a.steps, "warmup_steps_excluded": a.warmup,
                "rounds": a.rounds}
    groups = a.groups.split(",")

    def save(comparisons: list) -> str:
        """Write the result so far (after each group: a stopped bench keeps what it measured)."""
        return write_result(a.name, {
            "title": "dpo vs TRL DPOTrainer", "kind": "peer_comparison",
            "command": "python bench/bench_preference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "settings": settings, "sides": {"medgpt-ds dpo": "launch/train.py --stage dpo",
                                            "TRL DPOTrainer": "DPOConfig, DeepSpeed through the HF Trainer"},
            "comparisons": comparisons, "complete": len(comparisons) == len(groups)})

    comparisons = []
    for group in groups:
        reference, gc = GROUPS[group]
        sides = {"medgpt-ds dpo": lambda r=reference, g=gc, t=group: run_ours(ws, wd, a, r, g, t),
                 "TRL DPOTrainer": lambda r=reference, g=gc, t=group: run_trl(ws, wd, a, r, g, t)}

        def show(name, i, res, group=group):
            print(f"[{group}] round {i + 1} {name}: {res if 'error' not in res else res['error'][-600:]}", flush=True)

        out = interleave(sides, a.rounds, "tokens_per_s", on_result=show)
        comparisons.append({"name": group, "metric": "real tokens/s (median per step)",
                            "settings": {"reference": reference, "gradient_checkpointing": f"{'on' if gc else 'off'} on "
                                                                                          "both sides"}, **out})
        for key, st in out["ratios"].items():
            if st["median"] is not None:
                print(f"[{group}] {key}: median {st['median']:.2f}x (min {st['min']:.2f}, max {st['max']:.2f})", flush=True)
        path = save(comparisons)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
