"""Advantage and KL math of advantages.py (GAE, whitening, group advantages, RLOO, REINFORCE++, KL
estimators, controllers, reward shaping, truncated importance weights), the engine-mismatch pieces of
scoring.py / rl.py (truncated log-probs, the correction's metrics, joining rollouts), against numbers
derived by hand."""

import math

import pytest
import torch

from medgpt_ds import rl
from medgpt_ds.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_advantages,
    kl_estimate,
    masked_moments,
    normalize,
    reward_to_go,
    rloo_scores,
    shape_rewards,
    truncated_importance_weights,
    whiten,
)
from medgpt_ds.generation import Generation
from medgpt_ds.scoring import truncated_logprobs

pytestmark = pytest.mark.unit

LN = math.log


def test_gae_hand_three_steps():
    # gamma 0.9, lam 0.8 (gamma*lam = 0.72), rewards [0, 0, 1], values [0.5, 0.6, 0.7]
    # t=2: delta = 1 + 0 - 0.7 = 0.3                      A2 = 0.3
    # t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03               A1 = 0.03 + 0.72*0.3 = 0.246
    # t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04               A0 = 0.04 + 0.72*0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7]], dtype=torch.float64)
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0]], dtype=torch.float64))


def test_gae_skips_masked_positions_anywhere():
    # The same three valid steps with padding on the left, in the middle and on the right.
    rewards = torch.tensor([[9.0, 0.0, 9.0, 0.0, 1.0, 9.0]], dtype=torch.float64)
    values = torch.tensor([[9.0, 0.5, 9.0, 0.6, 0.7, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 0, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0, 0.21712, 0, 0.246, 0.3, 0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0, 0.71712, 0, 0.846, 1.0, 0]], dtype=torch.float64))


def _naive_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE on each row's valid tokens only, one Python float at a time."""
    adv = torch.zeros_like(values)
    for b in range(values.size(0)):
        idx = [t for t in range(values.size(1)) if mask[b, t]]
        last, next_v = 0.0, 0.0
        for t in reversed(idx):
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b, t] = last
            next_v = float(values[b, t])
    return adv


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_matches_naive_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 9, generator=g, dtype=torch.float64)
    values = torch.randn(5, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 9, generator=g) > 0.3
    mask[0] = False  # an empty row
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = _naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, torch.where(mask, expected + values, 0.0))
    assert (adv[0] == 0).all()


def test_gae_lam_one_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0]]))  # Monte-Carlo returns
    torch.testing.assert_close(adv, torch.tensor([[5.5, 4.5, 2.5]]))


def test_whiten():
    # mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    out = whiten(x, torch.ones(2, 2))
    s = math.sqrt(5 / 3)
    torch.testing.assert_close(out, torch.tensor([[-1.5 / s, -0.5 / s], [0.5 / s, 1.5 / s]], dtype=torch.float64))
    # masked entry ignored and zeroed: mean 2, var 1
    x = torch.tensor([1.0, 2.0, 3.0, 100.0], dtype=torch.float64)
    mask = torch.tensor([1, 1, 1, 0])
    torch.testing.assert_close(whiten(x, mask), torch.tensor([-1.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(
        whiten(x, mask, shift_mean=False), torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    )


def test_group_advantages():
    # group 1: [1, 0, 1, 1], mean 0.75, unbiased std sqrt((3*0.0625 + 0.5625)/3) = 0.5
    # group 2: all equal -> std 0 -> advantages 0
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    adv = group_advantages(r, group_size=4)
    d = 0.5 + 1e-4
    torch.testing.assert_close(adv, torch.tensor([0.25 / d, -0.75 / d, 0.25 / d, 0.25 / d, 0, 0, 0, 0]))
    # Dr. GRPO: mean shift only
    torch.testing.assert_close(
        group_advantages(r, group_size=4, scale_std=False), torch.tensor([0.25, -0.75, 0.25, 0.25, 0, 0, 0, 0])
    )
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(r, group_size=3)


def test_kl_estimators_hand():
    # token 0: log r = ref - lp = ln(1/4) - ln(1/2) = -ln 2;  token 1: log r = +ln 2
    lp = torch.tensor([LN(0.5), LN(0.25)], dtype=torch.float64)
    ref = torch.tensor([LN(0.25), LN(0.5)], dtype=torch.float64)
    l2 = LN(2)
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), torch.tensor([l2, -l2], dtype=torch.float64))
    torch.testing.assert_close(kl_estimate(lp, ref, "k2"), torch.tensor([0.5 * l2**2] * 2, dtype=torch.float64))
    # k3 = (r - 1) - log r: (0.5 - 1 + ln 2, 2 - 1 - ln 2) = (0.1931472, 0.3068528)
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), torch.tensor([0.5 - 1 + l2, 1 - l2], dtype=torch.float64))
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(lp, ref, "k4")


def test_kl_estimators_k3_nonnegative_and_unbiased():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(6, 10, generator=g, dtype=torch.float64).log_softmax(-1)  # policy
    q = torch.randn(6, 10, generator=g, dtype=torch.float64).log_softmax(-1)  # reference
    k3 = kl_estimate(p, q, "k3")
    assert (k3 >= 0).all()
    # exact expectations under the policy: E[k1] = E[k3] = KL(p || q); E[k2] >= 0
    kl = (p.exp() * (p - q)).sum(-1)
    for kind in ("k1", "k3"):
        torch.testing.assert_close((p.exp() * kl_estimate(p, q, kind)).sum(-1), kl)
    assert (kl_estimate(p, q, "k1") < 0).any()  # k1 is unbiased but not pointwise positive


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # kl 9: error clip(9/6 - 1 = 0.5) = 0.2 -> x (1 + 0.2 * 256 / 10000) = 1.00512
    assert ctl.update(9.0, 256) == pytest.approx(0.201024)
    # kl 3: error -0.2 -> x 0.99488
    assert ctl.update(3.0, 256) == pytest.approx(0.201024 * 0.99488)
    # kl 6.6: error 0.1 inside the clip -> x 1.00256
    before = ctl.value
    assert ctl.update(6.6, 256) == pytest.approx(before * 1.00256)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0, horizon=1)
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 10) == 0.05 and fixed.value == 0.05


def test_shape_rewards():
    score = torch.tensor([1.0, 2.0, 5.0])
    kl = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    # row 0: -0.1*kl on t0..2, +1 at t2; row 1 (left padded): +2 at t3; row 2 (empty): nothing
    out = shape_rewards(score, kl, mask, kl_coef=0.1)
    torch.testing.assert_close(
        out, torch.tensor([[-0.1, -0.2, 0.7, 0.0], [0.0, -0.2, -0.3, 1.6], [0.0, 0.0, 0.0, 0.0]])
    )
    # truncated completions (no EOS) lose 1.0 of their score
    out = shape_rewards(score, kl, mask, 0.1, missing_eos_penalty=1.0, has_eos=torch.tensor([True, False, False]))
    torch.testing.assert_close(out[:2, -2:], torch.tensor([[0.7, 0.0], [-0.3, 0.6]]))
    with pytest.raises(ValueError, match="has_eos"):
        shape_rewards(score, kl, mask, 0.1, missing_eos_penalty=1.0)


def test_shape_rewards_then_gae_end_to_end():
    # gamma = lam = 1, V = 0: every advantage is the reward-to-go = score - kl_coef * (kl still ahead)
    score, kl, mask = torch.tensor([3.0]), torch.tensor([[1.0, 1.0, 1.0]]), torch.ones(1, 3)
    rewards = shape_rewards(score, kl, mask, kl_coef=0.5)  # [-0.5, -0.5, 2.5]
    adv, _ = gae(rewards, torch.zeros(1, 3), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[1.5, 2.0, 2.5]]))


# --- critic-free estimators -------------------------------------------------------------------


def test_rloo_scores_hand():
    # group [1, 0, 1, 1]: leave-one-out baselines (3-1)/3, 3/3, 2/3, 2/3 -> [1/3, -1, 1/3, 1/3]
    # group [0, 2]: baselines 2, 0 -> [-2, 2]  (= k/(k-1) (r - mean): 2 * (-1), 2 * 1)
    out = rloo_scores(torch.tensor([1.0, 0.0, 1.0, 1.0]), 4)
    torch.testing.assert_close(out, torch.tensor([1 / 3, -1.0, 1 / 3, 1 / 3]))
    torch.testing.assert_close(rloo_scores(torch.tensor([0.0, 2.0, 5.0, 5.0]), 2), torch.tensor([-2.0, 2.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="group_size"):
        rloo_scores(torch.tensor([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="group_size"):
        rloo_scores(torch.tensor([1.0, 2.0]), 1)


def test_reward_to_go_hand():
    rewards = torch.tensor([[-0.1, -0.2, 0.7, 9.0], [9.0, 1.0, 9.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 1]])
    # gamma 1: row 0 [0.4, 0.5, 0.7, 0]; row 1 (gaps skipped): [0, 3, 0, 2]
    torch.testing.assert_close(reward_to_go(rewards, mask), torch.tensor([[0.4, 0.5, 0.7, 0.0], [0.0, 3.0, 0.0, 2.0]]))
    # gamma 0.5, row 0: 0.7; -0.2 + 0.35 = 0.15; -0.1 + 0.075 = -0.025
    torch.testing.assert_close(reward_to_go(rewards[:1], mask[:1], gamma=0.5), torch.tensor([[-0.025, 0.15, 0.7, 0.0]]))


def test_normalize_with_global_moments_equals_the_whole_batch():
    # x = [1, 2, 3]: mean 2, population variance 2/3
    x, m = torch.tensor([[1.0, 2.0, 3.0, 7.0]], dtype=torch.float64), torch.tensor([[1, 1, 1, 0]])
    s = math.sqrt(2 / 3)
    mom = masked_moments(x, m)
    torch.testing.assert_close(normalize(x, m, mom["n"], mom["sum"], mom["sum_sq"], eps=0.0),
                               torch.tensor([[-1 / s, 0.0, 1 / s, 0.0]], dtype=torch.float64))
    # two "ranks" holding halves of a batch, moments summed: the same as normalising the whole
    g = torch.Generator().manual_seed(0)
    full, mask = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.rand(6, 5, generator=g) > 0.3
    a, b = masked_moments(full[:3], mask[:3]), masked_moments(full[3:], mask[3:])
    tot = {k: a[k] + b[k] for k in a}
    parts = torch.cat([normalize(full[:3], mask[:3], tot["n"], tot["sum"], tot["sum_sq"]),
                       normalize(full[3:], mask[3:], tot["n"], tot["sum"], tot["sum_sq"])])
    whole = masked_moments(full, mask)
    torch.testing.assert_close(parts, normalize(full, mask, whole["n"], whole["sum"], whole["sum_sq"]))
    vals = parts[mask]
    assert abs(vals.mean().item()) < 1e-12 and abs(vals.var(unbiased=False).item() - 1) < 1e-6


def test_critic_free_advantages_hand():
    score = torch.tensor([1.0, 0.0, 2.0, 0.0])
    kl = torch.tensor([[0.1, 0.1], [0.2, 0.0], [0.0, 0.0], [0.0, 0.4]])
    mask = torch.ones(4, 2, dtype=torch.bool)
    # rloo, k = 2, kl_coef 0.5: scores -> [1, -1, 2, -2]; token rewards [-0.05, -0.05 + 1], [-0.1, -1],
    # [0, 2], [0, -0.2 - 2]; to go: [0.9, 0.95], [-1.1, -1], [2, 2], [-2.2, -2.2]
    adv = rl.critic_free_advantages("rloo", score, kl, mask, 2, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.9, 0.95], [-1.1, -1.0], [2.0, 2.0], [-2.2, -2.2]]))
    # grpo group norm (unbiased std of [1, 0] = 1/sqrt 2): scores [1/sqrt2, -1/sqrt2, ...] / (std + 1e-4)
    z = 0.5 / (math.sqrt(0.5) + 1e-4)
    adv = rl.critic_free_advantages("grpo", score, torch.zeros_like(kl), mask, 2, 0.5)
    torch.testing.assert_close(adv[:2], torch.tensor([[z, z], [-z, -z]]))
    # REINFORCE++: raw scores, kl_coef 0.5, rewards to go [0.9, 0.95], [-0.1, 0], [2, 2], [-0.2, -0.2];
    # normalised over all 8 tokens with the population std
    raw = torch.tensor([[0.9, 0.95], [-0.1, 0.0], [2.0, 2.0], [-0.2, -0.2]])
    mean, std = raw.mean(), raw.std(unbiased=False)
    adv = rl.critic_free_advantages("reinforce_pp", score, kl, mask, 2, 0.5)
    torch.testing.assert_close(adv, (raw - mean) / std, atol=1e-6, rtol=1e-6)
    # a response cut at max_new_tokens loses missing_eos_penalty before the baseline (row 0: 1 - 1 = 0)
    adv = rl.critic_free_advantages("rloo", score, torch.zeros_like(kl), mask, 2, 0.5, missing_eos_penalty=1.0,
                                    has_eos=torch.tensor([False, True, True, True]))
    torch.testing.assert_close(adv[:2, 0], torch.tensor([0.0, 0.0]))


def test_estimator_flags():
    from types import SimpleNamespace

    from medgpt_ds.errors import UserError

    assert rl.estimator(SimpleNamespace(advantage_estimator=None), "ppo") == "gae"
    assert rl.estimator(SimpleNamespace(advantage_estimator=None), "grpo") == "grpo"
    assert rl.estimator(SimpleNamespace(advantage_estimator="rloo"), "grpo") == "rloo"
    with pytest.raises(UserError, match="needs a critic"):
        rl.estimator(SimpleNamespace(advantage_estimator="gae"), "grpo")


# --- the rollout engine's mismatch ---------------------------------------------------------------


def test_truncated_importance_weights_hand():
    # ratios pi_trainer / pi_engine: 0.5 / 0.25 = 2 (capped at 1.5), 0.25 / 0.5 = 0.5; masked -> 0
    trainer = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]])
    engine = torch.tensor([[math.log(0.25), math.log(0.5), -3.0]])
    w = truncated_importance_weights(trainer, engine, torch.tensor([[1, 1, 0]]), cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.5, 0.0]]))
    assert not w.requires_grad


def _gen(responses, logprobs=None):
    ids = torch.tensor([[5, 6] + r for r in responses])
    return Generation(ids, torch.ones(len(responses), 2, dtype=torch.bool), torch.ones(len(responses), len(responses[0]),
                      dtype=torch.bool), torch.ones(len(responses), dtype=torch.bool), logprobs=logprobs)


def test_truncated_logprobs_hand():
    # logits [3, 2, 1, 0]: softmax p = [0.6439, 0.2369, 0.0871, 0.0321]
    logits = torch.tensor([[[3.0, 2.0, 1.0, 0.0]]])
    p = torch.softmax(logits[0, 0], -1)
    gen = _gen([[1]])
    torch.testing.assert_close(truncated_logprobs(logits, gen), p.log()[1:2].view(1, 1))
    # top-k 2 keeps tokens 0 and 1: log(p1 / (p0 + p1))
    torch.testing.assert_close(truncated_logprobs(logits, gen, top_k=2), (p[1] / (p[0] + p[1])).log().view(1, 1))
    # top-p 0.7: ascending cumulative mass 0.032, 0.119, 0.356, 1 -> tokens with mass <= 0.3 dropped (3 and 2)
    torch.testing.assert_close(truncated_logprobs(logits, gen, top_p=0.7), (p[1] / (p[0] + p[1])).log().view(1, 1))
    # top-p 0.9 keeps token 2 too; a token outside the kept set is -inf
    torch.testing.assert_close(truncated_logprobs(logits, gen, top_p=0.9), (p[1] / p[:3].sum()).log().view(1, 1))
    assert truncated_logprobs(logits, _gen([[3]]), top_k=2).item() == -math.inf


def test_engine_correction_metrics_hand():
    # trainer vs engine log-probs of 3 tokens: delta = [0, ln 2, -ln 2]; last row masked out
    trainer = torch.tensor([[0.0, math.log(0.5), math.log(0.25)]])
    engine = torch.tensor([[0.0, math.log(0.25), math.log(0.5)]])
    gen = _gen([[1, 2, 3]], logprobs=engine)
    gen.response_mask[0, 2] = False
    w, sums, max_abs = rl.engine_correction(gen, trainer, trainer, cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.5, 0.0]]))
    assert max_abs == pytest.approx(math.log(2))
    tot = {k: float(v) for k, v in sums.items()}
    m = rl.mismatch_metrics(tot, max_abs)
    # |delta| mean (0 + ln 2) / 2; k3 = e^d - 1 - d: (0 + 1 - ln 2) / 2; raw ratios (1 + 2) / 2; 1 of 2 truncated
    assert m["rollout/logprob_diff_mean"] == pytest.approx(math.log(2) / 2)
    assert m["rollout/kl_engine_trainer"] == pytest.approx((1 - math.log(2)) / 2)
    assert m["rollout/is_ratio_mean"] == pytest.approx(1.5) and m["rollout/is_truncated_frac"] == pytest.approx(0.5)
    w, sums, _ = rl.engine_correction(gen, trainer, trainer, cap=0.0)  # correction off: metrics only
    assert w is None and float(sums["mismatch/n"]) == 2
    assert rl.engine_correction(_gen([[1]]), trainer[:, :1], trainer[:, :1], cap=2.0) == (None, {}, 0.0)


def test_concat_generations_repads_prompts_and_responses():
    a = Generation(torch.tensor([[0, 7, 8, 11, 12]]), torch.tensor([[False, True, True]]), torch.tensor([[True, True]]),
                   torch.tensor([True]), steps=2, logprobs=torch.tensor([[-1.0, -2.0]]), weight_version=3)
    b = Generation(torch.tensor([[9, 21, 22, 23]]), torch.tensor([[True]]), torch.tensor([[True, True, False]]),
                   torch.tensor([False]), steps=3, logprobs=torch.tensor([[-3.0, -4.0, 0.0]]), weight_version=3)
    g = rl.concat_generations([a, b], pad_id=0)
    assert g.sequences.tolist() == [[0, 7, 8, 11, 12, 0], [0, 0, 9, 21, 22, 23]]
    assert g.prompt_mask.tolist() == [[False, True, True], [False, False, True]]
    assert g.response_mask.tolist() == [[True, True, False], [True, True, False]]
    assert g.responses() == [[11, 12], [21, 22]] and g.has_eos.tolist() == [True, False]
    assert g.logprobs.tolist() == [[-1.0, -2.0, 0.0], [-3.0, -4.0, 0.0]] and g.steps == 3 and g.weight_version == 3
    b.weight_version = 4
    with pytest.raises(RuntimeError, match="different weight versions"):
        rl.concat_generations([a, b], pad_id=0)


def test_weight_version_check():
    gen = _gen([[1]])
    rl.check_weight_version(gen, 7)  # -1: the engine's own weights
    gen.weight_version = 7
    rl.check_weight_version(gen, 7)
    with pytest.raises(RuntimeError, match="missed a weight sync"):
        rl.check_weight_version(gen, 8)
