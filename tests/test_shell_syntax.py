"""Every shell artifact parses (`bash -n`) and every hostfile loads with DeepSpeed's own parser."""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "node_modules", "outputs", ".cache", "build"}

pytestmark = pytest.mark.unit


def _files(*patterns):
    out = []
    for pattern in patterns:
        for p in REPO.rglob(pattern):
            if not SKIP_DIRS.intersection(p.relative_to(REPO).parts) and p.is_file():
                out.append(p)
    return sorted(set(out))


SHELL_FILES = _files("*.sh", "*.sbatch") + [p for p in [REPO / ".ci" / "run"] if p.exists()]
SBATCH_FILES = _files("*.sbatch")
HOSTFILES = sorted(p for p in (REPO / "hostfiles").iterdir() if p.is_file() and p.suffix != ".md")


def test_found_the_artifacts():
    assert len(SBATCH_FILES) >= 9, SBATCH_FILES
    assert {p.name for p in HOSTFILES} >= {"a100x16", "h100x16", "h100x32", "localhost"}


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_bash_n(path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("path", SBATCH_FILES, ids=lambda p: p.name)
def test_sbatch_template_shape(path):
    """The parts every template must have (the cluster tests run them for real)."""
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    header = [ln for ln in lines if ln.startswith("#SBATCH")]
    opts = {ln.split()[1].split("=")[0] for ln in header}
    assert {"--job-name", "--nodes", "--ntasks-per-node", "--time", "--output", "--requeue", "--signal"} <= opts
    assert "--ntasks-per-node=1" in text                    # one deepspeed launcher per node
    assert re.search(r"--signal=B:USR1@\d+", text)          # B: only the batch shell gets it
    assert "%j" in next(ln for ln in header if "--output" in ln)
    # every #SBATCH line comes before the first command (sbatch stops reading at it)
    first_cmd = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))
    assert re.search(r"^STAGE=(pt|sft|rm|dpo|orpo|ppo|grpo|opd)$", text, re.M)
    assert 'source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"' in text
    assert "run_training --stage" in text and "--resume_from_checkpoint auto" in text
    # model, data and scale settings are env overrides
    for var in ("TRAIN_DATA", "DS_CONFIG", "MICRO_BATCH", "GRAD_ACCUM", "LR", "MAX_STEPS", "SAVE_STEPS"):
        assert re.search(rf"^{var}=\${{{var}:-", text, re.M), f"{path.name}: {var} is not overridable"


def test_common_sh_launch_contract():
    text = (REPO / "slurm" / "common.sh").read_text()
    assert "--kill-on-bad-exit=1" in text
    assert "--no_ssh" in text and '--node_rank "$SLURM_NODEID"' in text
    assert "NodeAddr" in text and "tools/make_hostfile.py" in text
    assert "TORCH_EXTENSIONS_DIR" in text and "OMP_NUM_THREADS" in text
    assert "scontrol requeue" in text and "trap" in text


@pytest.mark.parametrize("path", HOSTFILES, ids=lambda p: p.name)
def test_hostfile_loads(path):
    from deepspeed.launcher.runner import _parse_hostfile

    pool = _parse_hostfile(path.read_text().splitlines())
    m = re.fullmatch(r"(a100|h100)x(\d+)", path.name)
    if m:  # the name states the total number of GPUs, 8 per node
        assert sum(pool.values()) == int(m.group(2)) and set(pool.values()) == {8}
    else:
        assert path.name == "localhost" and list(pool) == ["localhost"]
