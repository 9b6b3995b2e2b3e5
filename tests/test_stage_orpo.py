"""ORPO / SimPO: a 2-rank ZeRO-3 ORPO run (loss = chosen NLL - beta * log sigmoid(log odds ratio), as
logged) and SimPO on MedicalGPT's real sample with over-long pairs dropped."""
import math
import os

import pytest

from tests.launch_utils import SHARED_DATA, ds_config_copy, losses, metrics, train
from tests.helpers import split_demo_pairs


@pytest.mark.distributed
def test_orpo_zero3_two_ranks(tmp_path, tiny_base_dir):
    train_file, eval_file = split_demo_pairs(tmp_path / "data")
    out = tmp_path / "orpo"
    ds = ds_config_copy(tmp_path, "zero3", stage3_param_persistence_threshold=0)
    train(["--stage", "orpo", "--model_name_or_path", tiny_base_dir, "--template_name", "chatml", "--train_file_dir", train_file,
           "--validation_file_dir", eval_file, "--max_source_length", "64", "--max_target_length", "64", "--orpo_beta", "0.5",
           "--deepspeed", ds, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
           "--learning_rate", "5e-3", "--max_steps", "4", "--logging_steps", "1", "--eval_steps", "4",
           "--output_dir", str(out), "--report_to", "none"], nproc=2)
    recs = metrics(str(out))
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs + metrics(str(out), "eval"):
        # every term is a mean over the step's pairs across ranks and micro batches, so the identity holds as logged
        assert r["loss"] == pytest.approx(r["nll_loss"] - 0.5 * r["log_odds_ratio"], rel=1e-5)
        assert r["nll_loss"] == pytest.approx(-r["logps/chosen"], rel=1e-5)  # SFT term = mean NLL of the chosen answers
        assert r["log_odds_ratio"] < 0 and math.isfinite(r["log_odds_chosen"])
    assert recs[-1]["nll_loss"] < recs[0]["nll_loss"]  # the SFT part trains
    assert (out / "model.safetensors").exists()


@pytest.mark.smoke
def test_simpo_real_medicalgpt_pairs_drop_overlong(tmp_path, tiny_base_dir):
    path = os.path.join(SHARED_DATA, "reward", "dpo_zh_500.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"real MedicalGPT sample not present at {path}")
    out = tmp_path / "simpo_real"
    p = train(["--stage", "orpo", "--loss_type", "simpo", "--simpo_beta", "2.0", "--simpo_gamma", "0.5",
               "--model_name_or_path", tiny_base_dir, "--template_name", "qwen", "--train_file_dir", path,
               "--max_train_samples", "48", "--max_source_length", "256", "--max_target_length", "512",
               "--truncation_mode", "drop", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
               "--max_steps", "2", "--logging_steps", "1", "--output_dir", str(out), "--report_to", "none"])
    line = next(x for x in p.stdout.splitlines() if x.startswith("simpo train:"))
    kept = int(line.split()[2])
    assert 2 <= kept < 48 and f"{48 - kept} dropped as over-long" in line
    curve = losses(str(out))
    assert sorted(curve) == [1, 2] and all(math.isfinite(v) for v in curve.values())
