"""Every loss against hand-derived numbers, against TRL 1.16 where TRL has it, and for data-parallel
invariance of each token-level reduction (two half-batches with the global normaliser == the full batch)."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from medgpt_ds.logprobs import sequence_logprobs, token_logprobs
from medgpt_ds.losses import (
    causal_lm_loss,
    dpo_loss,
    generalized_jsd_loss,
    grpo_loss,
    orpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    rm_pairwise_loss,
    simpo_loss,
)

pytestmark = pytest.mark.unit

LN = math.log


def _f(x):
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def close(actual, expected, tol=1e-6):
    assert _f(actual) == pytest.approx(_f(expected), abs=tol), (_f(actual), _f(expected))


# --- hand-derived -----------------------------------------------------------------------------


def test_causal_lm_loss_hand():
    # logits[0] = [0, ln3] -> p(1) = 3/4; logits[1] = [0, 0] -> p(0) = 1/2; labels[1:] = [1, 0]
    # mean NLL = -(ln 3/4 + ln 1/2) / 2 = (0.2876821 + 0.6931472) / 2 = 0.4904146
    logits = torch.tensor([[[0.0, LN(3)], [0.0, 0.0], [9.0, 9.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    loss, m = causal_lm_loss(logits, labels)
    close(loss, 0.4904146)
    close(m["nll"], 0.4904146)
    assert int(m["num_tokens"]) == 2
    loss, _ = causal_lm_loss(logits, labels, num_tokens=4)  # sum / 4 = 0.9808293 / 4
    close(loss, 0.2452073)
    labels[0, 2] = -100  # only ln 3/4 remains
    close(causal_lm_loss(logits, labels)[0], 0.2876821)


def test_rm_pairwise_loss_hand():
    # diff = [1, -1]: mean(-log s(1), -log s(-1)) = mean(0.3132617, 1.3132617) = 0.8132617
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    loss, m = rm_pairwise_loss(rc, rr)
    close(loss, 0.8132617)
    close(m["accuracy"], 0.5)
    close(m["margin"], 0.0)
    close(m["rewards/chosen"], 1.0)
    close(m["rewards/rejected"], 1.0)
    # margin 1: logits [0, -2] -> mean(ln 2, 2.1269280) = 1.4100376
    close(rm_pairwise_loss(rc, rr, margin=torch.tensor([1.0, 1.0]))[0], 1.4100376)
    close(rm_pairwise_loss(rc, rr, margin=1.0)[0], 1.4100376)
    # centring: + 0.5 * mean((3)^2, (1)^2) = + 2.5
    close(rm_pairwise_loss(rc, rr, center_rewards_coef=0.5)[0], 0.8132617 + 2.5)


# DPO case: beta = 0.1; chosen log-ratios [-1-(-1.5), -3-(-2)] = [0.5, -1]; rejected [-2-(-1.5), -1-(-1.5)] =
# [-0.5, 0.5]; h = [1, -1.5]; beta*h = [0.1, -0.15].
DPO_CASE = dict(
    policy_chosen_logps=torch.tensor([-1.0, -3.0]),
    policy_rejected_logps=torch.tensor([-2.0, -1.0]),
    ref_chosen_logps=torch.tensor([-1.5, -2.0]),
    ref_rejected_logps=torch.tensor([-1.5, -1.5]),
)


@pytest.mark.parametrize(
    ("loss_type", "smoothing", "expected"),
    [
        # mean(-log s(0.1), -log s(-0.15)) = mean(0.6443967, 0.7709570)
        ("sigmoid", 0.0, 0.7076769),
        # cDPO: -log s(x) + eps*x  ->  0.7076769 + 0.1 * mean(0.1, -0.15)
        ("sigmoid", 0.1, 0.7051769),
        # (h - 1/(2 beta))^2 = mean((1-5)^2, (-1.5-5)^2) = mean(16, 42.25)
        ("ipo", 0.0, 29.125),
        # relu(1 - beta h) = mean(0.9, 1.15)
        ("hinge", 0.0, 1.025),
        # rDPO: -log s(x) - eps*x/(1-2eps)  ->  0.7076769 + 0.1*0.025/0.8
        ("robust", 0.1, 0.7108019),
    ],
)
def test_dpo_loss_hand(loss_type, smoothing, expected):
    loss, m = dpo_loss(**DPO_CASE, beta=0.1, loss_type=loss_type, label_smoothing=smoothing)
    close(loss, expected)
    close(m["rewards/chosen"], -0.025)  # 0.1 * mean(0.5, -1)
    close(m["rewards/rejected"], 0.0)  # 0.1 * mean(-0.5, 0.5)
    close(m["rewards/accuracies"], 0.5)  # 0.05 > -0.05, -0.1 < 0.05
    close(m["rewards/margins"], -0.025)
    close(m["logps/chosen"], -2.0)
    close(m["logps/rejected"], -1.5)
    assert all(not v.requires_grad for v in m.values())


def test_dpo_loss_rejects_unknown_type():
    with pytest.raises(ValueError, match="unknown dpo loss_type"):
        dpo_loss(**DPO_CASE, loss_type="nope")
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(**DPO_CASE, loss_type="robust", label_smoothing=0.5)


def test_orpo_loss_hand():
    # p_c = 1/2 -> odds 1; p_r = 1/4 -> odds 1/3; log odds ratio = ln 3 = 1.0986123
    # log s(ln 3) = ln(3/4) = -0.2876821; loss = nll - 0.1 * (-0.2876821) = 1 + 0.0287682
    loss, m = orpo_loss(torch.tensor([LN(0.5)]), torch.tensor([LN(0.25)]), torch.tensor(1.0), beta=0.1)
    close(loss, 1.0287682)
    close(m["log_odds_chosen"], 1.0986123)
    close(m["log_odds_ratio"], -0.2876821)
    close(m["nll_loss"], 1.0)
    close(m["rewards/chosen"], 0.1 * LN(0.5))


def test_simpo_loss_hand():
    # beta (c - r) - gamma = 2 * 0.5 - 0.5 = 0.5; -log s(0.5) = 0.4740770
    loss, m = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), beta=2.0, gamma=0.5)
    close(loss, 0.4740770)
    close(m["rewards/margins"], 1.0)


def test_ppo_policy_loss_hand():
    # ratio r = [[1.5, 0.9, 1.0], [0.5, 1.1, 2.0]], A = [[1, 1, -2], [-1, 1, 3]], last token masked.
    # -A r           = [[-1.5, -0.9, 2.0], [0.5, -1.1, -6.0]]
    # -A clip(r)     = [[-1.2, -0.9, 2.0], [0.8, -1.1, -3.6]]
    # max, valid     = -1.2 - 0.9 + 2.0 + 0.8 - 1.1 = -0.4 over 5 tokens -> -0.08
    # clipped where the second is larger: (0,0) and (1,0) -> clipfrac 2/5
    old = torch.zeros(2, 3)
    logprobs = torch.tensor([[1.5, 0.9, 1.0], [0.5, 1.1, 2.0]]).log()
    adv = torch.tensor([[1.0, 1.0, -2.0], [-1.0, 1.0, 3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, m = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    close(loss, -0.08)
    close(m["clipfrac"], 0.4)
    # approx_kl = 0.5 * mean(ln^2 1.5, ln^2 0.9, 0, ln^2 0.5, ln^2 1.1) = 0.0665040
    close(m["approx_kl"], 0.0665040)
    close(ppo_policy_loss(logprobs, old, adv, mask, num_tokens=8)[0], -0.05)  # -0.4 / 8


def test_ppo_value_loss_hand():
    # V - V_old = [[0.25, 0.5], [0, -0.5]] -> clip(.25) -> V_clip = [[1.0, 0.25], [2.0, 0.25]]
    # (V - R)^2      = [[0.25, 0.25], [1.0, 0.0625]]
    # (V_clip - R)^2 = [[0.25, 0.5625], [1.0, 0.0]]
    # 0.5 * mean(max) = 0.5 * (0.25 + 0.5625 + 1.0 + 0.0625) / 4 = 0.234375; clipped larger at 1 of 4
    values = torch.tensor([[1.0, 0.5], [2.0, 0.0]])
    old = torch.tensor([[0.75, 0.0], [2.0, 0.5]])
    returns = torch.tensor([[1.5, 1.0], [1.0, 0.25]])
    mask = torch.ones(2, 2)
    loss, m = ppo_value_loss(values, old, returns, mask, clip_eps=0.25)
    close(loss, 0.234375)
    close(m["vf_clipfrac"], 0.25)
    mask[1, 1] = 0  # 0.5 * (0.25 + 0.5625 + 1.0) / 3 = 0.3020833
    close(ppo_value_loss(values, old, returns, mask, clip_eps=0.25)[0], 0.3020833)


# GRPO case, on-policy (ratio 1, so per token = -A + beta*k3), beta 0.1, A = [1, -1], mask [[1, 1], [1, 0]]
# k3 = e^(ref-lp) - (ref-lp) - 1:  (0,0): ref-lp = ln 1/2 -> 0.5 + 0.6931472 - 1 = 0.1931472
#                                  (0,1): 0 -> 0;  (1,0): ln 2 -> 2 - 0.6931472 - 1 = 0.3068528
# per token = [[-1 + 0.0193147, -1], [1 + 0.0306853, masked]]
GRPO_LP = torch.tensor([[LN(0.5), LN(0.25)], [LN(0.5), -7.0]])
GRPO_REF = torch.tensor([[LN(0.25), LN(0.25)], [0.0, -3.0]])
GRPO_ADV = torch.tensor([1.0, -1.0])
GRPO_MASK = torch.tensor([[1, 1], [1, 0]])


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "expected"),
    [
        ("grpo", {}, 0.0201713),  # mean((-0.9806853 - 1)/2, 1.0306853)
        ("bnpo", {}, -0.3166667),  # (-0.9806853 - 1 + 1.0306853) / 3 = -0.95 / 3
        ("dr_grpo", {"max_completion_length": 4}, -0.11875),  # -0.95 / (2 * 4)
        ("dr_grpo", {}, -0.2375),  # -0.95 / (2 * T=2)
        ("dapo", {}, -0.3166667),  # local token count 3
        ("dapo", {"num_tokens": 10}, -0.095),
        ("grpo", {"num_sequences": 4}, 0.0100857),  # sum of the two sequence means / 4
    ],
)
def test_grpo_loss_hand(loss_type, kwargs, expected):
    loss, m = grpo_loss(
        GRPO_LP, None, GRPO_REF, GRPO_ADV, GRPO_MASK, beta=0.1, loss_type=loss_type, **kwargs
    )
    close(loss, expected)
    close(m["kl"], 0.5 / 3)  # (0.1931472 + 0 + 0.3068528) / 3
    close(m["clip_ratio/region_mean"], 0.0)


def test_grpo_loss_beta_zero_needs_no_ref_and_rejects_unknown():
    loss, m = grpo_loss(GRPO_LP, None, None, GRPO_ADV, GRPO_MASK, beta=0.0, loss_type="bnpo")
    close(loss, -1 / 3)  # (-1 - 1 + 1) / 3
    assert "kl" not in m
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(GRPO_LP, None, None, GRPO_ADV, GRPO_MASK, beta=0.1)
    with pytest.raises(ValueError, match="unknown grpo loss_type"):
        grpo_loss(GRPO_LP, None, GRPO_REF, GRPO_ADV, GRPO_MASK, loss_type="ppo")


# Generalized JSD case: one position, student logits [0, 0] -> s = (1/2, 1/2), teacher [0, ln 3] -> t = (1/4, 3/4).
GJSD_S = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
GJSD_T = torch.tensor([[[0.0, LN(3)], [5.0, -4.0]]])
GJSD_MASK = torch.tensor([[1, 0]])  # the second position is not scored


@pytest.mark.parametrize(
    ("beta", "temperature", "expected"),
    [
        # forward KL(t || s) = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.1732868 + 0.3040988
        (0.0, 1.0, 0.1308120),
        # reverse KL(s || t) = 1/2 ln 2 + 1/2 ln(2/3) = 0.3465736 - 0.2027326
        (1.0, 1.0, 0.1438410),
        # m = (3/8, 5/8): 1/2 [1/4 ln(2/3) + 3/4 ln(6/5)] + 1/2 [1/2 ln(4/3) + 1/2 ln(4/5)]
        #   = 1/2 (0.0353749) + 1/2 (0.0322693)
        (0.5, 1.0, 0.0338221),
        # temperature 2: t = (1, sqrt 3) / (1 + sqrt 3) = (0.3660254, 0.6339746), s unchanged;
        # forward KL = 0.3660254 ln(0.7320508) + 0.6339746 ln(1.2679492) = -0.1141653 + 0.1505061
        (0.0, 2.0, 0.0363408),
    ],
)
def test_generalized_jsd_hand(beta, temperature, expected):
    loss, m = generalized_jsd_loss(GJSD_S, GJSD_T, GJSD_MASK, beta=beta, temperature=temperature)
    close(loss, expected)
    close(m["jsd"], expected)
    close(m["top1_agreement"], 0.0)  # the student's tie picks token 0, the teacher token 1
    assert int(m["num_tokens"]) == 1
    close(generalized_jsd_loss(GJSD_S, GJSD_T, GJSD_MASK, beta=beta, temperature=temperature, num_tokens=4)[0],
          expected / 4)


def test_generalized_jsd_agreement_and_checks():
    mask = torch.tensor([[1, 1]])
    _, m = generalized_jsd_loss(GJSD_S, GJSD_T, mask)
    close(m["top1_agreement"], 0.5)  # position 0: 0 vs 1; position 1: both token 0
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(GJSD_S, GJSD_T, mask, beta=1.5)
    with pytest.raises(ValueError, match="shape"):
        generalized_jsd_loss(GJSD_S, GJSD_T[..., :1], mask)


# --- TRL 1.16 oracle --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_mod():
    trl = pytest.importorskip("trl")
    assert trl.__version__.startswith("1.16"), f"oracle tests written against TRL 1.16, found {trl.__version__}"
    from trl import DPOTrainer, GRPOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    return SimpleNamespace(DPO=DPOTrainer, GRPO=GRPOTrainer, ORPO=ORPOTrainer, CPO=CPOTrainer)


def _accelerator():
    ident = lambda x, **_: x  # noqa: E731  (one process: gather/reduce are the identity)
    return SimpleNamespace(
        device=torch.device("cpu"), num_processes=1, gather=ident, gather_for_metrics=ident, reduce=ident,
        sync_gradients=True,
    )


def _dpo_batch(seed=0, batch=3, length=7, vocab=11):
    """Random logits and a [chosen; rejected] batch with prompts of different lengths and right padding."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * batch, length, vocab, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(2 * batch, length, vocab, generator=g, dtype=torch.float64)
    input_ids = torch.randint(0, vocab, (2 * batch, length), generator=g)
    completion_mask = torch.zeros(2 * batch, length, dtype=torch.long)
    for i, (start, end) in enumerate([(2, 7), (1, 4), (3, 6), (2, 5), (1, 7), (4, 5)][: 2 * batch]):
        completion_mask[i, start:end] = 1  # prompt before start, padding after end
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    return logits, ref_logits, input_ids, completion_mask, labels


def _trl_dpo(trl_mod, logps, ref_logps, input_ids, completion_mask, loss_type, beta, label_smoothing):
    """Run TRL's DPOTrainer._compute_loss on a stub whose model returns the given per-token log-probs."""
    entropy = torch.zeros_like(logps)

    class FakeModel:
        training = True

        def __call__(self, **kwargs):
            assert kwargs["fused_lm_head"] is True
            return SimpleNamespace(log_probs=logps, entropy=entropy, mean_logits=entropy, is_top1=entropy.bool())

    ref_c, ref_r = ref_logps.sum(1).chunk(2)
    stub = SimpleNamespace(
        model=FakeModel(), accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list)},
    )
    inputs = {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask,
        "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r,
    }
    loss = trl_mod.DPO._compute_loss(stub, stub.model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize(("loss_type", "beta"), [("sigmoid", 0.1), ("hinge", 0.3), ("ipo", 0.1), ("ipo", 0.5)])
def test_dpo_matches_trl(trl_mod, loss_type, beta):
    logits, ref_logits, input_ids, completion_mask, labels = _dpo_batch()
    logits.requires_grad_(True)
    logps, mask = token_logprobs(logits, labels)  # (2B, T-1)
    ref_logps, _ = token_logprobs(ref_logits, labels)
    # TRL's ipo divides each log-ratio by the completion length: give length-averaged log-probs.
    average = loss_type == "ipo"
    pc, pr = sequence_logprobs(logps, mask, average=average).chunk(2)
    rc, rr = sequence_logprobs(ref_logps, mask, average=average).chunk(2)
    ours, m = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type)
    (g_ours,) = torch.autograd.grad(ours, logits, retain_graph=True)

    theirs, tm = _trl_dpo(trl_mod, logps, ref_logps, input_ids, completion_mask, loss_type, beta, 0.0)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(g_ours, g_theirs)
    if loss_type != "ipo":  # with averaged inputs our reward metrics are per-token, TRL's are per-sequence
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected"):
            close(m[key], tm[key])


def test_dpo_label_smoothing_matches_trl(trl_mod):
    # TRL 1.16's sigmoid ignores label_smoothing; its `aot` loss is exactly cDPO applied to SORTED log-ratios,
    # so on a batch where the policy and reference log-ratios are already in the same ascending order it
    # equals our cDPO. `robust` is compared directly.
    pc = torch.tensor([-9.0, -7.0, -4.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-5.0, -4.5, -3.0], dtype=torch.float64)
    rc = torch.tensor([-6.0, -5.0, -3.5], dtype=torch.float64)
    rr = torch.tensor([-3.0, -3.1, -3.2], dtype=torch.float64)
    assert torch.equal((pc - pr).argsort(), torch.arange(3)) and torch.equal((rc - rr).argsort(), torch.arange(3))

    # stub model: per-token log-probs with the whole sequence log-prob in the first completion token
    input_ids = torch.zeros(6, 3, dtype=torch.long)
    completion_mask = torch.tensor([[0, 1, 1]] * 6)
    for loss_type, ours_type in (("aot", "sigmoid"), ("robust", "robust")):
        logps = torch.zeros(6, 2, dtype=torch.float64)
        logps = logps + torch.nn.functional.pad(torch.cat([pc, pr]).unsqueeze(1), (0, 1))
        ref = torch.nn.functional.pad(torch.cat([rc, rr]).unsqueeze(1), (0, 1))
        theirs, _ = _trl_dpo(trl_mod, logps, ref, input_ids, completion_mask, loss_type, 0.2, 0.1)
        (g_theirs,) = torch.autograd.grad(theirs, pc)
        ours, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=ours_type, label_smoothing=0.1)
        (g_ours,) = torch.autograd.grad(ours, pc)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(g_ours, g_theirs)
    # TRL's plain sigmoid equals ours at label_smoothing 0
    theirs, _ = _trl_dpo(trl_mod, logps, ref, input_ids, completion_mask, "sigmoid", 0.2, 0.0)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=0.2)[0], theirs)


def test_orpo_matches_trl(trl_mod):
    logits, _, _, _, labels = _dpo_batch(seed=1)
    logits.requires_grad_(True)
    logps, mask = token_logprobs(logits, labels)
    c_avg, r_avg = sequence_logprobs(logps, mask, average=True).chunk(2)
    c_logits, _ = logits.chunk(2)
    c_labels, _ = labels.chunk(2)
    nll, _ = causal_lm_loss(c_logits, c_labels)
    ours, m = orpo_loss(c_avg, r_avg, nll, beta=0.25)
    (g_ours,) = torch.autograd.grad(ours, logits, retain_graph=True)

    stub = SimpleNamespace(beta=0.25, accelerator=_accelerator())
    losses, _, _, log_odds_ratio, log_odds_chosen = trl_mod.ORPO.odds_ratio_loss(stub, c_avg, r_avg)
    theirs = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(ours, theirs.to(ours.dtype))
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-7)  # TRL upcasts to float32
    close(m["log_odds_ratio"], log_odds_ratio)
    close(m["log_odds_chosen"], log_odds_chosen)


def test_simpo_matches_trl_cpo(trl_mod):
    g = torch.Generator().manual_seed(2)
    c, r = -torch.rand(5, generator=g) * 3, -torch.rand(5, generator=g) * 3
    stub = SimpleNamespace(
        alpha=0.0, beta=2.5, loss_type="simpo", simpo_gamma=0.7, label_smoothing=0.0, accelerator=_accelerator()
    )
    losses, chosen_rewards, _ = trl_mod.CPO.cpo_loss(stub, c, r)
    ours, m = simpo_loss(c, r, beta=2.5, gamma=0.7)
    torch.testing.assert_close(ours, losses.mean())
    close(m["rewards/chosen"], chosen_rewards.mean())


def _grpo_case(seed=0, batch=4, length=6):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(batch, length, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    # old and ref differ by up to +-0.5 in log space so both clip sides trigger
    old = logps.detach() + (torch.rand(batch, length, generator=g, dtype=torch.float64) - 0.5)
    ref = logps.detach() + (torch.rand(batch, length, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.randn(batch, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 1, 5])[:batch]
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return logps, old, ref, adv, mask


def _trl_grpo(trl_mod, logps, old, ref, adv, mask, loss_type, beta, eps_low, eps_high, max_len, num_items):
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, accelerator=_accelerator(),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
    )
    batch = logps.size(0)
    inputs = {
        "prompt_ids": torch.zeros(batch, 2, dtype=torch.long), "prompt_mask": torch.ones(batch, 2, dtype=torch.long),
        "completion_ids": torch.zeros_like(mask), "completion_mask": mask, "advantages": adv,
        "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": torch.tensor(num_items),
    }
    loss = trl_mod.GRPO._compute_loss(stub, None, inputs)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize(("beta", "eps_low", "eps_high"), [(0.04, 0.2, 0.2), (0.0, 0.2, 0.28), (0.3, 0.1, 0.3)])
def test_grpo_matches_trl(trl_mod, loss_type, beta, eps_low, eps_high):
    logps, old, ref, adv, mask = _grpo_case()
    max_len = 8
    num_items = float(mask.sum())
    ours, m = grpo_loss(
        logps, old, ref if beta else None, adv, mask, beta=beta, eps_low=eps_low, eps_high=eps_high,
        loss_type=loss_type, max_completion_length=max_len,
        num_tokens=num_items if loss_type == "dapo" else None,
    )
    (g_ours,) = torch.autograd.grad(ours, logps)
    theirs, tm = _trl_grpo(trl_mod, logps, old, ref, adv, mask, loss_type, beta, eps_low, eps_high, max_len, num_items)
    (g_theirs,) = torch.autograd.grad(theirs, logps)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(g_ours, g_theirs)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        close(m[key], tm[key])
    assert 0 < float(m["clip_ratio/region_mean"]) < 1  # the case exercises clipping


def test_grpo_dapo_global_normaliser_matches_trl(trl_mod):
    # TRL's dapo divides by num_items_in_batch (tokens of the whole generation batch): that is our num_tokens.
    logps, old, ref, adv, mask = _grpo_case(seed=3)
    ours, _ = grpo_loss(logps, old, ref, adv, mask, loss_type="dapo", num_tokens=37.0)
    theirs, _ = _trl_grpo(trl_mod, logps, old, ref, adv, mask, "dapo", 0.04, 0.2, 0.2, 6, 37.0)
    torch.testing.assert_close(ours, theirs)


# --- data-parallel invariance -----------------------------------------------------------------


def _assert_split_invariant(loss_fn, leaf, n_rows):
    """loss_fn(rows) -> loss over those rows with a GLOBAL normaliser. Two halves summed == the full batch,
    for the loss and for the gradient w.r.t. ``leaf``."""
    full = loss_fn(slice(0, n_rows))
    (g_full,) = torch.autograd.grad(full, leaf, retain_graph=True)
    half = n_rows // 2
    parts = loss_fn(slice(0, half)) + loss_fn(slice(half, n_rows))
    (g_parts,) = torch.autograd.grad(parts, leaf, retain_graph=True)
    torch.testing.assert_close(parts, full)
    torch.testing.assert_close(g_parts, g_full)
    return full


def test_causal_lm_loss_dp_invariant():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (4, 6), generator=g)
    labels[0, :4] = -100  # unequal token counts per half
    labels[3, 2:] = -100
    n = int((labels[:, 1:] != -100).sum())
    full = _assert_split_invariant(lambda s: causal_lm_loss(logits[s], labels[s], num_tokens=n)[0], logits, 4)
    torch.testing.assert_close(full, causal_lm_loss(logits, labels)[0])  # == the local mean of the full batch


def _rl_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (4, 5)
    x = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(True)
    other = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    return x, other, target, mask


def test_ppo_losses_dp_invariant():
    x, other, target, mask = _rl_case()
    n = int(mask.sum())
    lp = x * 0.1 - 1.0  # log-probs near the old ones so some ratios clip
    old = lp.detach() + other
    full = _assert_split_invariant(
        lambda s: ppo_policy_loss(lp[s], old[s], target[s], mask[s], num_tokens=n)[0], x, 4
    )
    torch.testing.assert_close(full, ppo_policy_loss(lp, old, target, mask)[0])
    full = _assert_split_invariant(
        lambda s: ppo_value_loss(x[s], x.detach()[s] + other[s], target[s], mask[s], num_tokens=n)[0], x, 4
    )
    torch.testing.assert_close(full, ppo_value_loss(x, x.detach() + other, target, mask)[0])


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_dp_invariant(loss_type):
    x, other, target, mask = _rl_case(1)
    lp = x * 0.1 - 1.0
    old, ref, adv = lp.detach() + other, lp.detach() - other, target[:, 0]
    n_tok, n_seq = int(mask.sum()), mask.size(0)
    kw = dict(loss_type=loss_type, max_completion_length=7, num_tokens=n_tok, num_sequences=n_seq)
    full = _assert_split_invariant(lambda s: grpo_loss(lp[s], old[s], ref[s], adv[s], mask[s], **kw)[0], x, 4)
    local = grpo_loss(lp, old, ref, adv, mask, loss_type=loss_type, max_completion_length=7)[0]
    torch.testing.assert_close(full, local)


def _gjsd_case(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 5, 11, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    teacher = (torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 2).to(dtype)
    teacher[0, 1] = student[0, 1].detach() + 0.5  # one position where the two agree on the top token
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 1, 1]])
    return student, teacher, mask


@pytest.mark.parametrize(("beta", "temperature"), [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.3, 0.7), (0.9, 2.0)])
def test_generalized_jsd_matches_trl_gkd(beta, temperature):
    pytest.importorskip("trl")
    from trl.experimental.gkd import GKDTrainer

    student, teacher, mask = _gjsd_case()
    labels = torch.where(mask.bool(), 1, -100)
    ours, m = generalized_jsd_loss(student, teacher, mask, beta=beta, temperature=temperature, chunk_size=2)
    (g_ours,) = torch.autograd.grad(ours, student)
    # a static method: called with the same logits and the labels' mask, no trainer built
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    (g_theirs,) = torch.autograd.grad(theirs, student)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(g_ours, g_theirs)
    assert int(m["num_tokens"]) == 7 and 0.0 < float(m["top1_agreement"]) < 1.0
    # TRL's gradient-accumulation normaliser (num_items_in_batch) is our num_tokens
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature,
                                             num_items_in_batch=torch.tensor(20.0))
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, mask, beta=beta, temperature=temperature,
                                                    num_tokens=20.0)[0], theirs)


def test_generalized_jsd_dp_invariant():
    student, teacher, mask = _gjsd_case(1)
    n = int(mask.sum())
    full = _assert_split_invariant(
        lambda s: generalized_jsd_loss(student[s], teacher[s], mask[s], beta=0.3, num_tokens=n)[0], student, 3)
    torch.testing.assert_close(full, generalized_jsd_loss(student, teacher, mask, beta=0.3)[0])


def test_generalized_jsd_chunks_bound_the_fp32_rows(monkeypatch):
    # bf16 logits as a model returns them: the fp32 softmax only ever sees chunk_size rows, and the chunked
    # result (value and gradient) equals one chunk over everything
    student, teacher, mask = _gjsd_case(2, torch.bfloat16)
    seen = []
    log_softmax = torch.nn.functional.log_softmax

    def spy(x, *args, **kwargs):
        seen.append((tuple(x.shape), x.dtype))
        return log_softmax(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "log_softmax", spy)
    small, _ = generalized_jsd_loss(student, teacher, mask, beta=0.5, chunk_size=2)
    (g_small,) = torch.autograd.grad(small, student)
    assert seen and all(shape[0] <= 2 and dtype == torch.float32 for shape, dtype in seen), seen
    big, _ = generalized_jsd_loss(student, teacher, mask, beta=0.5, chunk_size=1000)
    (g_big,) = torch.autograd.grad(big, student)
    torch.testing.assert_close(small, big)
    assert g_small.dtype == torch.bfloat16
    torch.testing.assert_close(g_small, g_big)
    assert g_small[~mask.bool()].abs().sum() == 0 and g_small[mask.bool()].abs().sum() > 0
    seen.clear()
    with torch.no_grad():  # evaluation: no gradient taken (log_softmax runs outside autograd.grad only)
        loss, _ = generalized_jsd_loss(student, teacher, mask, chunk_size=2)
    torch.testing.assert_close(loss, big)


def test_generalized_jsd_teacher_head_makes_the_logits_a_chunk_at_a_time():
    # the teacher as final hidden states + its output head (2 padding rows past the shared 11, cut by the caller):
    # the same value, gradient and metrics as its full logits, the head only ever sees chunk_size rows
    student, _, mask = _gjsd_case(3)
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)  # (B, T, H)
    weight = torch.randn(13, 6, generator=g, dtype=torch.float64) * 2  # (V + 2, H)
    rows = []

    def head(h):
        rows.append(h.size(0))
        return (h @ weight.T)[..., :11]

    ours, m = generalized_jsd_loss(student, hidden, mask, beta=0.3, chunk_size=2, teacher_head=head)
    (g_ours,) = torch.autograd.grad(ours, student)
    full, m_full = generalized_jsd_loss(student, (hidden @ weight.T)[..., :11], mask, beta=0.3)
    (g_full,) = torch.autograd.grad(full, student)
    assert max(rows) == 2 and sum(rows) == int(mask.sum())
    torch.testing.assert_close(ours, full)
    torch.testing.assert_close(g_ours, g_full)
    torch.testing.assert_close(m["top1_agreement"], m_full["top1_agreement"])
    with pytest.raises(ValueError, match="differ in shape"):  # a head wider than the student's vocabulary
        generalized_jsd_loss(student, hidden, mask, teacher_head=lambda h: h @ weight.T)


@pytest.mark.parametrize("lora", [False, True])
def test_generalized_jsd_student_head_chunks_equal_the_full_logits(tiny_llama, lora):
    # opd's chunked path on tiny Llamas: the student's and the teacher's logits made from their final hidden states
    # 2 tokens at a time (7 scored), against the models' full logits; the same loss, metrics and gradient of every
    # trained parameter, the LM head's included (trainable head: checkpointed chunks; LoRA: frozen head, per-row
    # gradients), with a scale applied after the loss (engine.backward's 1/GA) reaching them
    from medgpt_ds.long_context import OutputHead, final_hidden_states

    student, teacher = tiny_llama(40, seed=1), tiny_llama(40, seed=2, hidden_size=48)
    if lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                     init_lora_weights=False))
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 3:] = True
    mask[1, 5:7] = True
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1]  # (2, 8, 40)
        t_hidden = final_hidden_states(teacher, input_ids=ids, use_cache=False)[:, :-1]  # (2, 8, 48)
    rows = []
    s_head, t_head = OutputHead(student), OutputHead(teacher)
    assert s_head.frozen == lora

    def counted(h):
        rows.append(h.size(0))
        return s_head(h)

    def run(chunked: bool):
        student.zero_grad()
        if chunked:
            hidden = final_hidden_states(student, input_ids=ids, use_cache=False)[:, :-1]  # (2, 8, 32)
            loss, m = generalized_jsd_loss(hidden, t_hidden, mask, beta=0.3, temperature=0.8, num_tokens=3.0,
                                           chunk_size=2, teacher_head=t_head, student_head=counted,
                                           frozen_student_head=s_head.frozen)
        else:
            logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
            loss, m = generalized_jsd_loss(logits, t_logits, mask, beta=0.3, temperature=0.8, num_tokens=3.0)
        (loss * 0.25).backward()
        return loss.detach(), m, {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}

    full, m_full, g_full = run(False)
    ours, m, g = run(True)
    assert rows and max(rows) == 2  # never more than a chunk of the student's logits
    torch.testing.assert_close(ours, full)
    torch.testing.assert_close(m["top1_agreement"], m_full["top1_agreement"])
    assert g.keys() == g_full.keys() and ("lm_head.weight" in g) != lora
    for name in g:
        assert g_full[name].abs().sum() > 0, name
        torch.testing.assert_close(g[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation: the values, no gradient taken
        hidden = final_hidden_states(student, input_ids=ids, use_cache=False)[:, :-1]
        torch.testing.assert_close(generalized_jsd_loss(hidden, t_hidden, mask, beta=0.3, temperature=0.8,
                                                        num_tokens=3.0, chunk_size=2, teacher_head=t_head,
                                                        student_head=s_head)[0], full)
