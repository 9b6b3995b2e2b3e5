"""Shared pieces of the benchmarks: environment, launching a run and measuring it, interleaving
the sides of a comparison, per-step rates, and the result files bench/report.py turns into
bench/RESULTS.md.

A result file (bench/results/<name>.json) holds: what was run (command), when, on what (machine,
versions), the settings both sides shared and those of each side, the raw per-run numbers and, per
comparison, the ratio of the sides' medians per round (A B A B ...): its median and spread.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "medicalgpt")
SFT_SAMPLE = os.path.join(SHARED_DATA, "sft", "medical_sft_1K_format.jsonl")
PAIRS_SAMPLE = os.path.join(SHARED_DATA, "reward", "dpo_zh_500.jsonl")
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def bench_env(threads: Optional[int] = None, **extra: str) -> dict:
    """Offline, quiet, one extension cache; the progress bar off (it would write per step).
    ``threads``: torch/OpenMP threads per process, the same for both sides of a comparison. On a
    CPU machine shared with other jobs, 2-thread OpenMP regions convoy (one thread descheduled, the
    other spinning at the barrier): one thread per process measured 4x faster and far steadier."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MEDGPT_NO_PROGRESS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra)
    return env


def launcher(nproc: int) -> list[str]:
    """`python` for one rank, the deepspeed launcher for more."""
    if nproc == 1:
        return [sys.executable]
    return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(nproc)]


class RunFailed(RuntimeError):
    """A benchmarked process exited non-zero or ran out of time (the message has its output tail)."""


_PEAK_WRAPPER = ("import resource,subprocess,sys;p=subprocess.run(sys.argv[1:]);"
                 "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True);"
                 "sys.exit(p.returncode)")


def run(cmd: list[str], env: Optional[dict] = None, timeout: Optional[float] = None, log: Optional[str] = None) -> dict:
    """Run ``cmd`` in ROOT; return {stdout, wall_s, peak_rss_mib} (peak RSS of its largest process).
    Raises RunFailed with the output tail on a non-zero exit or a timeout. ``log``: also keep the
    whole output there."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, *cmd], env=env or bench_env(), capture_output=True,
                           text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise RunFailed(f"timed out after {timeout:.0f} s: {' '.join(cmd[:4])} ...\n{out[-2000:]}") from None
    wall = time.perf_counter() - t0
    if log:
        with open(log, "w") as f:
            f.write(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        raise RunFailed(f"exit {p.returncode}: {' '.join(cmd[:6])} ...\n{p.stdout[-2500:]}\n{p.stderr[-2500:]}")
    kb = int(p.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return {"stdout": p.stdout, "wall_s": wall, "peak_rss_mib": kb // 1024}


def tagged_json(stdout: str, tag: str) -> dict:
    """The JSON a peer printed after ``tag`` (rank 0's line)."""
    if tag not in stdout:
        raise RunFailed(f"no {tag} line in the output:\n{stdout[-2000:]}")
    return json.loads(stdout.rsplit(tag, 1)[1].split("\n", 1)[0])


def median_after(values: list[float], warmup: int) -> float:
    """Median of the values after the first ``warmup`` (all of them when too few)."""
    kept = values[warmup:] if len(values) > warmup else values
    return statistics.median(kept) if kept else float("nan")


def ratio_stats(a: list[float], b: list[float]) -> dict:
    """Per-round ratios a_i / b_i (rounds run back to back), their median and spread."""
    ratios = [x / y for x, y in zip(a, b) if y and x == x and y == y]
    if not ratios:
        return {"median": None, "min": None, "max": None, "n": 0, "ratios": []}
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios),
            "ratios": ratios}


def interleave(sides: dict[str, Callable[[], dict]], rounds: int, metric: str,
               on_result: Optional[Callable[[str, int, dict], None]] = None) -> dict:
    """Run every side once per round, in order (A B C A B C ...), so machine load drifts over all
    sides alike. Returns {"runs": {side: [result, ...]}, "ratios": {"A/B": stats, ...}} with the
    first side as the numerator. A failed run records its error; the other sides go on."""
    names = list(sides)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names:
            try:
                res = sides[name]()
            except RunFailed as e:
                res = {"error": str(e)[-3000:]}
            runs[name].append(res)
            if on_result:
                on_result(name, r, res)
    first = names[0]
    ratios = {}
    for other in names[1:]:
        pairs = [(x.get(metric), y.get(metric)) for x, y in zip(runs[first], runs[other])
                 if x.get(metric) is not None and y.get(metric) is not None]
        ratios[f"{first} / {other}"] = ratio_stats([p[0] for p in pairs], [p[1] for p in pairs])
    return {"runs": runs, "ratios": ratios}


def versions() -> dict:
    """Versions of what was measured (and the commit of this checkout)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "deepspeed", "transformers", "peft", "trl", "datasets", "accelerate", "flash-attn", "vllm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        out["medgpt-ds commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                                 text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def machine() -> dict:
    """CPU, cores, RAM, load average and the GPU (if any) of this machine."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2)}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
        with open("/proc/meminfo") as f:
            mem = {line.split(":")[0]: int(line.split()[1]) for line in f}
        info["ram_gib"] = round(mem["MemTotal"] / 2**20, 1)
        info["ram_available_gib"] = round(mem["MemAvailable"] / 2**20, 1)
    except (OSError, KeyError, ValueError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["gpu_count"] = torch.cuda.device_count()
            info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        pass
    return info


def write_result(name: str, payload: dict, results_dir: Optional[str] = None) -> str:
    """Write bench/results/<name>.json with the date, machine and versions added."""
    out_dir = results_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    payload = {"name": name, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": machine(), "versions": versions(), **payload}
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return path


def bench_ds_config(path: str, zero: str, *, cuda: bool, offload_optimizer: bool = False,
                    persistence_threshold: Optional[int] = None) -> str:
    """ds_configs/<zero>.json with the optimizer pinned for both sides of a comparison: torch's
    AdamW (fused on CUDA) through DeepSpeed's ``torch_adam``, so neither side JIT-builds another
    Adam; everything else stays "auto" (we and the HF Trainer resolve it from the same flags)."""
    with open(os.path.join(ROOT, "ds_configs", f"{zero}.json")) as f:
        cfg = json.load(f)
    params = cfg["optimizer"].setdefault("params", {})
    params["torch_adam"] = True
    if cuda and not offload_optimizer:  # the offloaded optimizer steps on CPU tensors
        params["fused"] = True
    z = cfg.setdefault("zero_optimization", {})
    if offload_optimizer:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
        cfg["zero_force_ds_cpu_optimizer"] = False
    if persistence_threshold is not None and z.get("stage") == 3:
        z["stage3_param_persistence_threshold"] = persistence_threshold
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    return path


def padded_vocab_tokenizer(texts: list[str], out_dir: str, vocab_size: int, trained_vocab: int = 4000,
                           chat_template: Optional[str] = None) -> str:
    """A byte-level BPE trained on ``texts`` (``trained_vocab`` pieces) whose vocabulary is filled
    up to ``vocab_size`` with never-produced entries, so a from-config model gets the embedding and
    lm_head shapes of a real checkpoint (e.g. Qwen2.5's 151936) without downloading its tokenizer."""
    from transformers import AutoTokenizer

    from medgpt_ds.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(texts=texts, vocab_size=min(trained_vocab, vocab_size), output_dir=out_dir,
                        chat_template=chat_template)
    path = os.path.join(out_dir, "tokenizer.json")
    with open(path) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in spec.get("added_tokens", [])}
    next_id = max(used) + 1
    while next_id < vocab_size:
        vocab[f"<|filler_{next_id}|>"] = next_id
        next_id += 1
    with open(path, "w") as f:
        json.dump(spec, f, ensure_ascii=False)
    n = len(AutoTokenizer.from_pretrained(out_dir))
    if n != max(vocab_size, len(used)):
        raise RuntimeError(f"padded tokenizer has {n} entries, wanted {vocab_size}")
    return out_dir


def sft_texts(limit: Optional[int] = None) -> list[str]:
    """Message texts of the MedicalGPT sft sample (for training bench tokenizers)."""
    from medgpt_ds.data.formats import load_records

    recs = load_records([SFT_SAMPLE], "sft", log=lambda *a: None)
    texts = [m["content"] for r in recs for m in r["messages"]]
    return texts[:limit] if limit else texts


# Architectures of real checkpoints (their config.json values; vocab via padded_vocab_tokenizer),
# plus small shapes for CPU runs. Random init: no download.
SHAPES: dict[str, dict] = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False),
    # head size 32: vLLM's CPU attention kernels take 32 and up (the dry run's vLLM rollouts)
    "tiny-h32": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                     tie_word_embeddings=False),
    "llama-h256x4": dict(model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    "qwen3-1.7b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True),
    "qwen2.5-3b": dict(model_type="qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False),
}


def write_shape(shape: str, path: str, vocab_size: Optional[int] = None) -> str:
    """config.json of ``shape`` (for --model_config; the vocabulary comes from the tokenizer)."""
    spec = dict(SHAPES[shape])
    if vocab_size is not None:
        spec["vocab_size"] = vocab_size
    with open(path, "w") as f:
        json.dump(spec, f, indent=1)
    return path


def shape_params(shape: str, vocab_size: Optional[int] = None) -> int:
    """Parameter count of ``shape`` (built on the meta device: no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    if vocab_size is not None:
        spec["vocab_size"] = vocab_size
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    return sum(p.numel() for p in model.parameters())


def step_clock():
    """A transformers ``TrainerCallback`` for the peers' step times: ``ends`` gets the time at the
    first step's start, then at every step's end (step times are its differences). Returns
    (callback, ends)."""
    from transformers import TrainerCallback

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not ends:
                ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    return StepClock(), ends

