"""Fixtures for the `cluster` tests: a real 2-node SLURM cluster (see slurm_cluster.py).

Run them alone with `pytest -m cluster tests/cluster` (as root, after `bash .ci/cluster_setup.sh`).
They skip, naming the reason, when not root or when the slurm/munge binaries are missing.
MEDGPT_KEEP_CLUSTER_DIR=1 keeps the daemons' run directory (logs, slurm.conf) for debugging.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import SlurmCluster, missing_requirements, reap_stale  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"


def job_env(**extra: str) -> dict[str, str]:
    """Environment for sbatch/deepspeed in tests: the project's venv first on PATH, CPU-sized."""
    path = os.environ.get("PATH", "")
    if VENV_BIN.is_dir():
        path = f"{VENV_BIN}:{path}"
    env = {
        "PATH": path,
        "PYTHONPATH": str(REPO),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
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
    log = tmp_path / "job-%j.out"
    job = cluster.sbatch(str(REPO / template), f"--output={log}", *sbatch_args, env=env, cwd=str(REPO))
    return job, tmp_path / f"job-{job}.out"


def run_template(cluster: SlurmCluster, template: str, tmp_path: Path, env: dict[str, str], *sbatch_args: str,
                 timeout: float = 240) -> tuple[dict, str]:
    """Submit, wait for the end; returns (final `scontrol show job` record, the job's output)."""
    job, log = submit(cluster, template, tmp_path, env, *sbatch_args)
    info = cluster.wait_job(job, timeout)
    return info, log.read_text(errors="replace") if log.exists() else ""
