"""Ulysses sequence parallelism on 2 ranks (gloo's all_to_all on CPU) against one rank with the same
global batch (micro x accumulation x data-parallel size, data-parallel size 1 here): per-step losses
and gradient norms, and the final weights, for sft with packing under ZeRO-3 (persistence threshold 0:
really sharded; evaluation too), LoRA under ZeRO-3 with gradient checkpointing (a frozen, partitioned
output head), and dpo with LoRA under ZeRO-2 (the disabled adapter as reference). An SP checkpoint
converts to Hugging Face and resumes exactly.

Tolerances: both sides compute the same global token-mean loss in fp32; only the order of reductions
differs (all-to-all, per-slice sums, bucketed reduce-scatter), ~1e-7 relative per step. 1e-5 on
losses of ~6 (1e-6 relative on log-prob sums of ~-150) and 1e-4 relative on gradient norms leave two orders of magnitude of margin, while a
real bug (a token scored twice or not at all, samples attending across a packing boundary, gradients
averaged over the wrong number of ranks — DeepSpeed's ZeRO-3 reduce-scatter divides by the world)
moves them by >1e-3. LoRA runs use lora_dropout 0: dropout masks are drawn per rank and differ.
"""
import json
import os
import shutil

import pytest
import torch

from tests.launch_utils import ROOT, ds_config_copy, losses, metrics, train
from tests.helpers import split_demo_pairs

pytestmark = [pytest.mark.distributed, pytest.mark.invariant]
DEMO = os.path.join(ROOT, "data", "demo")


def sft_args(base, out, *extra):
    return ["--stage", "sft", "--model_name_or_path", base, "--template_name", "chatml", "--train_file_dir",
            f"{DEMO}/sft", "--model_max_length", "128", "--per_device_train_batch_size", "2", "--learning_rate", "2e-3",
            "--lr_scheduler_type", "constant", "--max_steps", "4", "--logging_steps", "1", "--save_steps", "2",
            "--seed", "7", "--validation_split_percentage", "10", "--eval_steps", "4", "--report_to", "none",
            "--output_dir", str(out), *extra]


def dpo_args(base, out, train_file, *extra):
    return ["--stage", "dpo", "--model_name_or_path", base, "--template_name", "chatml", "--train_file_dir", train_file,
            "--max_source_length", "64", "--max_target_length", "64", "--per_device_train_batch_size", "2",
            "--learning_rate", "5e-3", "--lr_scheduler_type", "constant", "--max_steps", "3", "--logging_steps", "1",
            "--save_steps", "0", "--seed", "7", "--report_to", "none", "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_base_dir):
    tmp = tmp_path_factory.mktemp("sp")
    z3 = ds_config_copy(tmp, "zero3", stage3_param_persistence_threshold=0)
    z2 = os.path.join(ROOT, "ds_configs", "zero2.json")
    lora = ["--use_peft", "--lora_rank", "4", "--lora_dropout", "0", "--learning_rate", "1e-2", "--gradient_checkpointing"]
    train_file, _ = split_demo_pairs(tmp / "pairs")
    r = {name: tmp / name for name in ("sp_z3", "one_z3", "sp_lora", "one_lora", "sp_dpo", "one_dpo", "resumed")}
    r["sp_z3_log"] = train(sft_args(tiny_base_dir, r["sp_z3"], "--deepspeed", z3, "--sequence_parallel_size", "2"),
                           nproc=2).stdout
    train(sft_args(tiny_base_dir, r["one_z3"], "--deepspeed", z3), nproc=1)
    train(sft_args(tiny_base_dir, r["sp_lora"], "--deepspeed", z3, *lora, "--sequence_parallel_size", "2"), nproc=2)
    train(sft_args(tiny_base_dir, r["one_lora"], "--deepspeed", z3, *lora), nproc=1)
    dpo_lora = ["--use_peft", "--lora_rank", "4", "--lora_dropout", "0", "--reference", "adapter"]
    train(dpo_args(tiny_base_dir, r["sp_dpo"], train_file, "--deepspeed", z2, *dpo_lora, "--sequence_parallel_size", "2"),
          nproc=2)
    train(dpo_args(tiny_base_dir, r["one_dpo"], train_file, "--deepspeed", z2, *dpo_lora), nproc=1)
    # resume the SP run from its step-2 checkpoint
    r["resumed"].mkdir()
    shutil.copytree(r["sp_z3"] / "checkpoint-2", r["resumed"] / "checkpoint-2")
    (r["resumed"] / "latest").write_text("checkpoint-2")
    train(sft_args(tiny_base_dir, r["resumed"], "--deepspeed", z3, "--sequence_parallel_size", "2",
                   "--resume_from_checkpoint", "auto"), nproc=2)
    return r


def assert_same_steps(a_dir, b_dir, steps, keys=("loss",)):
    a = {m["step"]: m for m in metrics(str(a_dir))}
    b = {m["step"]: m for m in metrics(str(b_dir))}
    assert sorted(a) == sorted(b) == steps, (a, b)
    for s in steps:
        for k in keys:
            assert a[s][k] == pytest.approx(b[s][k], rel=1e-6, abs=1e-5), (s, k, a[s][k], b[s][k])
        assert a[s]["grad_norm"] == pytest.approx(b[s]["grad_norm"], rel=1e-4), (s, a[s]["grad_norm"], b[s]["grad_norm"])


def test_sft_packed_zero3_equals_one_rank(runs):
    assert "sequence parallel: 2 ranks per sample (Ulysses), data-parallel size 1" in runs["sp_z3_log"]
    assert "sft: loss computed in chunks of 1024 tokens" in runs["sp_z3_log"]
    assert_same_steps(runs["sp_z3"], runs["one_z3"], [1, 2, 3, 4])
    curve = losses(str(runs["sp_z3"]))
    assert curve[4] < curve[1]
    (sp_eval,), (one_eval,) = metrics(str(runs["sp_z3"]), "eval"), metrics(str(runs["one_z3"]), "eval")
    assert sp_eval["units"] == one_eval["units"] > 0 and sp_eval["loss"] == pytest.approx(one_eval["loss"], abs=1e-5)
    from safetensors.torch import load_file

    sp, one = load_file(str(runs["sp_z3"] / "model.safetensors")), load_file(str(runs["one_z3"] / "model.safetensors"))
    assert sorted(sp) == sorted(one)
    for k in sp:
        torch.testing.assert_close(sp[k], one[k], atol=1e-5, rtol=0)
    state = json.loads((runs["sp_z3"] / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["consumed_items"] == 4 * 2  # micro 2 x accumulation 1 x data-parallel 1 per step


def test_sft_lora_zero3_checkpointing_equals_one_rank(runs):
    assert_same_steps(runs["sp_lora"], runs["one_lora"], [1, 2, 3, 4])
    from safetensors.torch import load_file

    sp = load_file(str(runs["sp_lora"] / "adapter_model.safetensors"))
    one = load_file(str(runs["one_lora"] / "adapter_model.safetensors"))
    assert sp and sorted(sp) == sorted(one)
    for k in sp:
        torch.testing.assert_close(sp[k], one[k], atol=1e-5, rtol=0)


def test_dpo_lora_zero2_adapter_reference_equals_one_rank(runs):
    assert_same_steps(runs["sp_dpo"], runs["one_dpo"], [1, 2, 3],
                      keys=("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"))
    first = metrics(str(runs["sp_dpo"]))[0]
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-5)  # the policy starts as its reference


def test_sp_checkpoint_converts_and_resumes_exactly(runs, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.launch_utils import env

    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "zero_to_hf.py"), "--checkpoint_dir",
                    str(runs["sp_z3"] / "checkpoint-4"), "--output_dir", str(tmp_path / "hf")],
                   check=True, env=env(), cwd=ROOT, capture_output=True)
    converted, exported = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(runs["sp_z3"] / "model.safetensors"))
    assert all(torch.equal(converted[k], exported[k]) for k in exported)
    resumed, full = losses(str(runs["resumed"])), losses(str(runs["sp_z3"]))
    assert sorted(resumed) == [3, 4] and all(abs(resumed[s] - full[s]) < 1e-6 for s in (3, 4))
