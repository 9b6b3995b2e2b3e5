"""bench/gpu_suite.sh --dry-run on CPU: every section's code path runs with tiny shapes and the
suite writes its JSON and table, so the GPU suite cannot rot between GPU sessions. No timing is
asserted (speed lives in the results, not in tests)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(os.path.dirname(REPO), "shared", "data", "medicalgpt", "sft", "medical_sft_1K_format.jsonl")

pytestmark = pytest.mark.bench


def _env():
    return dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


@pytest.mark.skipif(not os.path.exists(SFT), reason="needs ../shared/data/medicalgpt (the MedicalGPT sft sample)")
def test_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_suite.sh"), "--dry-run", "--out", str(out),
                        "--workdir", str(tmp_path / "wd")], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=3000)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads((out / "gpu_suite_dryrun.json").read_text())
    assert result["dry_run"] is True and result["versions"]["torch"]
    secs = result["sections"]
    assert list(secs) == ["flash_packing", "sft", "memory", "grpo"]

    flash = secs["flash_packing"]
    if os.path.exists(os.path.join(REPO, "bench", "gpu_flash_packing.py")):
        assert flash["status"] == "ok" and isinstance(flash["result"], dict), flash
    else:
        assert flash["status"] == "not present"

    sft = {r["group"]: r for r in secs["sft"]["runs"]}
    assert sft["packed-gc_off"]["status"] == "ok", sft["packed-gc_off"]
    packed = sft["packed-gc_off"]["sides"]
    assert set(packed) == {"medgpt-ds", "TRL SFTTrainer"}
    for side in packed.values():
        assert "error" not in side, side
        assert side["tokens_per_s"] > 0 and side["tflops"] > 0
        assert "mfu" not in side  # no peak on CPU
    assert packed["medgpt-ds"]["pad_frac"] < 0.2 and packed["TRL SFTTrainer"]["pad_frac"] == 0.0
    assert sft["packed-gc_off"]["ratios"]["medgpt-ds / TRL SFTTrainer"]["n"] == 1
    assert sft["padded-gc_off"]["status"] == "ok" and sft["padded-gc_off"]["sides"]["medgpt-ds"]["pad_frac"] > 0
    assert sft["packed-gc_off"]["settings"]["attention"] == "sdpa"

    mem = secs["memory"]
    assert mem["largest_full_finetune_zero3_offload"] == "tiny", mem
    full = mem["full_attempts"][0]
    assert full["status"] == "ok" and full["steps"] == 2 and full["peak_host_rss_gib"] > 0
    assert mem["lora"]["status"] == "ok" and mem["lora"]["steps"] == 2, mem["lora"]

    grpo = secs["grpo"]["backends"]
    hybrid = grpo["hybrid"]
    assert hybrid["status"] == "ok", hybrid
    assert hybrid["generation_s"] > 0 and hybrid["scoring_s"] > 0 and hybrid["training_s"] > 0
    assert 0 < hybrid["response_length"] <= 8 and hybrid["responses_per_step"] == 2
    if os.path.exists(os.path.join(REPO, ".venv-rollout", "bin", "python")):  # make rollout-env: it must run
        vllm = grpo["vllm"]
        assert vllm["status"] == "ok", vllm.get("error", vllm)[-3000:]
        assert vllm["generation_s"] > 0 and 0 < vllm["response_length"] <= 8
    else:
        assert grpo["vllm"]["status"] != "ok"  # says why not

    table = (out / "gpu_suite_dryrun.md").read_text()
    assert "| section | run | tokens/s | TFLOP/s | MFU |" in table and "| grpo | tiny-h32 hybrid |" in table


def test_refuses_without_a_gpu_and_never_reaches_the_network(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the suite would run for real")
    p = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_suite.sh"), "--out", str(tmp_path)], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: the GPU suite needs a CUDA GPU")
    p = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_suite.sh"), "--wheels", str(tmp_path / "none")],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "error: --wheels" in p.stderr
    script = open(os.path.join(REPO, "bench", "gpu_suite.sh")).read()
    installs = [line for line in script.splitlines() if "pip install" in line]
    assert installs and all("--no-index" in line for line in installs)
