"""The multi-node plumbing on a real 2-node SLURM cluster, partly with a stand-in trainer
(tests/cluster/fake_trainer.py: gloo all-reduce, no model), so a failure here points at the
launch layer (slurm/common.sh, tools/make_hostfile.py, deepspeed --no_ssh, the network) and not
at the trainer. The templates with the real trainer are in test_training.py.
"""
import json

import pytest
from slurm_cluster import REPO, job_env, run_template

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


def test_loopback_hostname_needs_net_ifname(slurm_cluster, tmp_path):
    """Debian's /etc/hosts puts a node's own name on 127.0.1.1: gloo then advertises that address
    and the other node cannot connect. NET_IFNAME (-> GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME) fixes it."""
    slurm_cluster.write_hosts(loopback_own_name=True)
    try:
        r = slurm_cluster.host_run(["getent", "hosts", "node1"], host=0)
        assert r.stdout.split()[0] == "127.0.1.1"
        info, log = run_template(slurm_cluster, "slurm/sft_multinode.sbatch", tmp_path / "plain",
                                 fake_env(tmp_path / "plain", MAX_STEPS="1"), timeout=200)
        assert info["JobState"] == "FAILED"
        assert "127.0.1.1" in log and "Connection refused" in log   # gloo's own message names the cause
        info, log = run_template(slurm_cluster, "slurm/sft_multinode.sbatch", tmp_path / "ifname",
                                 fake_env(tmp_path / "ifname", MAX_STEPS="1", NET_IFNAME=slurm_cluster.ifname))
        assert info["JobState"] == "COMPLETED", log[-6000:]
        result = json.loads((tmp_path / "ifname" / "out" / "fake_result.json").read_text())
        assert result["hosts"] == ["node1", "node2"] and result["sum"] == 3.0  # 1 + 2 across the hosts
    finally:
        slurm_cluster.write_hosts()
