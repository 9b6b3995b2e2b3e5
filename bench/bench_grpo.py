#!/usr/bin/env python
"""grpo against TRL's GRPOTrainer, fair and interleaved (not a test).

    python bench/bench_grpo.py                      # writes bench/results/grpo_peers.json

Both sides: the same saved random-init Llama and tokenizer (ChatML template), the same prompts
(MedicalGPT's grpo/sample.jsonl questions that fit --max_prompt_tokens, so neither side truncates),
the same reward functions (medgpt_ds.rewards format + answer_normalized, weight 1 each; TRL gets
them wrapped), num_generations G, prompts per step (micro x grad_accum / G), max_new_tokens,
sampling (temperature 1, top_p 1, no top_k), beta (k3 KL to a frozen reference), loss type grpo,
epsilon 0.2, group-std scaling, one iteration, the same DeepSpeed JSON (ZeRO-3, torch AdamW pinned),
fp32, sdpa, gradient checkpointing off on both, one rank. Generation: ours the hybrid backend
(ZeRO-3 shards gathered once, KV-cached generate); TRL HF generate inside
unwrap_model_for_generation (its ZeRO-3 gather-once path, use_vllm=False).

Figure per run: median over steps after --warmup of generated tokens / step time (the gap between
consecutive step ends). Random-init models rarely emit eos, so both sides generate about
max_new_tokens per response; the mean response length of each side is recorded beside it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (ROOT, SHARED_DATA, bench_ds_config, bench_env, interleave, launcher, median_after, run,  # noqa: E402
                    step_clock, tagged_json, write_result)

GRPO_SAMPLE = os.path.join(SHARED_DATA, "grpo", "sample.jsonl")
REWARDS = "format,answer_normalized"


def make_workspace(wd: str, a) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from medgpt_ds.data.templates import TEMPLATES, encode_prompt
    from medgpt_ds.tokenizer import train_bpe_tokenizer

    src = GRPO_SAMPLE if os.path.exists(GRPO_SAMPLE) else os.path.join(ROOT, "data", "demo", "grpo", "train.jsonl")
    recs = [json.loads(line) for line in open(src, encoding="utf-8") if line.strip()]
    base = os.path.join(wd, "base")
    tok = train_bpe_tokenizer(texts=[r["question"] for r in recs] + [str(r.get("answer", "")) for r in recs],
                              vocab_size=4000, output_dir=base, chat_template=TEMPLATES["chatml"])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                      num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 64),
                      num_key_value_heads=max(1, a.hidden // 128), max_position_embeddings=2048,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(base)
    keep = [r for r in recs if len(encode_prompt(tok, tok.chat_template, [{"role": "user", "content": r["question"]}]))
            <= a.max_prompt_tokens]
    ours, trl = os.path.join(wd, "prompts.jsonl"), os.path.join(wd, "trl_prompts.jsonl")
    with open(ours, "w") as f1, open(trl, "w") as f2:
        for r in keep:
            f1.write(json.dumps({"question": r["question"], "answer": str(r["answer"])}, ensure_ascii=False) + "\n")
            f2.write(json.dumps({"prompt": [{"role": "user", "content": r["question"]}], "answer": str(r["answer"])},
                                ensure_ascii=False) + "\n")
    print(f"prompts: {len(keep)} of {len(recs)} fit {a.max_prompt_tokens} tokens", flush=True)
    ds = bench_ds_config(os.path.join(wd, f"{a.zero}.json"), a.zero, cuda=torch.cuda.is_available())
    return {"base": base, "ours": ours, "trl": trl, "n_prompts": len(keep), "deepspeed": ds}


def run_ours(ws: dict, wd: str, a, i: int) -> dict:
    out = os.path.join(wd, f"ours_{i}")
    shutil.rmtree(out, ignore_errors=True)  # logs/metrics.jsonl appends: never read an older run's records
    cmd = launcher(1) + [
        os.path.join(ROOT, "launch", "train.py"), "--stage", "grpo", "--model_name_or_path", ws["base"],
        "--train_file_dir", ws["ours"], "--template_name", "chatml", "--max_source_length", str(a.max_prompt_tokens),
        "--num_generations", str(a.G), "--per_device_train_batch_size", str(a.micro), "--gradient_accumulation_steps",
        str(a.ga), "--max_new_tokens", str(a.max_new_tokens), "--temperature", "1.0", "--top_p", "1.0",
        "--beta", str(a.beta), "--loss_type", "grpo", "--epsilon", "0.2", "--num_iterations", "1",
        "--reward_funcs", REWARDS, "--rollout_backend", "hybrid", "--learning_rate", "1e-6",
        "--lr_scheduler_type", "constant", "--attn_implementation", "sdpa", "--gradient_checkpointing", "False",
        "--max_steps", str(a.steps), "--logging_steps", "1", "--save_steps", "0", "--report_to", "none",
        "--deepspeed", ws["deepspeed"], "--output_dir", out, "--overwrite_output_dir", "--export_hf", "False"]
    r = run(cmd, bench_env(a.threads), timeout=a.timeout)
    recs = [json.loads(line) for line in open(os.path.join(out, "logs", "metrics.jsonl"))]
    recs = [x for x in recs if x["split"] == "train"]
    per_step = a.micro * a.ga  # responses per step on one rank
    rates = [x["response_length"] * per_step / (x["time"] - prev["time"]) for prev, x in zip(recs, recs[1:])]
    return {"gen_tokens_per_s": median_after(rates, max(a.warmup - 1, 0)),
            "response_length": statistics.mean(x["response_length"] for x in recs),
            "generation_s": median_after([x["time/generation_s"] for x in recs], a.warmup),
            "scoring_s": median_after([x["time/scoring_s"] for x in recs], a.warmup),
            "training_s": median_after([x["time/training_s"] for x in recs], a.warmup),
            "peak_rss_mib": r["peak_rss_mib"], "wall_s": round(r["wall_s"], 1)}


def run_trl(ws: dict, wd: str, a, i: int) -> dict:
    cmd = launcher(1) + [os.path.abspath(__file__), "--_trl_peer", "--base", ws["base"], "--data", ws["trl"],
                         "--out", os.path.join(wd, f"trl_{i}"), "--deepspeed", ws["deepspeed"], "--steps", str(a.steps),
                         "--warmup", str(a.warmup), "--micro", str(a.micro), "--ga", str(a.ga), "--G", str(a.G),
                         "--max_new_tokens", str(a.max_new_tokens), "--beta", str(a.beta)]
    r = run(cmd, bench_env(a.threads), timeout=a.timeout)
    res = tagged_json(r["stdout"], "PEER_RESULT")
    res.update(peak_rss_mib=r["peak_rss_mib"], wall_s=round(r["wall_s"], 1))
    return res


def trl_reward(name: str):
    """Our rule reward as a TRL reward function (completions are chat messages; answers a column)."""
    from medgpt_ds import rewards

    def fn(prompts, completions, answer, **kw):
        if name == "format":
            return rewards.format_reward(completions)
        return rewards.answer_match_reward(completions, answer, mode="normalized")

    fn.__name__ = name
    return fn


def trl_peer(a) -> None:
    if "RANK" not in os.environ:
        from medgpt_ds.dist import _free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    ds = datasets.load_dataset("json", data_files=a.data, split="train")
    tok = AutoTokenizer.from_pretrained(a.base)
    model = AutoModelForCausalLM.from_pretrained(a.base, attn_implementation="sdpa")
    cfg = GRPOConfig(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.micro,
                     gradient_accumulation_steps=a.ga, num_generations=a.G, max_completion_length=a.max_new_tokens,
                     temperature=1.0, top_p=1.0, top_k=0, beta=a.beta, loss_type="grpo", epsilon=0.2,
                     scale_rewards="group", num_iterations=1, use_vllm=False, learning_rate=1e-6,
                     lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                     disable_tqdm=True, bf16=False, fp16=False, gradient_checkpointing=False,
                     use_cpu=not torch.cuda.is_available(), deepspeed=a.deepspeed, seed=42)
    clock, ends = step_clock()

    trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward(n) for n in REWARDS.split(",")], args=cfg,
                          train_dataset=ds, processing_class=tok, callbacks=[clock])
    trainer.train()
    from medgpt_ds.dist import unlink_cpu_shm_segment

    unlink_cpu_shm_segment()
    dts = [t1 - t0 for t0, t1 in zip(ends, ends[1:])]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    per_step = a.micro * a.ga
    rates = [n * per_step / dt for n, dt in zip(lengths, dts)]
    if int(os.environ.get("RANK", "0")) == 0:
        print("PEER_RESULT " + json.dumps({"gen_tokens_per_s": statistics.median(rates[a.warmup:] or rates),
                                           "response_length": statistics.mean(lengths)}), flush=True)


def peer_args():
    p = argparse.ArgumentParser()
    for k in ("--base", "--data", "--out", "--deepspeed"):
        p.add_argument(k, required=True)
    for k in ("--steps", "--warmup", "--micro", "--ga", "--G", "--max_new_tokens", "--local_rank"):
        p.add_argument(k, type=int, default=0)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--_trl_peer", action="store_true")
    return p.parse_args()


def main(argv=None) -> None:
    if "--_trl_peer" in sys.argv:
        return trl_peer(peer_args())
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro", type=int, default=4, help="responses per micro batch")
    ap.add_argument("--ga", type=int, default=2)
    ap.add_argument("--G", type=int, default=4, help="num_generations")
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--max_prompt_tokens", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--zero", default="zero3")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per process on both sides (1 on a shared CPU machine; default: torch's)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--name", default="grpo_peers")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)
    wd = a.workdir or tempfile.mkdtemp(prefix="medgpt_bench_grpo_")
    os.makedirs(wd, exist_ok=True)
    ws = make_workspace(wd, a)
    runs = itertools.count()
    sides = {"medgpt-ds grpo (hybrid)": lambda: run_ours(ws, wd, a, next(runs)),
             "TRL GRPOTrainer (HF generate)": lambda: run_trl(ws, wd, a, next(runs))}

    def show(name, i, res):
        print(f"round {i + 1} {name}: {res if 'error' not in res else res['error'][-600:]}", flush=True)

    out = interleave(sides, a.rounds, "gen_tokens_per_s", on_result=show)
    for key, st in out["ratios"].items():
        if st["median"] is not None:
            print(f"{key}: median {st['median']:.2f}x (min {st['min']:.2f}, max {st['max']:.2f})", flush=True)
    prompts_per_step = a.micro * a.ga // a.G
    settings = {"model": f"llama hidden {a.hidden} x {a.layers} layers (random init, saved once, both sides load it)",
                "prompts": f"grpo/sample.jsonl questions of <= {a.max_prompt_tokens} tokens ({ws['n_prompts']})",
                "rewards": "format + answer_normalized (medgpt_ds.rewards, weight 1 each)",
                "batch": f"{prompts_per_step} prompts x G={a.G} = {a.micro * a.ga} responses per step; micro {a.micro}, "
                         f"grad_accum {a.ga}: one optimizer step per rollout",
                "sampling": f"temperature 1, top_p 1, max_new_tokens {a.max_new_tokens}",
                "loss": f"grpo, epsilon 0.2, beta {a.beta} (k3 to a frozen reference), 1 iteration",
                "zero": f"{a.zero} (torch AdamW pinned)", "precision": "fp32", "attention": "sdpa",
                "gradient_checkpointing": "off on both sides",
                "torch threads per process": a.threads or "torch default", "ranks": 1, "steps": a.steps,
                "warmup_steps_excluded": a.warmup, "rounds": a.rounds}
    payload = {"title": "grpo vs TRL GRPOTrainer", "kind": "peer_comparison",
               "command": "python bench/bench_grpo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "settings": settings,
               "sides": {"medgpt-ds grpo (hybrid)": "launch/train.py --stage grpo --rollout_backend hybrid",
                         "TRL GRPOTrainer (HF generate)": "GRPOConfig(use_vllm=False), DeepSpeed through the HF Trainer"},
               "comparisons": [{"name": "grpo step", "metric": "generated tokens/s (median per step)",
                                "settings": {}, **out}]}
    print(f"wrote {write_result(a.name, payload)}", flush=True)


if __name__ == "__main__":
    main()
