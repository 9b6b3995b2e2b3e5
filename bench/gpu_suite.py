#!/usr/bin/env python
"""The one-shot GPU suite (run through bench/gpu_suite.sh): the numbers no CPU can give, in one
time-boxed run on one CUDA GPU, written to one JSON + one markdown table.

    bash bench/gpu_suite.sh [--wheels DIR] [--out DIR] [--budget 520]   # on the GPU machine
    bash bench/gpu_suite.sh --dry-run --out /tmp/suite                  # CPU, tiny shapes (CI)

Sections (each time-boxed; a failed one records its error and the suite goes on):
  1 flash_packing  bench/gpu_flash_packing.py --json OUT: flash-attention 2 packing exactness at
                   micro batch 2 and bf16 sdpa vs flash-attn loss agreement ("not present" if absent)
  2 sft            tokens/s, TFLOP/s and MFU, bf16, ZeRO-2, 1 GPU, random-init Qwen2.5-0.5B and
                   Qwen3-1.7B shapes: ours packed and padded, TRL SFTTrainer packed on the same
                   settings (bench_sft.py: same model, data, length, precision, attention, optimizer)
  3 memory         full fine-tuning with ZeRO-3 + optimizer offload: the largest of the Qwen2.5 7B /
                   3B / 1.5B shapes that trains (peak GPU memory, peak host RSS); LoRA r=64 on all
                   linear layers of the 7B shape (ZeRO-2)
  4 grpo           grpo step split (generation / scoring / training) of the hybrid rollout on the
                   Qwen2.5-0.5B shape, 256-token answers, through launch/train.py's logged metrics;
                   a vllm slot that runs when vllm is installed

Every model is random-init from a config written here (no download); tokenizers are trained on the
MedicalGPT sample and padded to the real vocabulary size. --dry-run runs the same code paths on CPU
with tiny shapes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (ROOT, SFT_SAMPLE, SHARED_DATA, SHAPES, RunFailed, bench_ds_config, bench_env, launcher,  # noqa: E402
                    machine, padded_vocab_tokenizer, run, sft_texts, shape_params, versions, write_shape)

FLASH_SCRIPT = os.path.join(ROOT, "bench", "gpu_flash_packing.py")

# What each mode runs. GPU: real shapes; dry run: the tiny shape, a few steps.
PLANS = {
    "gpu": {
        "budgets": {"flash_packing": 50, "sft": 190, "memory": 210, "grpo": 70},
        "sft": [("qwen2.5-0.5b", "packed-gc_off", "trl"), ("qwen2.5-0.5b", "padded-gc_off", ""),
                ("qwen3-1.7b", "packed-gc_off", "trl")],
        # one packed row of 8192 per micro batch: flash-attn's varlen path is exact for one row
        # (transformers detects packing from position ids only at batch size 1)
        "sft_args": ["--max_length", "8192", "--rows", "1", "--batch", "16", "--steps", "12", "--warmup", "4",
                     "--bf16"],
        "full": ["qwen2.5-7b", "qwen2.5-3b", "qwen2.5-1.5b"], "lora": "qwen2.5-7b", "mem_length": 2048,
        "mem_steps": 3, "grpo_shape": "qwen2.5-0.5b",
        "grpo": {"max_new_tokens": 256, "G": 8, "micro": 8, "ga": 2, "steps": 3},
    },
    "dry_run": {
        # generous: the dry run checks code paths on a shared CPU machine, not speed (GPU: 520 s in all)
        "budgets": {"flash_packing": 300, "sft": 900, "memory": 900, "grpo": 600},
        "sft": [("tiny", "packed-gc_off", "trl"), ("tiny", "padded-gc_off", "")],
        "sft_args": ["--max_length", "256", "--rows", "1", "--batch", "4", "--steps", "3", "--warmup", "1"],
        "full": ["tiny"], "lora": "tiny", "mem_length": 128, "mem_steps": 2, "grpo_shape": "tiny-h32",
        "grpo": {"max_new_tokens": 8, "G": 2, "micro": 2, "ga": 1, "steps": 2},
    },
}


class Clock:
    """The suite's deadline and each section's."""

    def __init__(self, budget: float):
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + budget

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def tokenizer_for(wd: str, vocab: int) -> str:
    """A BPE trained on the sft sample, padded to ``vocab`` entries (cached per size)."""
    from medgpt_ds.data.templates import TEMPLATES

    out = os.path.join(wd, f"tokenizer_{vocab}")
    if not os.path.isfile(os.path.join(out, "tokenizer.json")):
        padded_vocab_tokenizer(sft_texts(), out, vocab, trained_vocab=min(4000, vocab), chat_template=TEMPLATES["chatml"])
    return out


def random_checkpoint(wd: str, shape: str, vocab: int, bf16: bool, timeout: float) -> str:
    """A saved random-init model of ``shape`` (LoRA and the RL stages start from a pretrained dir);
    built in a child process, on the GPU when there is one, so this process holds no CUDA memory."""
    out = os.path.join(wd, f"ckpt_{shape}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    tok = tokenizer_for(wd, vocab)
    run([sys.executable, os.path.abspath(__file__), "--_checkpoint", shape, out, tok, "bf16" if bf16 else "fp32"],
        bench_env(), timeout=timeout)
    return out


def _write_checkpoint(shape: str, out: str, tok_dir: str, dtype: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    spec = dict(SHAPES[shape])
    spec.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, {"bf16": "bfloat16"}.get(dtype, "float32")))
    model.save_pretrained(out, max_shard_size="4GB")
    tok.save_pretrained(out)


def vocab_of(shape: str, dry: bool) -> int:
    return SHAPES[shape].get("vocab_size", 1000 if dry else 32000)


def read_metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "logs", "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("split") == "train"]


# --- sections ---------------------------------------------------------------------------------

def section_flash(a, wd: str, clock: Clock, budget: float) -> dict:
    if not os.path.isfile(FLASH_SCRIPT):
        return {"status": "not present", "detail": "bench/gpu_flash_packing.py does not exist in this checkout"}
    out = os.path.join(wd, "flash_packing.json")
    cmd = [sys.executable, FLASH_SCRIPT, "--json", out] + (["--dry-run"] if a.dry_run else [])
    r = run(cmd, bench_env(), timeout=min(budget, clock.left()))
    with open(out) as f:
        return {"status": "ok", "result": json.load(f), "wall_s": round(r["wall_s"], 1)}


def section_sft(a, wd: str, clock: Clock, budget: float) -> dict:
    import bench_sft

    plan = PLANS[a.mode]
    end = time.perf_counter() + budget
    runs = []
    for shape, group, peers in plan["sft"]:
        left = min(end - time.perf_counter(), clock.left())
        if left < 30:
            runs.append({"shape": shape, "group": group, "status": "skipped: time budget"})
            continue
        argv = ["--shape", shape, "--groups", group, "--peers", peers, "--rounds", "1", "--zero", "zero2",
                "--attn", a.attn, "--timeout", str(int(left)), "--name", f"suite_sft_{shape}_{group}",
                "--results_dir", os.path.join(wd, "parts"), "--workdir", os.path.join(wd, f"sft_{shape}")]
        if a.dry_run:
            argv += ["--vocab", "1000"]
        try:
            payload = bench_sft.main(argv + plan["sft_args"])
        except Exception as e:  # noqa: BLE001 - recorded, the suite goes on
            runs.append({"shape": shape, "group": group, "status": "error", "error": f"{type(e).__name__}: {e}"[-2000:]})
            continue
        comp = payload["comparisons"][0]
        sides = {name: res[0] for name, res in comp["runs"].items()}
        runs.append({"shape": shape, "group": group, "status": "ok", "settings": payload["settings"],
                     "params": shape_params(shape, None if "vocab_size" in SHAPES[shape] else 1000),
                     "sides": sides, "ratios": comp["ratios"]})
    return {"status": "ok" if any(r["status"] == "ok" for r in runs) else "error", "runs": runs}


def _train_once(a, wd: str, name: str, flags: list[str], timeout: float) -> dict:
    out = os.path.join(wd, name)
    shutil.rmtree(out, ignore_errors=True)  # logs/metrics.jsonl appends: never read an older run's records
    cmd = launcher(1) + [os.path.join(ROOT, "launch", "train.py"), *flags, "--output_dir", out, "--overwrite_output_dir",
                         "--save_steps", "0", "--export_hf", "False", "--report_to", "none", "--logging_steps", "1"]
    r = run(cmd, bench_env(), timeout=timeout, log=os.path.join(wd, f"{name}.log"))
    recs = read_metrics(out)
    res = {"peak_host_rss_gib": round(r["peak_rss_mib"] / 1024, 2), "wall_s": round(r["wall_s"], 1), "steps": len(recs)}
    if any("mem_gib" in x for x in recs):
        res["peak_gpu_mem_gib"] = round(max(x["mem_gib"] for x in recs), 2)
    if recs and "tokens_per_s" in recs[-1]:
        res["tokens_per_s_last"] = round(recs[-1]["tokens_per_s"], 1)
    if recs:
        res["loss_last"] = recs[-1].get("loss")
    return res


def _host_ram_gib() -> float:
    return float(machine().get("ram_available_gib", 0.0))


def section_memory(a, wd: str, clock: Clock, budget: float) -> dict:
    plan = PLANS[a.mode]
    end = time.perf_counter() + budget
    cuda = not a.dry_run
    common = ["--template_name", "chatml", "--train_file_dir", SFT_SAMPLE, "--model_max_length", str(plan["mem_length"]),
              "--per_device_train_batch_size", "1", "--max_steps", str(plan["mem_steps"]), "--gradient_checkpointing",
              "True", "--attn_implementation", "sdpa", "--learning_rate", "1e-5"] + ([] if a.dry_run else ["--bf16"])
    z3 = bench_ds_config(os.path.join(wd, "zero3_offload_opt.json"), "zero3", cuda=cuda, offload_optimizer=True)
    # pinned host buffers for a 7B model's optimizer state could take most of the host RAM
    with open(z3) as f:
        cfg = json.load(f)
    cfg["zero_optimization"]["offload_optimizer"]["pin_memory"] = False
    with open(z3, "w") as f:
        json.dump(cfg, f)
    attempts = []
    for shape in plan["full"]:
        left = min(end - time.perf_counter(), clock.left())
        vocab = vocab_of(shape, a.dry_run)
        n = shape_params(shape, None if "vocab_size" in SHAPES[shape] else vocab)
        # ZeRO-3 + optimizer offload keeps fp32 master weights, both Adam moments and fp32 gradient
        # partitions in host RAM: 16 bytes per parameter
        need, have = 16 * n / 2**30, _host_ram_gib()
        entry = {"shape": shape, "params_b": round(n / 1e9, 3), "host_ram_needed_gib": round(need, 1),
                 "host_ram_available_gib": have}
        if need > 0.92 * have:
            entry["status"] = f"skipped: needs ~{need:.0f} GiB of host RAM for the offloaded optimizer, {have:.0f} available"
            attempts.append(entry)
            continue
        if left < 40:
            entry["status"] = "skipped: time budget"
            attempts.append(entry)
            continue
        tok = tokenizer_for(wd, vocab)
        cfg_path = write_shape(shape, os.path.join(wd, f"{shape}.json"))
        try:
            entry.update(_train_once(a, wd, f"full_{shape}", ["--stage", "sft", "--model_config", cfg_path,
                                                              "--tokenizer_name_or_path", tok, "--deepspeed", z3] + common,
                                     left))
            entry["status"] = "ok"
            attempts.append(entry)
            break
        except RunFailed as e:
            entry.update(status="error", error=str(e)[-1500:])
            attempts.append(entry)
    lora: dict = {"shape": plan["lora"]}
    left = min(end - time.perf_counter(), clock.left())
    if left < 60:
        lora["status"] = "skipped: time budget"
    else:
        try:
            t0 = time.perf_counter()
            ckpt = random_checkpoint(wd, plan["lora"], vocab_of(plan["lora"], a.dry_run), not a.dry_run, left)
            lora["checkpoint_write_s"] = round(time.perf_counter() - t0, 1)
            z2 = bench_ds_config(os.path.join(wd, "zero2_mem.json"), "zero2", cuda=cuda)
            lora.update(_train_once(a, wd, "lora", ["--stage", "sft", "--model_name_or_path", ckpt, "--use_peft", "True",
                                                    "--target_modules", "all", "--lora_rank", "64", "--lora_alpha", "128",
                                                    "--deepspeed", z2] + common,
                                    min(end - time.perf_counter(), clock.left())))
            lora["status"] = "ok"
        except RunFailed as e:
            lora.update(status="error", error=str(e)[-1500:])
    largest = next((x["shape"] for x in attempts if x.get("status") == "ok"), None)
    return {"status": "ok" if largest or lora.get("status") == "ok" else "error",
            "largest_full_finetune_zero3_offload": largest, "full_attempts": attempts, "lora": lora,
            "settings": {"sequence": f"1 packed row of {plan['mem_length']}", "gradient_checkpointing": True,
                         "precision": "fp32 (dry run)" if a.dry_run else "bf16",
                         "optimizer": "torch AdamW (on CPU with offload: no JIT-built DeepSpeedCPUAdam; same state size)",
                         "steps": plan["mem_steps"]}}


def vllm_backend_wired() -> bool:
    """Whether --rollout_backend vllm does more than refuse (its placeholder raises NotImplementedError
    when built); the run itself then says whether vLLM is installed and starts."""
    try:
        from medgpt_ds import generation as backends
    except ImportError:
        from medgpt_ds import rollout as backends
    try:
        backends.VLLMBackend()
    except NotImplementedError:
        return False
    except Exception:  # noqa: BLE001 - the real backend wants its arguments: it exists
        return True
    return True


def section_grpo(a, wd: str, clock: Clock, budget: float) -> dict:
    plan = PLANS[a.mode]
    g = plan["grpo"]
    end = time.perf_counter() + budget
    shape = plan["grpo_shape"]
    prompts = os.path.join(SHARED_DATA, "grpo", "sample.jsonl")
    if not os.path.exists(prompts):
        prompts = os.path.join(ROOT, "data", "demo", "grpo")
    cuda = not a.dry_run
    ckpt = random_checkpoint(wd, shape, vocab_of(shape, a.dry_run), cuda, min(budget, clock.left()))
    z3 = bench_ds_config(os.path.join(wd, "zero3_grpo.json"), "zero3", cuda=cuda)
    flags = ["--stage", "grpo", "--model_name_or_path", ckpt, "--template_name", "chatml", "--train_file_dir", prompts,
             "--max_source_length", "256", "--num_generations", str(g["G"]), "--per_device_train_batch_size",
             str(g["micro"]), "--gradient_accumulation_steps", str(g["ga"]), "--max_new_tokens", str(g["max_new_tokens"]),
             "--temperature", "1.0", "--reward_funcs", "format,answer_normalized", "--beta", "0.04",
             "--learning_rate", "1e-6", "--max_steps", str(g["steps"]), "--deepspeed", z3,
             "--attn_implementation", "sdpa"] + ([] if a.dry_run else ["--bf16"])
    backends = {}
    for backend in ("hybrid", "vllm"):
        if backend == "vllm" and not vllm_backend_wired():
            backends[backend] = {"status": "not available: --rollout_backend vllm is not implemented in this checkout"}
            continue
        left = min(end - time.perf_counter(), clock.left())
        if left < 30:
            backends[backend] = {"status": "skipped: time budget"}
            continue
        try:
            res = _train_once(a, wd, f"grpo_{backend}", flags + ["--rollout_backend", backend], left)
            recs = read_metrics(os.path.join(wd, f"grpo_{backend}"))
            timed = recs[1:] or recs  # the first step pays one-time costs
            for k in ("generation", "scoring", "training"):
                res[f"{k}_s"] = round(sum(x[f"time/{k}_s"] for x in timed) / len(timed), 3)
            res["step_s"] = round(res["generation_s"] + res["scoring_s"] + res["training_s"], 3)
            res["response_length"] = round(sum(x["response_length"] for x in timed) / len(timed), 1)
            res["responses_per_step"] = g["micro"] * g["ga"]
            res["status"] = "ok"
            backends[backend] = res
        except Exception as e:  # noqa: BLE001 - recorded; the other backend still runs
            backends[backend] = {"status": "error", "error": f"{type(e).__name__}: {e}"[-1500:]}
    return {"status": "ok" if backends["hybrid"].get("status") == "ok" else "error", "shape": shape,
            "settings": {"responses_per_step": g["micro"] * g["ga"], "num_generations": g["G"],
                         "max_new_tokens": g["max_new_tokens"], "zero": "zero3", "beta": 0.04,
                         "precision": "fp32 (dry run)" if a.dry_run else "bf16"}, "backends": backends}


SECTIONS = {"flash_packing": section_flash, "sft": section_sft, "memory": section_memory, "grpo": section_grpo}


# --- report -----------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    """The suite's one table (plus the section status lines)."""
    m = result["machine"]
    lines = [f"# GPU suite{' (dry run, CPU, tiny shapes)' if result['dry_run'] else ''}", "",
             f"{result['date']} on {m.get('gpu', m.get('cpu'))}; {result['elapsed_s']:.0f} s of a {result['budget_s']} s "
             f"budget; torch {result['versions'].get('torch')}, deepspeed {result['versions'].get('deepspeed')}, "
             f"transformers {result['versions'].get('transformers')}, trl {result['versions'].get('trl')}, flash-attn "
             f"{result['versions'].get('flash-attn', 'not installed')}", "",
             "| section | run | tokens/s | TFLOP/s | MFU | peak GPU GiB | peak host GiB | other |", "|---|---|---|---|---|---|---|---|"]

    def fmt(v, spec=".0f"):
        return "" if v is None else format(v, spec)

    secs = result["sections"]
    fl = secs.get("flash_packing")
    if fl:
        lines.append(f"| flash_packing | | | | | | | {fl.get('status')}{': ' + json.dumps(fl.get('result'))[:200] if fl.get('result') else ''} |")
    for r in secs.get("sft", {}).get("runs", []):
        if r.get("status") != "ok":
            lines.append(f"| sft | {r['shape']} {r['group']} | | | | | | {r.get('status')} {r.get('error', '')[:150]} |")
            continue
        for side, res in r["sides"].items():
            lines.append(f"| sft | {r['shape']} {r['group']}: {side} | {fmt(res.get('tokens_per_s'))} | "
                         f"{fmt(res.get('tflops'), '.1f')} | {fmt(res.get('mfu'), '.3f')} | {fmt(res.get('gpu_mem_gib'), '.1f')} | "
                         f"{fmt((res.get('peak_rss_mib') or 0) / 1024, '.1f')} | {res.get('error', '')[:150]} |")
        for k, st in r["ratios"].items():
            if st.get("median") is not None:
                lines.append(f"| sft | {r['shape']} {r['group']}: {k} | {st['median']:.2f}x | | | | | ratio |")
    mem = secs.get("memory", {})
    for x in mem.get("full_attempts", []):
        lines.append(f"| memory | full FT ZeRO-3 + opt. offload, {x['shape']} ({x['params_b']}B) | "
                     f"{fmt(x.get('tokens_per_s_last'))} | | | {fmt(x.get('peak_gpu_mem_gib'), '.1f')} | "
                     f"{fmt(x.get('peak_host_rss_gib'), '.1f')} | {x.get('status', '')[:150]} |")
    lo = mem.get("lora")
    if lo:
        lines.append(f"| memory | LoRA r=64 all linear, {lo['shape']} | {fmt(lo.get('tokens_per_s_last'))} | | | "
                     f"{fmt(lo.get('peak_gpu_mem_gib'), '.1f')} | {fmt(lo.get('peak_host_rss_gib'), '.1f')} | "
                     f"{lo.get('status', '')[:150]} |")
    gr = secs.get("grpo", {})
    for backend, x in gr.get("backends", {}).items():
        other = (f"step {x['step_s']} s = generation {x['generation_s']} + scoring {x['scoring_s']} + training "
                 f"{x['training_s']}; {x['responses_per_step']} responses of ~{x['response_length']} tokens"
                 if x.get("status") == "ok" else x.get("status", "")[:150])
        lines.append(f"| grpo | {gr.get('shape')} {backend} | | | | {fmt(x.get('peak_gpu_mem_gib'), '.1f')} | "
                     f"{fmt(x.get('peak_host_rss_gib'), '.1f')} | {other} |")
    for name, sec in secs.items():
        if sec.get("status") not in ("ok", "not present") and "error" in sec:
            lines.append(f"\n{name}: {sec['status']}: {sec['error'][-400:]}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_checkpoint":
        _write_checkpoint(*sys.argv[2:6])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", dest="dry_run", action="store_true", help="CPU, tiny shapes, same code paths")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="where gpu_suite.json/.md go")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole suite (GPU default 520)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--attn", default="auto", help="auto: flash_attention_2 on CUDA when flash-attn is installed, else sdpa")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print("error: the GPU suite needs a CUDA GPU; on a CPU machine run it with --dry-run", file=sys.stderr)
        return 2
    a.mode = "dry_run" if a.dry_run else "gpu"
    if a.attn == "auto":
        a.attn = "flash_attention_2" if (not a.dry_run and importlib.util.find_spec("flash_attn")) else "sdpa"
    budget = a.budget or (2700 if a.dry_run else 520)
    clock = Clock(budget)
    wd = a.workdir or tempfile.mkdtemp(prefix="medgpt_gpu_suite_")
    os.makedirs(wd, exist_ok=True)
    plan = PLANS[a.mode]
    result = {"name": "gpu_suite_dryrun" if a.dry_run else "gpu_suite", "kind": "gpu_suite", "dry_run": a.dry_run,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "versions": versions(),
              "budget_s": budget, "attention": a.attn, "command": "bash bench/gpu_suite.sh " + " ".join(argv or sys.argv[1:]),
              "sections": {}}
    for name in a.sections.split(","):
        section_budget = min(plan["budgets"][name], max(clock.left(), 0))
        t0 = time.perf_counter()
        print(f"== {name} (budget {section_budget:.0f} s)", flush=True)
        if section_budget < 20:
            result["sections"][name] = {"status": "skipped: time budget"}
            continue
        try:
            result["sections"][name] = SECTIONS[name](a, wd, clock, section_budget)
        except Exception as e:  # noqa: BLE001 - a failed section is recorded; the others still run
            result["sections"][name] = {"status": "error", "error": f"{type(e).__name__}: {e}"[-3000:],
                                        "traceback": traceback.format_exc()[-3000:]}
        result["sections"][name]["elapsed_s"] = round(time.perf_counter() - t0, 1)
        print(f"   {name}: {result['sections'][name]['status']} in {result['sections'][name]['elapsed_s']} s", flush=True)
    result["elapsed_s"] = round(clock.elapsed(), 1)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"{result['name']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    table = markdown(result)
    with open(os.path.join(a.out, f"{result['name']}.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {path} in {result['elapsed_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
