"""--stage ppo end to end through launch/train.py: a rule reward the tiny model learns (critic from
the actor) with an exact resume after a crash, the critic-free estimators (RLOO with DAPO's dynamic
sampling), two ranks under ZeRO-3 with the per_token backend (synced_gpus: ranks stop at different
lengths) and a reward model that also initialises the critic, LoRA on prompts from MedicalGPT's sft
conversations.
"""
from __future__ import annotations

import json
import os

import pytest

from tests.launch_utils import SHARED_DATA, crash_then_resume, ds_config_copy, metrics, train
from tests.helpers import make_rl_assets

RULE = "tests.helpers:starts_with_space"


@pytest.fixture(scope="module")
def assets(tmp_path_factory, demo_tokenizer_dir, tiny_llama):
    return make_rl_assets(str(tmp_path_factory.mktemp("ppo_assets")), demo_tokenizer_dir, tiny_llama)


def _args(assets, out, *extra) -> list[str]:
    return ["--stage", "ppo", "--sft_model_path", assets["actor"], "--template_name", "chatml",
            "--train_file_dir", "data/demo/sft", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
            "--logging_steps", "1", "--report_to", "none", "--output_dir", str(out), *extra]


def _by_step(out) -> dict[int, dict]:
    """The last logged record of each step (a resumed run appends to the same jsonl)."""
    return {r["step"]: {k: v for k, v in r.items() if isinstance(v, (int, float)) and not k.startswith("time")}
            for r in metrics(out)}


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


@pytest.mark.smoke
def test_ppo_learns_a_rule_reward_and_resumes_exactly(tmp_path, assets):
    # reward 1 when the response starts with a space (a new word), top_k 8 (measured, seeds 1-2:
    # ~0.2 -> 1.0 in 14 steps); 2 ppo epochs x 2 minibatches so ratios, clipping and value clipping act
    args = ["--reward_funcs", RULE, "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
            "--rollout_batch_size", "32", "--ppo_epochs", "2", "--max_new_tokens", "4", "--top_k", "8",
            "--adaptive_kl", "--target_kl", "1.0", "--kl_horizon", "100", "--max_steps", "14", "--save_steps", "7"]
    full, part = tmp_path / "full", tmp_path / "part"
    train(_args(assets, full, *args))
    m_full = _by_step(full)
    rewards = [m_full[s]["reward"] for s in sorted(m_full)]
    assert len(rewards) == 14
    assert _mean(rewards[-4:]) >= _mean(rewards[:3]) + 0.3 and _mean(rewards[-4:]) >= 0.7, rewards
    assert any(r["clipfrac"] > 0 for r in m_full.values()) and any(r["approx_kl"] > 0 for r in m_full.values())
    assert len({r["kl_coef"] for r in m_full.values()}) > 1  # the adaptive controller moved
    assert os.path.isdir(full / "checkpoint-14" / "critic") and os.path.isfile(full / "model.safetensors")

    crash_then_resume(_args(assets, part, *args), nproc=1, fail_rank=0, fail_step=9, resumes_from="checkpoint-7")
    m_part = _by_step(part)
    for step in range(8, 15):  # actor, critic, optimizers, KL coefficient, rollout RNG, prompt order
        assert m_part[step] == pytest.approx(m_full[step], rel=1e-6, abs=1e-9), step


@pytest.mark.smoke
@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp"])
def test_ppo_critic_free_estimators_learn_a_rule_reward(tmp_path, assets, estimator):
    # MedicalGPT's run_ppo.sh trains RLOO (TRL): 4 samples per prompt, leave-one-out baseline; REINFORCE++
    # normalises over the batch. No critic is built or checkpointed; the reward rises as with GAE. rloo also
    # runs DAPO's dynamic sampling: groups with all-equal rewards are dropped (counted) and topped up
    out = tmp_path / estimator
    extra = ["--dynamic_sampling", "--max_sampling_rounds", "2"] if estimator == "rloo" else []
    p = train(_args(assets, out, "--reward_funcs", RULE, "--advantage_estimator", estimator, "--num_generations", "4",
                    "--rollout_batch_size", "8", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps",
                    "2", "--ppo_epochs", "2", "--max_new_tokens", "4", "--top_k", "8", "--max_steps", "14",
                    "--save_steps", "7", *extra))
    assert f"advantages {estimator}, no critic" in p.stdout and "8 prompts x 4 responses" in p.stdout
    m = _by_step(out)
    rewards = [m[s]["reward"] for s in sorted(m)]
    assert len(rewards) == 14
    # 32 responses a step make single steps noisy (measured: REINFORCE++ can drop from 1.0 to ~0.1 for a
    # step when every reward is equal, its batch-normalised advantages are then KL noise), so the second
    # half's mean is compared with the untrained policy's first step (~0.2-0.35)
    assert _mean(rewards[7:]) >= rewards[0] + 0.3 and _mean(rewards[7:]) >= 0.6, rewards
    assert all("value_loss" not in r and "explained_variance" not in r for r in m.values())
    assert any(r["kl"] > 0 for r in m.values()) and any(r["clipfrac"] > 0 for r in m.values())
    assert not os.path.exists(out / "checkpoint-14" / "critic") and os.path.isfile(out / "model.safetensors")
    if estimator == "rloo":
        assert "dynamic sampling (up to 2 extra rounds)" in p.stdout
        rounds = {s: r["dynamic_sampling/rounds"] for s, r in m.items()}
        assert sum(r["dynamic_sampling/dropped_groups"] for r in m.values()) > 0 and max(rounds.values()) > 1, m
        assert all(1 <= n <= 3 for n in rounds.values())
        # every step trains on 8 groups: those with a signal, topped up with dropped ones only when the rounds ran out
        assert all(r["frac_reward_zero_std"] * 8 == pytest.approx(r["dynamic_sampling/filled_groups"]) for r in m.values())
        assert all(r["dynamic_sampling/filled_groups"] == 0 for s, r in m.items() if rounds[s] < 3)
        # the checkpointed prompt cursor advanced by the batches generated (a resume continues after them)
        for step in (7, 14):
            with open(out / f"checkpoint-{step}" / "trainer_state.json") as f:
                assert json.load(f)["extra"]["prompt_batches"] == sum(rounds[s] for s in range(1, step + 1))
    else:
        assert "dynamic_sampling/rounds" not in m[1] and "dynamic sampling" not in p.stdout


@pytest.mark.distributed
def test_ppo_two_ranks_zero3_per_token_backend_with_reward_model(tmp_path, assets):
    ds = ds_config_copy(tmp_path, "zero3", stage3_param_persistence_threshold=0)
    out = tmp_path / "z3"
    p = train(_args(assets, out, "--reward_model_path", assets["rm"], "--rollout_backend", "per_token",
                    "--reward_funcs", RULE, "--reward_weights", "0.5", "--stop", "e", "--max_new_tokens", "10",
                    "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "3",
                    "--missing_eos_penalty", "1.0", "--offload_frozen", "--save_steps", "0", "--deepspeed", ds), nproc=2)
    assert f"critic from {assets['rm']}" in p.stdout
    m = _by_step(out)
    assert sorted(m) == [1, 2, 3]
    # per_token keeps the ZeRO-3 gathers collective with synced_gpus; ranks still end at different lengths
    assert any(r["generation_steps_min"] != r["generation_steps_max"] for r in m.values()), m
    assert all("reward/reward_model" in r and r["value_loss"] > 0 for r in m.values())
    assert os.path.isfile(out / "model.safetensors") and os.path.isdir(out / "checkpoint-3" / "critic")


@pytest.mark.smoke
def test_ppo_lora_on_medicalgpt_sft_prompts(tmp_path, assets):
    data = os.path.join(SHARED_DATA, "sft", "medical_sft_1K_format.jsonl")
    if not os.path.isfile(data):
        pytest.skip(f"MedicalGPT sample data not found at {data}")
    out = tmp_path / "real"
    p = train(_args(assets, out, "--train_file_dir", data, "--max_train_samples", "40", "--use_peft", "--lora_rank", "4",
                    "--reward_model_path", assets["rm"], "--max_source_length", "96", "--max_new_tokens", "8",
                    "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_steps", "2"))
    assert "prompts: 40" in p.stdout  # every human turn (with its history) of the conversations is a prompt
    rec = metrics(out)
    assert [r["step"] for r in rec] == [1, 2] and all(r["response_length"] > 0 for r in rec)
    # LoRA: the reference is the actor with its adapter disabled; the adapter is the export
    assert os.path.isfile(out / "adapter_model.safetensors") and os.path.isdir(out / "checkpoint-2" / "critic")


@pytest.mark.unit
def test_ppo_flags(assets):
    from medgpt_ds.config import parse_args
    from medgpt_ds.errors import UserError
    from medgpt_ds.stages.ppo import Arguments

    cfg = parse_args(["--stage", "ppo", "--sft_model_path", assets["actor"], "--reward_model_path", assets["rm"],
                      "--output_dir", "x", "--kl_estimator", "k3", "--adaptive_kl", "--missing_eos_penalty", "1.0",
                      "--rollout_backend", "per_token"], {"ppo": Arguments})
    a = cfg.stage_args
    assert (a.kl_estimator, a.adaptive_kl, a.missing_eos_penalty, a.rollout_backend) == ("k3", True, 1.0, "per_token")
    for bad, match in (({"ppo_epochs": 0}, "ppo_epochs"), ({"lam": 1.5}, "lam"), ({"kl_coef": -0.1}, "kl_coef"),
                       ({"cliprange": 0.0}, "cliprange"), ({"advantage_estimator": "ppo"}, "advantage_estimator"),
                       ({"advantage_estimator": "rloo"}, "num_generations >= 2"),
                       ({"max_sampling_rounds": -1}, "max_sampling_rounds")):
        with pytest.raises(ValueError, match=match):
            Arguments(**bad)
    # dynamic sampling needs prompt groups: refused for gae (the default) and a group of 1, one line naming the flag
    base = ["--stage", "ppo", "--sft_model_path", assets["actor"], "--reward_funcs", RULE, "--output_dir", "x",
            "--dynamic_sampling"]
    for extra, got in (([], "got gae with 1"), (["--num_generations", "4"], "got gae with 4"),
                       (["--advantage_estimator", "reinforce_pp"], "got reinforce_pp with 1")):
        with pytest.raises(UserError, match="^--dynamic_sampling .*needs a group estimator") as e:
            parse_args(base + extra, {"ppo": Arguments})
        assert got in str(e.value) and "\n" not in str(e.value)
    a = parse_args(base + ["--advantage_estimator", "rloo", "--num_generations", "4", "--max_sampling_rounds", "1"],
                   {"ppo": Arguments}).stage_args
    assert (a.dynamic_sampling, a.max_sampling_rounds, a.advantage_estimator) == (True, 1, "rloo")
