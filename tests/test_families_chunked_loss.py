"""The chunked LM-head loss (on by default) against the model's own full logits for every model family
users bring, in the packed layout the trainer picks for it: the head check passes, and the summed
loss and every gradient match (fp32: 2e-5 on losses of ~4.6 x 30 tokens, 1e-5 + 1e-4 relative on
gradients; a missing logit scaling or a mis-shifted label moves them by >1e-2)."""
from __future__ import annotations

import copy

import pytest
import torch

from medgpt_ds import long_context
from medgpt_ds.data.packing import PaddedCollator, packing_plan
from medgpt_ds.stages.sft import lm_loss_sum
from tests.family_models import ALL, make_model
from tests.test_families import ROWS, V, _samples

pytestmark = pytest.mark.families


@pytest.mark.parametrize("name", ALL)
def test_chunked_loss_equals_full_logits(name):
    model = make_model(name, V, pad_token_id=0).train()
    assert long_context.head_is_exact(model), name
    samples = _samples()
    plan = packing_plan(model.config, "sdpa", "cpu")
    batch = PaddedCollator(0)(samples) if plan.layout == "padded" else plan.collator(0)([[samples[i] for i in r] for r in ROWS])
    twin = copy.deepcopy(model)
    want, _ = lm_loss_sum(model, batch)
    want.backward()
    got, _ = lm_loss_sum(twin, batch, chunk_size=7)
    got.backward()
    assert got.item() == pytest.approx(want.item(), abs=2e-5 * 30)
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=f"{name} {n}")
