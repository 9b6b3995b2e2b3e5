"""Every slurm/*.sbatch run by bash with stub srun/scontrol/deepspeed (no cluster, no root):
the launch line is right, and the trainer's own parser accepts the flags each template passes.

The real thing (real SLURM, real trainer) is in test_training.py; this catches a renamed flag or
a typo in any of the templates in about a second each.
"""
import importlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = sorted((REPO / "slurm").glob("*.sbatch"))
JOB_ID = 4242

pytestmark = pytest.mark.unit

SRUN = r"""#!/bin/bash
# stub srun: skip options, run the command once per node with that node's SLURM_NODEID
while [[ $1 == -* ]]; do shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit $?; done
"""
SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG"
case "$1 $2" in
  "show hostnames") echo node1; echo node2 ;;
  "show node") echo "NodeName=$3 Arch=x86_64 CoresPerSocket=1 NodeAddr=10.9.8.$([[ $3 == node1 ]] && echo 1 || echo 2) NodeHostName=$3" ;;
esac
"""
DEEPSPEED = r"""#!/usr/bin/env python3
import json, os, sys
with open(os.environ["STUB_ARGV"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
out = os.environ["OUTPUT_DIR"]
if os.environ.get("STUB_PREEMPT"):
    open(os.path.join(out, "PREEMPTED"), "w").write('{"step": 3}')
sys.exit(int(os.environ.get("STUB_RC", "0")))
"""


@pytest.fixture
def stubs(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("deepspeed-stub", DEEPSPEED)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755 | stat.S_IXUSR)
    env = {
        "PATH": f"{bindir}:{os.path.dirname(sys.executable)}:/usr/bin:/bin",
        "SLURM_JOB_ID": str(JOB_ID), "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2",
        "SLURM_SUBMIT_DIR": str(REPO), "SLURM_CPUS_PER_TASK": "64", "SLURM_GPUS_ON_NODE": "8",
        "DEEPSPEED": str(bindir / "deepspeed-stub"), "OUTPUT_DIR": str(tmp_path / "out"),
        "LOG_DIR": str(tmp_path / "logs"), "STUB_ARGV": str(tmp_path / "argv.jsonl"),
        "STUB_LOG": str(tmp_path / "scontrol.log"), "REWARD_MODEL": str(tmp_path),
    }
    return tmp_path, env


def run(template, env, **extra):
    return subprocess.run(["bash", str(template)], env={**env, **extra}, cwd="/", capture_output=True, text=True,
                          timeout=60)


def launches(tmp_path):
    return [json.loads(line) for line in (tmp_path / "argv.jsonl").read_text().splitlines()]


def split_launch(argv):
    """deepspeed argv -> (launcher flags dict, script, trainer argv)."""
    i = next(k for k, a in enumerate(argv) if a.endswith(".py"))
    flags, k = {}, 0
    while k < i:
        if k + 1 < i and not argv[k + 1].startswith("--"):
            flags[argv[k]] = argv[k + 1]
            k += 2
        else:
            flags[argv[k]] = True
            k += 1
    return flags, argv[i], argv[i + 1:]


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_template_launch_line_and_trainer_flags(template, stubs, monkeypatch):
    tmp_path, env = stubs
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the templates name hub models; parsing must not reject them offline
    r = run(template, env)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = launches(tmp_path)
    assert len(runs) == 2                                         # one launcher per node
    for node, argv in enumerate(runs):
        flags, script, trainer_argv = split_launch(argv)
        assert flags["--node_rank"] == str(node) and flags["--no_ssh"] is True
        assert flags["--master_addr"] == "10.9.8.1"               # node 0's NodeAddr
        assert flags["--master_port"] == str(20000 + JOB_ID % 40000)
        assert Path(flags["--hostfile"]).read_text() == "node1 slots=8\nnode2 slots=8\n"
        assert script == "launch/train.py"
    assert runs[0][runs[0].index("launch/train.py"):] == runs[1][runs[1].index("launch/train.py"):]

    # the trainer's own parser (unknown flags are errors there) accepts the template's flags
    from medgpt_ds.config import _split_stage, parse_args

    trainer_argv = split_launch(runs[0])[2]
    stage = _split_stage(trainer_argv)
    module = importlib.import_module(f"medgpt_ds.stages.{stage}")
    cwd = os.getcwd()
    os.chdir(REPO)  # relative paths in the templates (data/demo, ds_configs) are from the repo root
    try:
        cfg = parse_args(trainer_argv, {stage: getattr(module, "Arguments", None)})
    finally:
        os.chdir(cwd)
    assert cfg.train.output_dir == env["OUTPUT_DIR"]
    assert cfg.train.resume_from_checkpoint == "auto"
    assert cfg.train.deepspeed.startswith("ds_configs/zero")
    assert cfg.train.bf16                                          # the GPU default precision
    if template.name == "sft_70b.sbatch":  # 4 x 8 GPUs, ZeRO-3 + LoRA
        assert cfg.lora.use_peft and cfg.train.deepspeed == "ds_configs/zero3.json"
        assert "#SBATCH --nodes=4" in template.read_text()
    if template.name == "opd_multinode.sbatch":  # student and teacher, the teacher partitioned under ZeRO-3
        a = cfg.stage_args
        assert cfg.model.model_name_or_path != a.teacher_model_name_or_path and a.teacher_model_name_or_path
        assert cfg.train.deepspeed == "ds_configs/zero3.json" and not a.teacher_load_in_4bit
        assert (a.opd_lambda, a.opd_beta, a.temperature, a.max_prompt_length) == (0.5, 0.5, 0.9, 1024)


def test_env_overrides_scale_down(stubs):
    tmp_path, env = stubs
    r = run(REPO / "slurm/sft_multinode.sbatch", env, GPUS_PER_NODE="1", MODEL="/m", MAX_STEPS="7",
            PRECISION="fp32", EXTRA_ARGS="--report_to none", MASTER_PORT="29999")
    assert r.returncode == 0, r.stderr
    flags, _, argv = split_launch(launches(tmp_path)[0])
    assert Path(flags["--hostfile"]).read_text() == "node1 slots=1\nnode2 slots=1\n"
    assert flags["--master_port"] == "29999"
    assert argv[argv.index("--model_name_or_path") + 1] == "/m"
    assert argv[argv.index("--max_steps") + 1] == "7"
    assert "--bf16" not in argv and argv[-2:] == ["--report_to", "none"]


def test_preempted_run_requeues_and_failed_run_fails(stubs):
    tmp_path, env = stubs
    r = run(REPO / "slurm/dpo_multinode.sbatch", env, STUB_PREEMPT="1")
    assert r.returncode == 0, r.stderr
    assert f"scontrol requeue {JOB_ID}" in (tmp_path / "scontrol.log").read_text()
    assert "requeueing job" in r.stdout

    (tmp_path / "scontrol.log").unlink()
    r = run(REPO / "slurm/dpo_multinode.sbatch", env, STUB_RC="3")
    assert r.returncode == 3
    assert "requeue" not in (tmp_path / "scontrol.log").read_text()
    # a stale PREEMPTED from the run being resumed does not requeue a run that then fails
    assert not (tmp_path / "out" / "PREEMPTED").exists()

    r = run(REPO / "slurm/dpo_multinode.sbatch", env, STUB_PREEMPT="1", SLURM_RESTART_COUNT="20")
    assert r.returncode == 1 and "MAX_REQUEUES" in r.stdout


def test_usr1_turns_into_the_stop_file(stubs):
    """The trap: USR1 to the batch shell while the step runs -> <output_dir>/.stop."""
    tmp_path, env = stubs
    slow = tmp_path / "bin" / "deepspeed-slow"
    slow.write_text("#!/bin/bash\nfor i in $(seq 100); do [[ -f $OUTPUT_DIR/.stop ]] && "
                    "{ echo '{\"step\": 1}' > $OUTPUT_DIR/PREEMPTED; exit 0; }; sleep 0.1; done; exit 9\n")
    slow.chmod(0o755)
    p = subprocess.Popen(["bash", str(REPO / "slurm/sft_multinode.sbatch")], cwd="/", text=True,
                         env={**env, "DEEPSPEED": str(slow)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not (tmp_path / "logs" / str(JOB_ID) / "hostfile").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    p.send_signal(10)  # SIGUSR1, to the batch shell only (as --signal=B:USR1 does)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0, out
    assert "received USR1" in out and "requeueing job" in out
