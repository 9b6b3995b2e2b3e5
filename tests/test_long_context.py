"""Long-context pieces on one process: the chunked LM-head loss and log-probs against the full-logits
ones (values and gradients, every family whose forward post-processes logits), the fallback when the
head cannot be reproduced, TiledMLP and activation offload leaving gradients unchanged, the Liger
switch's errors and the call it makes, and the sequence-parallel batch slicing and packed attention."""
import math

import pytest
import torch
import torch.nn.functional as F

from medgpt_ds import dist, long_context
from medgpt_ds.data.packing import PackedCollator, PaddedCollator
from medgpt_ds.data.pairs import PairCollator, encode_pair, pair_logps
from medgpt_ds.errors import UserError
from medgpt_ds.logprobs import token_logprobs, token_logprobs_from_hidden
from medgpt_ds.losses import causal_lm_loss, chunked_causal_lm_loss
from medgpt_ds.sequence_parallel import _packed_core, check_model, shard_batch
from medgpt_ds.stages.sft import lm_loss_sum

pytestmark = pytest.mark.unit


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_grads_close(a, b, atol):
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


def _hidden_head(seed=0, B=3, T=17, H=8, V=50):
    torch.manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False).double()
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, :5] = -100  # a prompt
    labels[2, 10:] = -100  # padding
    return hidden, head, labels


# --- chunked loss and log-probs == the full-logits ones ---------------------------------------


@pytest.mark.parametrize("num_tokens,frozen", [(None, False), (7.0, False), (7.0, True)])
def test_chunked_causal_lm_loss_equals_plain(num_tokens, frozen):
    hidden, head, labels = _hidden_head()
    head.requires_grad_(not frozen)  # frozen: LoRA's head, per-token gradients instead of recomputation
    wrt = [hidden] if frozen else [hidden, head.weight]
    want, want_m = causal_lm_loss(head(hidden), labels, num_tokens=num_tokens)
    got, got_m = chunked_causal_lm_loss(hidden, head, labels, num_tokens=num_tokens, chunk_size=5,  # 5 does not divide
                                        frozen_head=frozen)
    assert got.dtype == want.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert int(got_m["num_tokens"]) == int(want_m["num_tokens"]) == int((labels[:, 1:] != -100).sum())
    _assert_grads_close(_grads(3.0 * got, wrt), _grads(3.0 * want, wrt), atol=1e-6)  # any incoming scale


def test_chunked_loss_with_shift_labels_and_no_scored_token():
    hidden, head, labels = _hidden_head(seed=1)
    shift = F.pad(labels[:, 1:], (0, 1), value=-100)
    a, _ = chunked_causal_lm_loss(hidden, head, labels, num_tokens=1.0, chunk_size=4)
    b, _ = chunked_causal_lm_loss(hidden, head, shift_labels=shift, num_tokens=1.0, chunk_size=4)
    assert a.item() == b.item()
    # a sequence-parallel slice may hold no scored token at all: zero loss, zero gradient, backward works
    empty, m = chunked_causal_lm_loss(hidden, head, shift_labels=torch.full_like(shift, -100), num_tokens=1.0)
    empty.backward()
    assert empty.item() == 0.0 and int(m["num_tokens"]) == 0 and hidden.grad.abs().max() == 0
    with pytest.raises(ValueError, match="exactly one"):
        chunked_causal_lm_loss(hidden, head, labels, shift_labels=shift)


def test_token_logprobs_from_hidden_equals_token_logprobs():
    hidden, head, labels = _hidden_head(seed=2)
    want, want_mask = token_logprobs(head(hidden), labels)
    got, got_mask = token_logprobs_from_hidden(hidden, head, labels, chunk_size=4)
    assert got.shape == want.shape == (3, 16) and torch.equal(got_mask, want_mask)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    w = torch.arange(16.0, dtype=torch.float64)  # a weighting that makes every position's gradient differ
    _assert_grads_close(_grads((got * w).sum(), [hidden, head.weight]), _grads((want * w).sum(), [hidden, head.weight]),
                        atol=1e-10)
    # a frozen head (LoRA): each token's gradient is kept from the forward and scaled by its incoming gradient
    head.requires_grad_(False)
    frozen, _ = token_logprobs_from_hidden(hidden, head, labels, chunk_size=4, frozen_head=True)
    want, _ = token_logprobs(head(hidden), labels)
    torch.testing.assert_close(frozen, want, atol=1e-12, rtol=0)
    _assert_grads_close(_grads((frozen * w).sum().exp(), [hidden]), _grads((want * w).sum().exp(), [hidden]), atol=1e-10)
    head.requires_grad_(True)
    # pre-shifted labels (a sequence-parallel slice): (B, T), the last position scored against nothing
    shifted, mask = token_logprobs_from_hidden(hidden, head, shift_labels=F.pad(labels[:, 1:], (0, 1), value=-100))
    assert shifted.shape == (3, 17) and not mask[:, -1].any()
    torch.testing.assert_close(shifted[:, :-1], want, atol=1e-12, rtol=0)
    # bf16 logits come back as float32, as token_logprobs does
    lp, _ = token_logprobs_from_hidden(hidden.detach().bfloat16(), head.bfloat16(), labels)
    assert lp.dtype == torch.float32


FAMILIES = {
    "llama": {},
    "qwen2": {},
    "gemma2": {"final_logit_softcapping": 3.0, "head_dim": 8},  # soft-capped logits
    "cohere": {"logit_scale": 0.5},  # scaled logits
    "granite": {"logits_scaling": 4.0},  # divided logits
}


def _family_model(model_type: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2, **FAMILIES[model_type])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_lm_loss_chunked_equals_full_logits_per_family(model_type):
    model = _family_model(model_type)
    assert long_context.head_is_exact(model)
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (2, 24))
    labels = ids.clone()
    labels[:, :6] = -100
    batch = {"input_ids": ids, "labels": labels}
    params = list(model.parameters())
    want, _ = lm_loss_sum(model, batch)
    got, _ = lm_loss_sum(model, batch, chunk_size=7)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    _assert_grads_close(_grads(got, params), _grads(want, params), atol=2e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_pair_logps_chunked_equals_full_logits(tiny_tokenizer, tiny_llama, lora):
    from peft import LoraConfig, get_peft_model

    from medgpt_ds.data.templates import TEMPLATES
    from tests.helpers import RECS, pair_data_args as _data_args

    model = tiny_llama(len(tiny_tokenizer)).double()
    if lora:  # frozen head: per-token gradients path
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                                                 init_lora_weights=False))
        assert long_context.OutputHead(model).frozen
    items = [encode_pair(tiny_tokenizer, TEMPLATES["chatml"], r, _data_args()) for r in RECS]
    batch = PairCollator(tiny_tokenizer.pad_token_id)(items)
    params = [p for p in model.parameters() if p.requires_grad]
    want, want_n = pair_logps(model, batch)
    got, got_n = pair_logps(model, batch, chunk_size=5)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert torch.equal(got_n, want_n)
    w = torch.linspace(-1.0, 2.0, got.numel(), dtype=got.dtype)
    _assert_grads_close(_grads((got * w).sum(), params), _grads((want * w).sum(), params), atol=1e-10)


def test_unknown_logit_postprocessing_falls_back_to_full_logits(tiny_llama, capsys):
    """A forward that rescales its logits in a way OutputHead does not know: the probe notices, the
    stage keeps the model's own logits (with a notice); sequence parallelism refuses the model."""
    model = tiny_llama(64)
    plain_forward = model.forward

    def forward(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.forward = forward
    assert not long_context.head_is_exact(model)
    assert long_context.head_is_exact(tiny_llama(64))
    targs = type("T", (), {"chunked_loss": True, "loss_chunk_size": 64, "sequence_parallel_size": 1})
    assert long_context.loss_chunk_size(targs, model, "sft") == 0
    assert "using its full logits" in capsys.readouterr().out
    targs.sequence_parallel_size = 2
    with pytest.raises(UserError, match="sequence_parallel_size 2"):
        long_context.loss_chunk_size(targs, model, "sft")
    targs.chunked_loss, targs.sequence_parallel_size = False, 1
    assert long_context.loss_chunk_size(targs, tiny_llama(64), "sft") == 0


# --- TiledMLP, activation offload, Liger -------------------------------------------------------


def test_tiled_mlp_keeps_loss_and_gradients(tiny_llama):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 100))  # 100 tokens / hidden 32 -> 4 shards per MLP call
    batch = {"input_ids": ids, "labels": ids}
    plain, tiled = tiny_llama(64).train(), tiny_llama(64).train()
    assert long_context.tile_mlps(tiled) == 2 and long_context.tile_mlps(tiled) == 0  # once per MLP
    calls = []
    apply = TiledMLP.apply

    def spy(fn, module, x, shards, params):
        calls.append(shards)
        return apply(fn, module, x, shards, params)

    TiledMLP.apply = spy
    try:
        got, _ = lm_loss_sum(tiled, batch)
        got.backward()  # TiledMLP accumulates the MLP weights' .grad inside its backward (as engine.backward sees it)
    finally:
        TiledMLP.apply = apply
    want, _ = lm_loss_sum(plain, batch)
    want.backward()
    assert calls == [4, 4]
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    _assert_grads_close([p.grad for p in tiled.parameters()], [p.grad for p in plain.parameters()], atol=1e-6)
    assert all(p.grad is not None for p in tiled.parameters())


def test_activation_offload_moves_saved_tensors_and_keeps_gradients(tiny_llama, monkeypatch):
    """TRL's OffloadActivations around the loss forward with gradient checkpointing: the layers'
    checkpointed inputs are packed off the compute device (here CPU -> CPU copies, the only device
    this machine has) and the gradients are unchanged."""
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cpu"))
    monkeypatch.setattr(torch.cpu, "empty_cache", lambda: None, raising=False)  # called when bitsandbytes is loaded
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 40))
    batch = {"input_ids": ids, "labels": ids}
    plain, offloaded = tiny_llama(64).train(), tiny_llama(64).train()
    for m in (plain, offloaded):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ctx = long_context.activation_offload_context(offloaded, device_type="cpu")
    moved = []

    def loss_fn(engine, b):
        out = lm_loss_sum(engine, b, chunk_size=16)
        moved.append(sum(1 for v in ctx.tracker.values() if v[1]))  # tensors copied off the device
        return out

    got, _ = long_context.with_context(loss_fn, ctx)(offloaded, batch)
    want, _ = lm_loss_sum(plain, batch, chunk_size=16)
    assert moved[0] >= 2  # at least every decoder layer's checkpointed input
    assert got.item() == want.item()
    _assert_grads_close(_grads(got, list(offloaded.parameters())), _grads(want, list(plain.parameters())), atol=1e-7)
    assert long_context.activation_offload_context(plain) is None  # a CPU run: nothing to offload


def test_liger_switch_errors_and_the_call_it_makes(tiny_llama, monkeypatch):
    import importlib.util
    import sys
    import types

    model = tiny_llama(64)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "liger_kernel" else real_find_spec(n, *a))
    with pytest.raises(UserError, match="pip install liger-kernel"):
        long_context.apply_liger(model)
    calls = []
    pkg = types.ModuleType("liger_kernel")
    sub = types.ModuleType("liger_kernel.transformers")
    sub._apply_liger_kernel_to_instance = lambda **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "liger_kernel", pkg)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "liger_kernel" else real_find_spec(n, *a))
    with pytest.raises(UserError, match="CPU"):
        long_context.apply_liger(model)
    assert calls == []
    monkeypatch.setattr(dist, "on_cuda", lambda: True)
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    long_context.apply_liger(peft_model)
    (kw,) = calls
    assert kw.pop("model") is model  # the transformers model under the PEFT wrapper
    assert kw == {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                  "fused_linear_cross_entropy": False}


# --- sequence parallelism: batch slicing, packed attention, checks ----------------------------


def _packed_rows():
    def s(n, off):
        return {"input_ids": list(range(off, off + n)), "labels": list(range(off + 100, off + 100 + n))}
    return [[s(5, 10), s(3, 20), s(4, 30)], [s(7, 40)]]


@pytest.mark.parametrize("size", [2, 3])
def test_shard_batch_packed_rows_add_up_to_the_batch(size):
    full = PackedCollator(0)(_packed_rows())  # (2, 12): row 2 padded
    shards = [shard_batch(full, 0, r, size) for r in range(size)]
    width = math.ceil(12 / size) * size
    ids = torch.cat([s["input_ids"] for s in shards], 1)
    assert ids.shape == (2, width) and torch.equal(ids[:, :12], full["input_ids"]) and (ids[:, 12:] == 0).all()
    shift = torch.cat([s["shift_labels"] for s in shards], 1)
    assert torch.equal(shift[:, :11], full["labels"][:, 1:]) and (shift[:, 11:] == -100).all()
    pos = torch.cat([s["position_ids"] for s in shards], 1)
    assert torch.equal(pos[:, :12], full["position_ids"])
    assert pos[0, 12:].tolist() == list(range(4, 4 + width - 12))  # padding continues the last sample: causal tail
    assert sum(int(s["num_label_tokens"]) for s in shards) == int(full["num_label_tokens"])
    assert sum(int(s["num_tokens"]) for s in shards) == int(full["num_tokens"])
    assert all("attention_mask" not in s and "labels" not in s for s in shards)


def test_shard_batch_pairs_and_flattened_cu_seq_lens(tiny_tokenizer):
    from medgpt_ds.data.templates import TEMPLATES
    from tests.helpers import RECS, pair_data_args as _data_args

    items = [encode_pair(tiny_tokenizer, TEMPLATES["chatml"], r, _data_args()) for r in RECS]
    full = PairCollator(tiny_tokenizer.pad_token_id)(items)
    shards = [shard_batch(full, tiny_tokenizer.pad_token_id, r, 2) for r in range(2)]
    assert sum(float(s["num_pairs"]) for s in shards) == len(items)
    assert all(s["input_ids"].size(0) == 2 * len(items) and s["ids"] == full["ids"] for s in shards)
    mask = full["attention_mask"]
    pos = torch.cat([s["position_ids"] for s in shards], 1)[:, :mask.size(1)]
    assert torch.equal(pos, torch.arange(mask.size(1)).expand_as(pos))  # right padding: plain positions
    left = dict(full, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="right-padded"):
        shard_batch(left, 0, 0, 2)
    # a flattened micro batch (1, N) with cu_seq_lens: the padding becomes one more sequence
    flat = {"input_ids": torch.arange(1, 8).unsqueeze(0), "labels": torch.arange(1, 8).unsqueeze(0),
            "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3]]), "cu_seq_lens_q": torch.tensor([0, 3, 7]),
            "cu_seq_lens_k": torch.tensor([0, 3, 7]), "max_length_q": 4, "max_length_k": 4}
    s0 = shard_batch(flat, 0, 0, 4)
    assert s0["cu_seq_lens_q"].tolist() == [0, 3, 7, 8] and s0["max_length_k"] == 4 and s0["input_ids"].shape == (1, 2)


def test_packed_core_attention_keeps_samples_apart():
    """After the all-to-all, the core attention sees the whole packed row; sdpa without a mask would
    let samples attend to each other. The wrapper's result equals each sample attended on its own."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    q = torch.randn(2, 4, 12, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 12, 8, dtype=torch.float64), torch.randn(2, 2, 12, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], list(range(12))])
    got, _ = _packed_core(sdpa_attention_forward, "sdpa")(module, q, k, v, None, position_ids=pos, scaling=0.3)
    for b, bounds in ((0, [(0, 5), (5, 8), (8, 12)]), (1, [(0, 12)])):
        for s, e in bounds:
            want, _ = sdpa_attention_forward(module, q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], None,
                                             scaling=0.3)
            torch.testing.assert_close(got[b:b + 1, s:e], want, atol=1e-12, rtol=0)
    leaky, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
    assert (leaky[0, 5:] - got[0, 5:]).abs().max() > 1e-3  # what it would be without the wrapper


def test_sequence_parallel_refusals(tiny_llama, monkeypatch):
    from medgpt_ds.config import parse_args

    with pytest.raises(UserError, match="supported for pt, sft, dpo, orpo, not --stage rm"):
        parse_args(["--stage", "rm", "--model_config", "tiny", "--tokenizer_name_or_path", "x", "--output_dir", "o",
                    "--sequence_parallel_size", "2"])
    with pytest.raises(UserError, match="does not divide the world size 1"):
        dist.init_sequence_parallel(2)
    monkeypatch.setattr(dist, "_sp_size", 2)
    check_model(tiny_llama(64))  # 4 heads, 2 kv heads, sdpa: fine
    with pytest.raises(UserError, match="'eager'"):
        check_model(tiny_llama(64, attn_implementation="eager"))
    with pytest.raises(UserError, match="3 attention heads"):
        check_model(tiny_llama(64, hidden_size=36, num_attention_heads=3, num_key_value_heads=1))
    with pytest.raises(UserError, match="sliding-window"):
        check_model(tiny_llama(64, sliding_window=16))
    hybrid = tiny_llama(64)
    hybrid.config.layer_types = ["linear_attention", "full_attention"]
    with pytest.raises(UserError, match="linear-attention"):
        check_model(hybrid)


def test_padded_collator_rows_shard_with_plain_positions():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    full = PaddedCollator(0)(rows)
    s1 = shard_batch(full, 0, 1, 2)
    assert s1["position_ids"].tolist() == [[2, 3], [2, 3]] and s1["shift_labels"].tolist() == [[-100, -100], [-100, -100]]
    assert int(shard_batch(full, 0, 0, 2)["num_label_tokens"]) + int(s1["num_label_tokens"]) == int(full["num_label_tokens"])


def test_sequence_parallel_batch_arithmetic_and_gradient_average(monkeypatch):
    """The DeepSpeed config counts data-parallel ranks (world / N): an explicit train_batch_size is
    checked against micro x accumulation x world/N; ZeRO-3's reduce-scatter averages over the world."""
    import os
    import types

    from medgpt_ds import engine as eng
    from tests.launch_utils import ROOT

    targs = types.SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=3, max_grad_norm=1.0,
                                  bf16=False, fp16=False, learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999,
                                  adam_epsilon=1e-8, weight_decay=0.0, warmup_steps=0, warmup_ratio=0.0)
    raw = eng.load_ds_config(os.path.join(ROOT, "ds_configs", "zero3.json"))
    raw["sequence_parallel_size"] = 4
    assert eng.resolve_ds_config(raw, targs, world_size=2)["train_batch_size"] == 12  # 8 GPUs / SP 4 = 2 dp ranks
    with pytest.raises(eng.DSConfigError, match=r"micro 2 x grad_accum 3 x data-parallel 2 = 12; use --gradient_acc"):
        eng.resolve_ds_config({**raw, "train_batch_size": 24}, targs, world_size=2)
    bad = {**raw, "zero_optimization": {**raw["zero_optimization"], "reduce_scatter": False}}
    with pytest.raises(eng.DSConfigError, match="reduce_scatter=false with --sequence_parallel_size"):
        eng.resolve_ds_config(bad, targs, world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setattr(dist, "_sp_size", 4)
    assert (dist.dp_world_size(), eng.gradient_average_size({"zero_optimization": {"stage": 2}})) == (2, 2)
    assert eng.gradient_average_size({"zero_optimization": {"stage": 3}, "sequence_parallel_size": 4}) == 8
    monkeypatch.setenv("RANK", "6")
    assert (dist.sp_rank(), dist.dp_rank()) == (2, 1)  # ranks 4..7 are group 1
