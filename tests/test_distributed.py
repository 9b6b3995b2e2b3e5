"""Two ranks through the `deepspeed` launcher (gloo on CPU): ZeRO-2 / ZeRO-3 (persistence threshold
0, so tiny parameters really are sharded), full and LoRA, with and without offload; invariance of
the loss curve across batch layouts and ZeRO stages; exact resume after a crash; exports that
reproduce the engine's weights.

Tolerances: every run below computes the same global token-mean loss from the same data in fp32;
only the order of floating-point reductions differs (across ranks, buckets and micro batches), which
moves the loss by ~1e-7 relative per step, and Adam turns that into parameter differences of the
same relative size. 2e-4 absolute on losses of ~6 over 6 steps leaves two orders of magnitude of
margin while any real bug (a wrong normaliser, a dropped micro batch, a rank seeing other data)
shifts the loss by >1e-2.
"""
import json
import math
import os

import pytest
import torch

from tests.launch_utils import ROOT, ds_config_copy, losses, train

pytestmark = pytest.mark.distributed
DEMO = os.path.join(ROOT, "data", "demo")
TOL = 2e-4


def sft_args(base, out, *extra):
    return ["--stage", "sft", "--model_name_or_path", base, "--template_name", "chatml",
            "--train_file_dir", f"{DEMO}/sft", "--model_max_length", "128", "--per_device_train_batch_size", "2",
            "--learning_rate", "2e-3", "--lr_scheduler_type", "constant", "--max_steps", "6", "--logging_steps", "1",
            "--save_steps", "3", "--seed", "7", "--report_to", "none", "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_base_dir):
    """Launch every configuration once; the tests below compare their outputs."""
    tmp = tmp_path_factory.mktemp("dist")
    z3 = ds_config_copy(tmp, "zero3", stage3_param_persistence_threshold=0)
    z3o = ds_config_copy(tmp, "zero3_offload", stage3_param_persistence_threshold=0)
    z2 = os.path.join(ROOT, "ds_configs", "zero2.json")
    z2o = os.path.join(ROOT, "ds_configs", "zero2_offload.json")
    r = {name: tmp / name for name in ("z3", "z2", "ga2", "z3_lora", "z3_offload", "z2o_lora", "resume")}
    train(sft_args(tiny_base_dir, r["z3"], "--deepspeed", z3), nproc=2)
    train(sft_args(tiny_base_dir, r["z2"], "--deepspeed", z2), nproc=2)
    train(sft_args(tiny_base_dir, r["ga2"], "--gradient_accumulation_steps", "2"), nproc=1)
    train(sft_args(tiny_base_dir, r["z3_offload"], "--deepspeed", z3o), nproc=2)
    lora = ["--use_peft", "--lora_rank", "4", "--target_modules", "all", "--learning_rate", "1e-2"]
    train(sft_args(tiny_base_dir, r["z3_lora"], "--deepspeed", z3, *lora), nproc=2)
    train(sft_args(tiny_base_dir, r["z2o_lora"], "--deepspeed", z2o, *lora), nproc=2)
    # crash on rank 1 at step 5 (after the step-3 checkpoint), then resume from `latest`
    p = train(sft_args(tiny_base_dir, r["resume"], "--deepspeed", z3), nproc=2, check=False,
              MEDGPT_DEBUG_FAIL_RANK=1, MEDGPT_DEBUG_FAIL_STEP=5)
    assert p.returncode != 0 and "MEDGPT_DEBUG_FAIL" in p.stdout + p.stderr
    assert (r["resume"] / "latest").read_text() == "checkpoint-3"
    r["crashed_losses"] = losses(str(r["resume"]))
    train(sft_args(tiny_base_dir, r["resume"], "--deepspeed", z3, "--resume_from_checkpoint", "auto"), nproc=2)
    return r


def assert_same_curve(a: dict, b: dict, tol: float = TOL) -> None:
    assert sorted(a) == sorted(b) == list(range(1, 7)), (a, b)
    for step in a:
        assert abs(a[step] - b[step]) < tol, f"step {step}: {a[step]} vs {b[step]}"


def test_loss_finite_and_learning(runs):
    for name in ("z3", "z2", "ga2", "z3_lora", "z3_offload", "z2o_lora"):
        curve = losses(str(runs[name]))
        assert all(math.isfinite(v) for v in curve.values()), name
        assert curve[6] < curve[1], (name, curve)


def test_zero2_equals_zero3(runs):
    assert_same_curve(losses(str(runs["z2"])), losses(str(runs["z3"])))


def test_one_rank_ga2_equals_two_ranks_ga1(runs):
    assert_same_curve(losses(str(runs["ga2"])), losses(str(runs["z3"])))


def test_offload_equals_no_offload(runs):
    assert_same_curve(losses(str(runs["z3_offload"])), losses(str(runs["z3"])))


def test_resume_after_crash_continues_exactly(runs):
    crashed = runs["crashed_losses"]
    assert max(crashed) == 4  # step 4 ran and was logged, step 5 crashed
    resumed = losses(str(runs["resume"]))
    full = losses(str(runs["z3"]))
    assert_same_curve(resumed, full, tol=1e-6)  # same ranks, same reductions: bit-for-bit up to print rounding
    state = json.loads((runs["resume"] / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["consumed_items"] == 6 * 2 * 2


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_zero3_full_export_matches_checkpoint_weights(runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    out = runs["z3"]
    exported = AutoModelForCausalLM.from_pretrained(out)
    ref = AutoModelForCausalLM.from_pretrained(out)
    sd = get_fp32_state_dict_from_zero_checkpoint(str(out), tag="checkpoint-6")
    assert all(v.numel() > 0 for v in sd.values())
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert (missing, unexpected) == ([], [])  # untied lm_head: the checkpoint holds every weight of the model
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    torch.testing.assert_close(_logits(exported, ids), _logits(ref, ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("run", ["z3_lora", "z2o_lora"])
def test_lora_adapter_export_reproduces_engine_weights(runs, tiny_base_dir, run):
    """The adapter saved under ZeRO-3 (gathered) reloads onto a fresh base and gives the same logits as
    the engine's own final weights (read independently through DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = runs[run]
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), str(out))
    engine_weights = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), str(out))
    sd = get_fp32_state_dict_from_zero_checkpoint(str(out), tag="checkpoint-6")
    lora_keys = [k for k in sd if "lora_" in k]
    assert lora_keys and all(sd[k].numel() > 0 for k in lora_keys)
    # every key of the checkpoint lands on the PEFT model (else the comparison below would compare the
    # export with itself): the full ZeRO state holds base and adapter weights under PEFT's own names
    missing, unexpected = engine_weights.load_state_dict(sd, strict=False)
    assert (missing, unexpected) == ([], []), (missing[:5], unexpected[:5])
    assert set(sd) == set(engine_weights.state_dict())
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    got, want = _logits(fresh, ids), _logits(engine_weights, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - _logits(base, ids)).abs().max() > 1e-3  # the adapter is not a no-op


def test_resume_on_another_topology_via_universal_checkpoint(runs, tmp_path):
    """ZeRO-2 x 2 ranks -> universal checkpoint -> resume on 1 rank with ZeRO-3 and GA 2 (same global batch)."""
    import shutil
    import subprocess
    import sys

    from tests.launch_utils import env

    src = tmp_path / "z2"
    shutil.copytree(runs["z2"], src)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "zero_to_universal.py"), "--checkpoint_dir",
                    str(src / "checkpoint-6")], check=True, env=env(), cwd=ROOT, capture_output=True)
    uni = src / "checkpoint-6-universal"
    assert (uni / "trainer_state.json").exists()
    z3 = ds_config_copy(tmp_path, "zero3", stage3_param_persistence_threshold=0)
    args = sft_args("unused", src, "--deepspeed", z3, "--gradient_accumulation_steps", "2", "--max_steps", "8",
                    "--resume_from_checkpoint", str(uni), "--load_universal")
    args[args.index("--model_name_or_path") + 1] = str(runs["z2"])  # the exported model: same architecture
    p = train(args, nproc=1)
    assert "resumed from" in p.stdout and "at step 6" in p.stdout
    before, after = losses(str(runs["z2"])), losses(str(src))
    assert max(after) == 8 and all(math.isfinite(after[s]) for s in (7, 8))
    # the restored weights keep most of the first 6 steps' progress (a fresh start would be back near step 1's loss)
    assert after[7] < before[1] - 0.5 * (before[1] - before[6])


def test_no_shared_memory_left_behind(tmp_path, tiny_base_dir):
    """DeepSpeed's CPU all-reduce maps a ~69 MB /dev/shm segment per rank and never unlinks it; the
    trainer unlinks its own once every rank has mapped them. Even a run whose rank 1 crashes leaves
    nothing behind (DeepSpeed alone left 2 x 69 MB of RAM per run until reboot)."""
    import glob

    from tests.launch_utils import free_port

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this system")
    port = free_port()
    pattern = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"
    p = train(sft_args(tiny_base_dir, tmp_path / "out", "--save_steps", "0"), nproc=2, check=False, port=port,
              MEDGPT_DEBUG_FAIL_RANK=1, MEDGPT_DEBUG_FAIL_STEP=2)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "MEDGPT_DEBUG_FAIL" in out, out[-3000:]
    assert out.count("deepspeed_shm_comm_op built successfully") == 2, out[-3000:]  # the shm all-reduce was in use
    assert glob.glob(pattern) == []
