"""--stage grpo end to end through launch/train.py: a rule reward the tiny model learns, two ranks
under ZeRO-3 (ranks stop generating at different lengths, a reward model beside rule rewards) with
an exact resume after a crash, LoRA on MedicalGPT's grpo sample, and the ds_hybrid error on CPU.
"""
from __future__ import annotations

import os

import pytest

from tests.launch_utils import SHARED_DATA, crash_then_resume, ds_config_copy, metrics, train
from tests.helpers import make_rl_assets

RULE = "tests.helpers:starts_with_space"


@pytest.fixture(scope="module")
def assets(tmp_path_factory, demo_tokenizer_dir, tiny_llama):
    return make_rl_assets(str(tmp_path_factory.mktemp("grpo_assets")), demo_tokenizer_dir, tiny_llama)


def _args(assets, out, *extra) -> list[str]:
    return ["--stage", "grpo", "--model_name_or_path", assets["actor"], "--template_name", "chatml",
            "--train_file_dir", "data/demo/grpo", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
            "--logging_steps", "1", "--report_to", "none", "--output_dir", str(out), *extra]


def _by_step(out) -> dict[int, dict]:
    """The last logged record of each step (a resumed run appends to the same jsonl)."""
    return {r["step"]: {k: v for k, v in r.items() if isinstance(v, (int, float)) and not k.startswith("time")}
            for r in metrics(out)}


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


@pytest.mark.smoke
def test_grpo_learns_a_rule_reward(tmp_path, assets):
    # reward 1 when the response starts with a space (a new word); top_k 8 keeps the action space
    # small enough for a random 2-layer model (measured, seeds 1-2: ~0.2 -> ~0.9 in 14 steps)
    out = tmp_path / "learn"
    train(_args(assets, out, "--reward_funcs", RULE, "--num_generations", "8", "--per_device_train_batch_size", "32",
                "--max_new_tokens", "4", "--top_k", "8", "--max_steps", "14", "--save_steps", "0"))
    rewards = [r["reward"] for r in metrics(out)]
    assert len(rewards) == 14
    first, last = _mean(rewards[:3]), _mean(rewards[-4:])
    assert last >= first + 0.3 and last >= 0.7, rewards
    assert os.path.isfile(out / "model.safetensors") and os.path.isfile(out / "tokenizer.json")


@pytest.mark.smoke
@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp"])
def test_grpo_critic_free_estimators_learn_with_dynamic_sampling(tmp_path, assets, estimator):
    # the same task with the KL in the reward (beta) and the advantages of RLOO / REINFORCE++; rloo
    # also runs DAPO's dynamic sampling: groups with all-equal rewards are dropped (counted) and refilled
    out = tmp_path / estimator
    extra = ["--dynamic_sampling", "--max_sampling_rounds", "2"] if estimator == "rloo" else []
    p = train(_args(assets, out, "--reward_funcs", RULE, "--advantage_estimator", estimator, "--beta", "0.04",
                    "--num_generations", "8", "--per_device_train_batch_size", "32", "--max_new_tokens", "4",
                    "--top_k", "8", "--max_steps", "14", "--save_steps", "0", *extra))
    assert f"advantages {estimator}" in p.stdout
    m = _by_step(out)
    rewards = [m[s]["reward"] for s in sorted(m)]
    assert len(rewards) == 14
    # 32 responses a step make single steps noisy (measured: REINFORCE++ can drop from 1.0 to ~0.1 for a
    # step when every reward is equal, its batch-normalised advantages are then KL noise), so the second
    # half's mean is compared with the untrained policy's first step (~0.2-0.35)
    assert _mean(rewards[7:]) >= rewards[0] + 0.3 and _mean(rewards[7:]) >= 0.6, rewards
    assert all(r["kl"] >= 0 for r in m.values()) and any(r["kl"] > 0 for r in m.values())
    if estimator == "rloo":
        dropped = sum(r["dynamic_sampling/dropped_groups"] for r in m.values())
        assert dropped > 0 and any(r["dynamic_sampling/rounds"] > 1 for r in m.values())
        # every step trains on 4 groups; a step that refilled from dropped groups says how many
        assert all(r["frac_reward_zero_std"] * 4 == pytest.approx(r["dynamic_sampling/filled_groups"]) for r in m.values())
    else:
        assert "dynamic_sampling/rounds" not in m[1]


@pytest.mark.distributed
def test_grpo_two_ranks_zero3_different_lengths_and_exact_resume(tmp_path, assets):
    ds = ds_config_copy(tmp_path, "zero3", stage3_param_persistence_threshold=0)
    args = ["--reward_model_path", assets["rm"], "--reward_funcs", f"{RULE},format", "--reward_weights", "1.0,0.5",
            "--num_generations", "4", "--per_device_train_batch_size", "2", "--max_new_tokens", "10",
            "--loss_type", "dapo", "--epsilon_high", "0.28",  # 2 minibatches per rollout: old log-probs, clipping
            "--stop", "e", "--max_steps", "4", "--save_steps", "2", "--deepspeed", ds]
    full, part = tmp_path / "full", tmp_path / "part"
    train(_args(assets, full, *args), nproc=2)
    m_full = _by_step(full)
    assert sorted(m_full) == [1, 2, 3, 4]
    # ranks decoded for different numbers of steps and nothing deadlocked
    assert any(r["generation_steps_min"] != r["generation_steps_max"] for r in m_full.values()), m_full
    assert all(0.0 < r["eos_fraction"] <= 1.0 for r in m_full.values())  # the stop string ended responses
    assert "reward/reward_model" in m_full[1] and "reward/format" in m_full[1]
    assert all(r["kl"] > 0 for s, r in m_full.items() if s > 1)  # the policy moved off the reference
    assert os.path.isfile(full / "model.safetensors")

    crash_then_resume(_args(assets, part, *args), nproc=2, fail_rank=1, fail_step=3, resumes_from="checkpoint-2")
    m_part = _by_step(part)
    for step in (3, 4):  # rollout RNG, prompt order and weights all restored: the same numbers
        assert m_part[step] == pytest.approx(m_full[step], rel=1e-6, abs=1e-9), step


@pytest.mark.smoke
def test_grpo_lora_on_medicalgpt_sample_stop_file_and_resume(tmp_path, assets):
    data = os.path.join(SHARED_DATA, "grpo", "sample.jsonl")
    if not os.path.isfile(data):
        pytest.skip(f"MedicalGPT sample data not found at {data}")
    out = tmp_path / "real"
    args = _args(assets, out, "--train_file_dir", data, "--use_peft", "--lora_rank", "4",
                 "--reward_funcs", "format,answer_normalized", "--num_generations", "4",
                 "--per_device_train_batch_size", "8", "--max_new_tokens", "8", "--max_source_length", "96",
                 "--max_steps", "2", "--save_steps", "0")
    out.mkdir()
    (out / ".stop").write_text("")  # as a scheduler's stop request: finish the step, checkpoint, exit
    p = train(args + ["--overwrite_output_dir"])
    assert "32 prompt records" in p.stdout and "stop requested" in p.stdout
    assert os.path.isfile(out / "PREEMPTED") and os.path.isdir(out / "checkpoint-1") and not os.path.exists(out / ".stop")
    train(args + ["--resume_from_checkpoint", "auto"])
    rec = metrics(out)
    assert [r["step"] for r in rec] == [1, 2] and all(r["kl"] >= 0 for r in rec)
    assert os.path.isfile(out / "adapter_model.safetensors")  # LoRA: the adapter is the export
    assert not os.path.exists(out / "PREEMPTED")


@pytest.mark.smoke
def test_ds_hybrid_is_refused_on_cpu_before_loading(tmp_path, assets):
    p = train(_args(assets, tmp_path / "dsh", "--rollout_backend", "ds_hybrid", "--max_steps", "1"), check=False)
    assert p.returncode != 0
    assert "CUDA kernels only" in p.stderr and "--rollout_backend hybrid" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.unit
def test_grpo_flags(assets):
    from medgpt_ds.config import parse_args
    from medgpt_ds.stages.grpo import Arguments

    cfg = parse_args(["--stage", "grpo", "--model_name_or_path", assets["actor"], "--output_dir", "x",
                      "--loss_type", "token", "--scale_rewards", "False", "--reward_funcs", "format,answer_choice",
                      "--reward_weights", "0.5,1", "--stop", r"</answer>,\n"], {"grpo": Arguments})
    a = cfg.stage_args
    assert a.loss_type == "bnpo" and a.scale_rewards is False and a.stop_strings() == ["</answer>", "\n"]
    assert Arguments(loss_type="sequence").loss_type == "grpo"
    for bad, match in (({"loss_type": "mean"}, "loss_type"), ({"num_generations": 1}, "num_generations"),
                       ({"num_iterations": 0}, "num_iterations"), ({"beta": -1.0}, "beta")):
        with pytest.raises(ValueError, match=match):
            Arguments(**bad)
    from medgpt_ds.errors import UserError

    with pytest.raises(UserError, match="num_generations"):
        parse_args(["--stage", "grpo", "--output_dir", "x", "--num_generations", "1"], {"grpo": Arguments})
