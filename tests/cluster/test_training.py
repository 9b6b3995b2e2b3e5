"""The project's sbatch templates with the real trainer on a real 2-node SLURM cluster, scaled
down by environment variables to one CPU rank per node and a tiny model.

- sft and dpo complete across the two hosts: rank 0 on node1, rank 1 on node2, the loss logged,
  checkpoints and the HF export written; sft_70b (LoRA + ZeRO-3) on 2 nodes exports the adapter;
- a rank forced to fail (MEDGPT_DEBUG_FAIL_RANK/STEP) ends the job FAILED instead of hanging;
- preemption: USR1 to the batch shell, later TERM to the ranks -> checkpoint -> PREEMPTED ->
  requeue -> resume, twice; the finished run's losses equal the uninterrupted run's;
- a 2-node `deepspeed --hostfile --no_ssh --node_rank r` run across the namespaces without SLURM.
"""
import importlib.util
import json
import math
import re
import subprocess
import time

import pytest
from slurm_cluster import REPO, job_env, run_template, submit, wait_for_log, wait_requeued

pytestmark = pytest.mark.cluster

STEPS = 40  # long enough that a signal sent after step 2 lands mid-run, even on a loaded machine


def trainer_env(tmp_path, assets, data="sft", **extra):
    env = dict(GPUS_PER_NODE="1", PRECISION="fp32", MODEL=assets["model"], TRAIN_DATA=assets[data],
               TEMPLATE="chatml", DS_CONFIG=assets["zero3"], MAX_LEN="128", MAX_SOURCE_LEN="48",
               MAX_TARGET_LEN="48", MICRO_BATCH="2", GRAD_ACCUM="1", LR="1e-3", MAX_STEPS=str(STEPS),
               SAVE_STEPS="8", LOGGING_STEPS="1", GRAD_CKPT="False", OUTPUT_DIR=str(tmp_path / "out"),
               LOG_DIR=str(tmp_path / "logs"), EXTRA_ARGS="--report_to none", MEDGPT_NO_PROGRESS="1")
    env.update(extra)
    return job_env(**env)


def metrics(out):
    """step -> the last logged train record for it (a resumed run appends)."""
    recs = {}
    for line in (out / "logs" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("split", "train") == "train":
            recs[r["step"]] = r
    return recs


def assert_trained_across_hosts(info, log, out, steps=STEPS):
    assert info["JobState"] == "COMPLETED", log[-8000:]
    # every rank logs `rank R/W on host H`; srun --label prefixes the task (= node) number
    assert re.search(r"^0: rank 0/2 on host node1\b", log, re.M), log[-4000:]
    assert re.search(r"^1: rank 1/2 on host node2\b", log, re.M), log[-4000:]
    recs = metrics(out)
    assert sorted(recs) == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in recs.values())
    assert f"step 1/{steps} (" in log and "| loss " in log
    assert (out / "latest").read_text().strip() == f"checkpoint-{steps}"
    assert (out / f"checkpoint-{steps}").is_dir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f"HF export lacks {f}"
    assert not (out / "PREEMPTED").exists()
    return recs


@pytest.fixture(scope="module")
def sft_run(slurm_cluster, tiny_assets, tmp_path_factory):
    """The uninterrupted sft template run (also the reference for the preemption test)."""
    tmp_path = tmp_path_factory.mktemp("sft_run")
    t0 = time.monotonic()
    info, log = run_template(slurm_cluster, "slurm/sft_multinode.sbatch", tmp_path, trainer_env(tmp_path, tiny_assets))
    print(f"sft job: {time.monotonic() - t0:.1f}s")
    return info, log, tmp_path / "out"


def test_sft_template_two_hosts(sft_run):
    info, log, out = sft_run
    recs = assert_trained_across_hosts(info, log, out)
    job = int(info["JobId"])
    # the launch layer: hostfile from the allocation, node 0's NodeAddr (not its name), job-derived port
    assert (out.parent / "logs" / str(job) / "hostfile").read_text() == "node1 slots=1\nnode2 slots=1\n"
    assert f"--master_addr 10.200.0.1 --master_port {20000 + job % 40000} --node_rank $SLURM_NODEID" in log
    assert recs[STEPS]["loss"] < recs[1]["loss"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


def test_dpo_template_two_hosts(slurm_cluster, tiny_assets, tmp_path):
    if importlib.util.find_spec("medgpt_ds.stages.dpo") is None:
        pytest.skip("--stage dpo is not implemented yet (medgpt_ds/stages/dpo.py is missing)")
    t0 = time.monotonic()
    info, log = run_template(slurm_cluster, "slurm/dpo_multinode.sbatch", tmp_path,
                             trainer_env(tmp_path, tiny_assets, data="pref", MAX_STEPS="4", SAVE_STEPS="2"))
    print(f"dpo job: {time.monotonic() - t0:.1f}s")
    recs = assert_trained_across_hosts(info, log, tmp_path / "out", steps=4)
    assert recs[1]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert "rewards/accuracies" in recs[4]


def test_sft_70b_template_lora_scaled_down(slurm_cluster, tiny_assets, tmp_path):
    """The 4-node LoRA + ZeRO-3 template on 2 nodes (`sbatch --nodes=2`): the adapter is exported
    with real (gathered) weights, not ZeRO-3's empty placeholders."""
    env = trainer_env(tmp_path, tiny_assets, MAX_STEPS="3", SAVE_STEPS="0", LORA_RANK="4", LORA_ALPHA="8")
    info, log = run_template(slurm_cluster, "slurm/sft_70b.sbatch", tmp_path, env, "--nodes=2")
    out = tmp_path / "out"
    assert info["JobState"] == "COMPLETED", log[-8000:]
    assert re.search(r"^1: rank 1/2 on host node2\b", log, re.M)
    assert sorted(metrics(out)) == [1, 2, 3]
    from safetensors.torch import load_file

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)  # B starts at 0: trained


def test_failed_rank_fails_the_job(slurm_cluster, tiny_assets, tmp_path):
    env = trainer_env(tmp_path, tiny_assets, MAX_STEPS="1000", SAVE_STEPS="0",
                      MEDGPT_DEBUG_FAIL_RANK="1", MEDGPT_DEBUG_FAIL_STEP="3")
    t0 = time.monotonic()
    job, log = submit(slurm_cluster, "slurm/sft_multinode.sbatch", tmp_path, env)
    info = slurm_cluster.wait_job(job, 150)  # the ranks' collective timeout is 1800 s: a hang would show
    text = log.read_text(errors="replace")
    print(f"failing job: {time.monotonic() - t0:.1f}s from submission to {info['JobState']}")
    assert info["JobState"] == "FAILED", text[-6000:]
    assert "MEDGPT_DEBUG_FAIL: rank 1 fails at step 3" in text
    died = re.search(r"^1: \[(\S+ \S+),\d+\] \[ERROR\] \[launch\.py", text, re.M)  # node 1's launcher saw it
    if died:
        from datetime import datetime
        lag = datetime.fromisoformat(info["EndTime"]) - datetime.fromisoformat(died.group(1))
        print(f"rank 1 died -> job FAILED in {lag.total_seconds():.0f}s")
    assert "step 2/1000 (" in text and "step 4/1000 (" not in text  # rank 0 did not run on alone
    assert not (tmp_path / "out" / "config.json").exists()


def test_preempt_checkpoint_requeue_resume(slurm_cluster, tiny_assets, tmp_path, sft_run):
    """Stopped twice, resumed twice, same losses as the uninterrupted run:
    1. USR1 to the batch shell (what `#SBATCH --signal=B:USR1@600` sends before the time limit);
    2. TERM to the ranks (`scancel --signal=TERM`), after the first resume."""
    env = trainer_env(tmp_path, tiny_assets)
    out = tmp_path / "out"
    t0 = time.monotonic()
    job, log = submit(slurm_cluster, "slurm/sft_multinode.sbatch", tmp_path, env)
    stops = []
    for n, (needle, scancel) in enumerate([(f"step 2/{STEPS} (", ["--batch", "--signal=USR1"]),
                                           (None, ["--signal=TERM"])], start=1):
        # the second stop: once the resumed run has logged two steps of its own
        needle = needle or f"step {stops[-1] + 2}/{STEPS} ("
        wait_for_log(slurm_cluster, job, log, needle, after=f"(restart {n - 1})")
        r = slurm_cluster.host_run(["scancel", *scancel, str(job)])
        assert r.returncode == 0, r.stderr
        wait_requeued(slurm_cluster, job, restarts=n)
        text = log.read_text(errors="replace")
        saved = [int(s) for s in re.findall(r"checkpoint saved \(\{\"step\": (\d+)", text)]
        assert len(saved) == n, text[-4000:]
        stops.append(saved[-1])
        assert (out / f"checkpoint-{stops[-1]}").is_dir()
    assert 2 <= stops[0] < stops[1] < STEPS, stops

    info = slurm_cluster.wait_job(job, 300)
    text = log.read_text(errors="replace")
    print(f"job stopped and resumed twice: {time.monotonic() - t0:.1f}s, stops at steps {stops}")
    assert info["Restarts"] == "2"
    assert "received USR1" in text
    for s in stops:
        assert f"resumed from {out}/checkpoint-{s}" in text
    recs = assert_trained_across_hosts(info, text, out)
    ref = metrics(sft_run[2])
    # each resume continues the same trajectory: the losses after the restart points are the
    # uninterrupted run's, bit for bit (same data order, RNG and optimizer state on CPU)
    assert [recs[s]["loss"] for s in range(stops[0] + 1, STEPS + 1)] == \
        [ref[s]["loss"] for s in range(stops[0] + 1, STEPS + 1)]


def test_deepspeed_hostfile_no_ssh_without_slurm(slurm_cluster, tiny_assets, tmp_path):
    """pt from scratch, `deepspeed --hostfile <2 nodes> --no_ssh --node_rank r` on each host by hand."""
    hostfile = tmp_path / "hostfile"
    subprocess.run(["python3", str(REPO / "tools/make_hostfile.py"), "--nodelist", "node[1-2]", "--slots", "1",
                    "-o", str(hostfile)], check=True)
    out = tmp_path / "out"
    pt_dir = tmp_path / "pt"
    pt_dir.mkdir()
    sentences = [f"Patient {i} has fever and cough; rest and water help." for i in range(200)]
    (pt_dir / "corpus.txt").write_text("\n".join(sentences) + "\n")
    env = job_env(MEDGPT_NO_PROGRESS="1")
    args = ["--stage", "pt", "--model_config", "tiny", "--tokenizer_name_or_path", tiny_assets["model"],
            "--train_file_dir", pt_dir, "--block_size", "64", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-3", "--max_steps", "3", "--logging_steps", "1", "--save_steps", "0",
            "--deepspeed", REPO / "ds_configs/zero2.json", "--report_to", "none", "--output_dir", out]
    procs = []
    t0 = time.monotonic()
    for r in range(2):
        cmd = ["deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank", str(r),
               "--master_addr", slurm_cluster.addrs[0], "--master_port", "29533", "launch/train.py", *args]
        procs.append(slurm_cluster.host_popen(cmd, host=r, cwd=str(REPO), env=env, stderr=subprocess.STDOUT,
                                              stdout=open(tmp_path / f"node{r}.log", "w")))
    try:
        rcs = [p.wait(300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"node{r}.log").read_text(errors="replace") for r in range(2)]
    print(f"deepspeed --no_ssh pt run: {time.monotonic() - t0:.1f}s")
    assert rcs == [0, 0], "\n".join(x[-4000:] for x in logs)
    assert re.search(r"^rank 0/2 on host node1\b", logs[0], re.M)
    assert re.search(r"^rank 1/2 on host node2\b", logs[1], re.M)
    recs = metrics(out)
    assert sorted(recs) == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in recs.values())
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
