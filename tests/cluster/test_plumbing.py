"""The multi-node plumbing on a real 2-node SLURM cluster, with a stand-in trainer (no model).

These isolate the launch layer (slurm/common.sh, tools/make_hostfile.py, deepspeed --no_ssh,
gloo across two network namespaces) from the trainer; test_training.py runs the real one.
"""
import json
import re
import subprocess
import time

import pytest
from conftest import REPO, job_env, run_template, submit

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


def test_failed_rank_fails_the_job(slurm_cluster, tmp_path):
    """A rank that raises makes srun --kill-on-bad-exit end the whole job as FAILED."""
    env = fake_env(tmp_path, MAX_STEPS="1000", FAKE_STEP_SECONDS="0.2",
                   MEDGPT_DEBUG_FAIL_RANK="1", MEDGPT_DEBUG_FAIL_STEP="3")
    t0 = time.monotonic()
    info, log = run_template(slurm_cluster, "slurm/sft_multinode.sbatch", tmp_path, env, timeout=120)
    print(f"failed job ended {time.monotonic() - t0:.1f}s after submission")
    assert info["JobState"] == "FAILED", log
    assert "MEDGPT_DEBUG_FAIL: rank 1 fails at step 3" in log
    assert "step 100 |" not in log                                # rank 0 did not go on alone
    assert not (tmp_path / "out" / "fake_result.json").exists()


def test_preempt_checkpoint_requeue_resume(slurm_cluster, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@T sends) -> stop file -> checkpoint ->
    PREEMPTED -> scontrol requeue -> the rerun resumes from `latest` and finishes."""
    env = fake_env(tmp_path, MAX_STEPS="8", FAKE_STEP_SECONDS="0.5")
    job, log = submit(slurm_cluster, "slurm/sft_multinode.sbatch", tmp_path, env)
    wait_for_log(slurm_cluster, job, log, "step 2 |")
    r = slurm_cluster.host_run(["scancel", "--batch", "--signal=USR1", str(job)])
    assert r.returncode == 0, r.stderr
    info = wait_requeued_and_release(slurm_cluster, job)
    info = slurm_cluster.wait_job(job, 180)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert "received USR1" in text and "requeueing job" in text
    result = json.loads((tmp_path / "out" / "fake_result.json").read_text())
    assert 2 <= result["start_step"] < 8 and result["final_step"] == 8
    assert not (tmp_path / "out" / "PREEMPTED").exists()


def test_deepspeed_no_ssh_across_namespaces_without_slurm(slurm_cluster, tmp_path):
    """Two `deepspeed --hostfile <2 nodes> --no_ssh --node_rank r` started by hand, one per host."""
    hostfile = tmp_path / "hostfile"
    subprocess.run(["python3", str(REPO / "tools/make_hostfile.py"), "--nodelist", "node[1-2]", "--slots", "1",
                    "-o", str(hostfile)], check=True)
    out = tmp_path / "out"
    env = job_env()
    procs = []
    for r in range(2):
        cmd = ["deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank", str(r), "--master_addr",
               slurm_cluster.addrs[0], "--master_port", "29512", FAKE, "--output_dir", out, "--max_steps", "2"]
        procs.append(slurm_cluster.host_popen(cmd, host=r, cwd=str(REPO), env=env, stdout=open(tmp_path / f"node{r}.log", "w"),
                                              stderr=subprocess.STDOUT))
    try:
        rcs = [p.wait(180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "".join((tmp_path / f"node{r}.log").read_text() for r in range(2))
    assert rcs == [0, 0], logs
    result = json.loads((out / "fake_result.json").read_text())
    assert result["world"] == 2 and result["sum"] == 3.0 and result["hosts"] == ["node1", "node2"]


# ---------------------------------------------------------------------------- helpers (shared)
def wait_for_log(cluster, job, log, needle, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and needle in log.read_text(errors="replace"):
            return
        if cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.5)
    raise AssertionError(f"{needle!r} never appeared in {log}:\n" + (log.read_text() if log.exists() else "(no log)"))


def wait_requeued_and_release(cluster, job, timeout=180):
    """Wait until the job was requeued; then lift slurmctld's requeue hold-off.

    slurmctld makes a requeued job eligible only ~2 minutes later (EligibleTime); a real cluster
    just waits, the test sets StartTime=now so the rerun starts at once.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job(job)
        if info.get("Restarts", "0") != "0" and info.get("JobState") == "PENDING":
            r = cluster.host_run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
            assert r.returncode == 0, r.stderr
            return info
        if info.get("Restarts", "0") != "0" and info.get("JobState") in ("RUNNING", "COMPLETED"):
            return info
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") and info.get("Restarts", "0") == "0":
            raise AssertionError(f"job {job} ended {info.get('JobState')} without being requeued")
        time.sleep(0.5)
    raise AssertionError(f"job {job} was not requeued within {timeout}s: {cluster.job(job)}")

