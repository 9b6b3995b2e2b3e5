"""Fixtures for the `cluster` tests: a real 2-node SLURM cluster (see slurm_cluster.py).

Run them alone with `pytest -m cluster tests/cluster` (as root, after `bash .ci/cluster_setup.sh`).
They skip, naming the reason, when not root or when the slurm/munge binaries are missing.
MEDGPT_KEEP_CLUSTER_DIR=1 keeps the daemons' run directory (logs, slurm.conf) for debugging.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import SlurmCluster, missing_requirements, reap_stale  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
# DeepSpeed's JIT ops (deepspeed_shm_comm on CPU): `make test` shares .cache/torch_extensions
# (built by the earlier tests); run alone, the cluster tests use a directory of their own, since
# the venv's ninja (1.13) and Debian's (1.11) hash build commands differently and processes that
# find different ninjas first on PATH rebuild a shared directory back and forth (1-2 min each).
TORCH_EXT_DIR = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or REPO / ".cache" / "torch_extensions_cluster")


def job_env(**extra: str) -> dict[str, str]:
    """Environment for sbatch/deepspeed in tests: the project's venv first on PATH, CPU-sized."""
    path = os.environ.get("PATH", "")
    if VENV_BIN.is_dir():
        path = f"{VENV_BIN}:{path}"
    env = {
        "PATH": path,
        "PYTHONPATH": str(REPO),
        "TORCH_EXTENSIONS_DIR": str(TORCH_EXT_DIR),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "REPO_DIR": str(REPO),
    }
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def slurm_cluster():
    why = missing_requirements()
    if why:
        pytest.skip(why)
    reap_stale()
    cluster = SlurmCluster()
    try:
        cluster.start()
    except Exception as e:
        pytest.fail(f"could not start the test SLURM cluster: {e}\n{cluster.failure_logs}")
    yield cluster
    cluster.stop()


def submit(cluster: SlurmCluster, template: str, tmp_path: Path, env: dict[str, str], *sbatch_args: str) -> tuple[int, Path]:
    """sbatch a project template from the repo root with `env`; returns (job id, its output file)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "job-%j.out"
    job = cluster.sbatch(str(REPO / template), f"--output={log}", *sbatch_args, env=env, cwd=str(REPO))
    return job, tmp_path / f"job-{job}.out"


def run_template(cluster: SlurmCluster, template: str, tmp_path: Path, env: dict[str, str], *sbatch_args: str,
                 timeout: float = 240) -> tuple[dict, str]:
    """Submit, wait for the end; returns (final `scontrol show job` record, the job's output)."""
    job, log = submit(cluster, template, tmp_path, env, *sbatch_args)
    info = cluster.wait_job(job, timeout)
    return info, log.read_text(errors="replace") if log.exists() else ""


_WORDS = ("fever cough headache patient doctor infection virus treatment dose tablet blood pressure heart "
          "lung liver kidney pain chronic acute symptom diagnosis rest water sleep the a of and to is").split()


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory, slurm_cluster):
    """A saved tiny Llama + BPE tokenizer (ChatML template), sft and preference jsonl, a ZeRO-3
    config that shards even tiny parameters. Built here so the cluster tests depend on no demo file.
    Also JIT-builds DeepSpeed's CPU comm op once, before any job needs it (no-op when cached)."""
    import json
    import random
    import subprocess

    build = subprocess.run(
        [sys.executable, "-c", "from deepspeed.accelerator import get_accelerator as g; "
                               "g().create_op_builder('ShareMemCommBuilder').load()"],
        env={**os.environ, **job_env()}, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from medgpt_ds.data.templates import TEMPLATES
    from medgpt_ds.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("cluster_assets")
    rng = random.Random(0)

    def sentence(n):
        return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."

    model_dir = root / "tiny"
    tok = train_bpe_tokenizer(texts=[sentence(rng.randint(4, 14)) for _ in range(1500)], vocab_size=400,
                              output_dir=str(model_dir), chat_template=TEMPLATES["chatml"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)

    sft, pref = root / "sft", root / "pref"
    sft.mkdir()
    pref.mkdir()
    with open(sft / "train.jsonl", "w") as f:
        for _ in range(64):
            conv = [{"from": "human", "value": sentence(6)}, {"from": "gpt", "value": sentence(10)}]
            f.write(json.dumps({"conversations": conv}) + "\n")
    with open(pref / "train.jsonl", "w") as f:
        for _ in range(64):
            f.write(json.dumps({"conversations": [{"from": "human", "value": sentence(6)}],
                                "chosen": sentence(8), "rejected": sentence(5)}) + "\n")
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (root / "zero3.json").write_text(json.dumps(ds, indent=2))
    return {"model": str(model_dir), "sft": str(sft), "pref": str(pref), "zero3": str(root / "zero3.json")}


def wait_for_log(cluster, job, log, needle, timeout=180, after=""):
    """Poll the job's output until `needle` appears (after the last `after`, when given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if after:
            text = text[text.rindex(after):] if after in text else ""
        if needle in text:
            return
        if cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.5)
    raise AssertionError(f"{needle!r} never appeared in {log}:\n" + (log.read_text() if log.exists() else "(no log)"))


def wait_requeued_and_release(cluster, job, restarts=1, timeout=180):
    """Wait until the job was requeued `restarts` times; then lift slurmctld's requeue hold-off.

    slurmctld makes a requeued job eligible only ~2 minutes later (EligibleTime); a real cluster
    just waits, the test sets StartTime=now so the rerun starts at once.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job(job)
        n, state = int(info.get("Restarts", "0")), info.get("JobState")
        if n >= restarts and state == "PENDING":
            r = cluster.host_run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
            assert r.returncode == 0, r.stderr
            return info
        if n >= restarts and state in ("RUNNING", "COMPLETED"):
            return info
        if n < restarts and state in ("COMPLETED", "FAILED", "CANCELLED"):
            raise AssertionError(f"job {job} ended {state} after {n} requeues, expected {restarts}")
        time.sleep(0.5)
    raise AssertionError(f"job {job} was not requeued {restarts}x within {timeout}s: {cluster.job(job)}")
