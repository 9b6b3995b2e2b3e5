"""The multi-node plumbing on a real 2-node SLURM cluster, with a stand-in trainer (no model).

These isolate the launch layer (slurm/common.sh, tools/make_hostfile.py, deepspeed --no_ssh,
gloo across two network namespaces) from the trainer: when test_training.py fails and these
pass, look at the trainer. Failure, preemption and the no-SLURM launch run with the real
trainer in test_training.py.
"""
import json
import re

import pytest
from conftest import REPO, job_env, run_template

pytestmark = pytest.mark.cluster

FAKE = "tests/cluster/fake_trainer.py"


def fake_env(tmp_path, **extra):
    return job_env(TRAIN_SCRIPT=FAKE, GPUS_PER_NODE="1", OUTPUT_DIR=str(tmp_path / "out"),
                   LOG_DIR=str(tmp_path / "logs"), MODEL="unused", PRECISION="fp32", **extra)


def test_hostlists_agree_with_scontrol(slurm_cluster):
    """make_hostfile's expansion gives scontrol's host order (= SLURM_NODEID order)."""
    import sys
    sys.path.insert(0, str(REPO / "tools"))
    from make_hostfile import expand_nodelist

    for nodelist in ("node[1-2]", "gpu[01-02,05],login1", "r[1-2]n[1-3]", "n[009-011]"):
        r = slurm_cluster.host_run(["scontrol", "show", "hostnames", nodelist])
        assert r.returncode == 0, r.stderr
        assert expand_nodelist(nodelist) == r.stdout.split()


def test_template_runs_one_rank_per_host(slurm_cluster, tmp_path):
    """sft template -> srun -> deepspeed --no_ssh per node -> all_reduce over gloo across hosts."""
    info, log = run_template(slurm_cluster, "slurm/sft_multinode.sbatch", tmp_path, fake_env(tmp_path, MAX_STEPS="2"))
    assert info["JobState"] == "COMPLETED", log
    result = json.loads((tmp_path / "out" / "fake_result.json").read_text())
    assert result["world"] == 2 and result["sum"] == 3.0          # 1 + 2 summed across the two hosts
    assert result["hosts"] == ["node1", "node2"]                  # rank r on node r+1
    assert result["master"] == "10.200.0.1"                       # NodeAddr of the first node, not its name
    job = int(info["JobId"])
    hostfile = tmp_path / "logs" / str(job) / "hostfile"
    assert hostfile.read_text() == "node1 slots=1\nnode2 slots=1\n"
    assert f"--master_port {20000 + job % 40000}" in log          # job-derived port
    assert re.search(r"^0: rank 0/2 on host node1$", log, re.M) and re.search(r"^1: rank 1/2 on host node2$", log, re.M)
