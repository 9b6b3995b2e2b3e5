"""Advantage and KL math of advantages.py: GAE, whitening, group advantages, KL estimators, controllers, reward shaping."""

import math

import pytest
import torch

from medgpt_ds.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_advantages,
    kl_estimate,
    shape_rewards,
    whiten,
)

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
