"""Every model family users bring, on one CPU process: packed == padded per-token losses and
gradients through our collators, LoRA ``all`` targets by kind, composite (text + vision) checkpoints
trained text-only and loaded back whole, and the PPO value head for model types transformers has no
token classifier for. The 2-rank ZeRO-3 runs of the same families are in test_families_dist.py.

Tolerances: everything runs in fp32; packed and padded compute the same sums in a different order
(~5e-7 on per-token losses of ~4.6 measured), so 2e-5 on losses and 1e-5 + 1e-4 relative on
gradients leave a wide margin, while a leak across samples moves later samples' losses by >1e-3.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from medgpt_ds.data.packing import PackedCollator, PaddedCollator, model_inputs, packing_plan
from tests.family_models import ALL, COMPOSITES, make_model
from tests.launch_utils import ROOT, env

pytestmark = pytest.mark.families
V = 96
LOSS_TOL = 2e-5


def _samples() -> list[dict]:
    """Five samples, most longer than gemma3's sliding window (4), with prompt tokens unlabelled."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for n, n_prompt in ((9, 2), (5, 0), (12, 3), (7, 1), (3, 1)):
        ids = torch.randint(1, V - 8, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return out


ROWS = [[0, 1], [2, 3, 4]]  # a micro batch of 2 packed rows


def _token_losses(logits, labels):
    logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()  # (B*(T-1), V)
    loss = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")
    return loss[labels != -100]


def _losses_and_grads(model, batch):
    model.zero_grad()
    losses = _token_losses(model(**model_inputs(batch), use_cache=False).logits, batch["labels"])
    losses.sum().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _max_grad_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def models():
    """One tiny model per family (built once; tests deep-copy what they modify)."""
    return {name: make_model(name, V, pad_token_id=0) for name in ALL}


@pytest.mark.parametrize("name", ALL)
def test_packed_equals_padded(models, name):
    """Our collator in the layout packing_plan picks (and every exact layout) gives the per-token
    losses and gradients of one sample per padded row; hybrids with linear attention fall back to
    padded rows on CPU, because packing them would leak."""
    model = copy.deepcopy(models[name]).train()
    samples = _samples()
    ref_loss, ref_grads = _losses_and_grads(model, PaddedCollator(0)(samples))
    assert ref_loss.numel() == sum(sum(x != -100 for x in s["labels"][1:]) for s in samples)
    rows = [[samples[i] for i in row] for row in ROWS]
    plan = packing_plan(model.config, "sdpa", "cpu")
    if name in ("qwen3_5_text", "qwen3_5"):
        assert plan.layout == "padded" and "flash-linear-attention" in plan.notice and "causal-conv1d" in plan.notice
        # why: position ids alone leave the Gated DeltaNet state flowing into the next sample
        leaked, _ = _losses_and_grads(model, PackedCollator(0)(rows))
        assert (leaked - ref_loss).abs().max() > 1e-3
        # and transformers refuses the boundaries without the kernels
        with pytest.raises(ValueError, match="flash-linear-attention"):
            _losses_and_grads(model, PackedCollator(0, flatten=True)(rows))
        return
    assert plan.layout == "rows"
    flash = packing_plan(model.config, "flash_attention_2", "cuda")
    assert flash.layout == "flat" and not flash.seq_idx
    for layout_plan in (plan, flash):  # (2, T) rows and the flattened (1, N) row, both on sdpa here
        loss, grads = _losses_and_grads(model, layout_plan.collator(0)(rows))
        torch.testing.assert_close(loss, ref_loss, atol=LOSS_TOL, rtol=0)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4, msg=f"{layout_plan.layout} {k}")


# Stand-ins for the CUDA kernels transformers uses to keep packed samples apart in Gated DeltaNet
# layers, with the documented semantics of flash-linear-attention's chunk_gated_delta_rule
# (cu_seqlens: the sequence boundaries of a (1, N) batch) and causal-conv1d's causal_conv1d_fn
# (seq_idx: the sequence of every token), written as plain per-token recurrences on the CPU.
FAKE_FLA = '''
import torch


def _l2norm(x):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _rule(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel):
    b, t, hk, dk = k.shape
    hv, dv = v.shape[-2:]
    if hk != hv:
        q, k = q.repeat_interleave(hv // hk, 2), k.repeat_interleave(hv // hk, 2)
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    q = q * (dk ** -0.5 if scale is None else scale)
    state = torch.zeros(b, hv, dk, dv)
    out = []
    for i in range(t):
        state = state * g[:, i].exp()[..., None, None]
        kv = (state * k[:, i][..., None]).sum(-2)
        state = state + k[:, i][..., None] * ((v[:, i] - kv) * beta[:, i][..., None])[..., None, :]
        out.append((state * q[:, i][..., None]).sum(-2))
    return torch.stack(out, 1)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm_in_kernel=False):
    assert initial_state is None and not output_final_state
    if cu_seqlens is None:
        return _rule(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel).to(q.dtype), None
    assert q.shape[0] == 1 and cu_seqlens.dtype == torch.int32, (q.shape, cu_seqlens.dtype)
    bounds = cu_seqlens.tolist()
    parts = [_rule(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], scale, use_qk_l2norm_in_kernel)
             for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, 1).to(q.dtype), None


fused_recurrent_gated_delta_rule = chunk_gated_delta_rule
'''
FAKE_CONV = '''
import torch
import torch.nn.functional as F


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    width = weight.shape[-1]

    def conv(seg):
        return F.conv1d(F.pad(seg, (width - 1, 0)), weight[:, None], bias, groups=x.shape[1])

    if seq_idx is None:
        out = conv(x)
    else:
        assert x.shape[0] == 1 and seq_idx.dtype == torch.int32 and seq_idx.shape == (1, x.shape[-1])
        cuts = [0] + (torch.nonzero(seq_idx[0, 1:] != seq_idx[0, :-1])[:, 0] + 1).tolist() + [x.shape[-1]]
        out = torch.cat([conv(x[..., a:b]) for a, b in zip(cuts[:-1], cuts[1:])], -1)
    return F.silu(out) if activation in ("silu", "swish") else out


def causal_conv1d_update(*args, **kwargs):
    raise NotImplementedError("decode only")
'''
FAKE_KERNEL_CHECK = '''
import json, sys
import torch
from medgpt_ds.data.packing import PaddedCollator, packing_plan
from tests.test_families import ROWS, _losses_and_grads, _max_grad_diff, _samples
from tests.family_models import make_model

out = {}
for name in ("qwen3_5_text", "qwen3_5"):
    model = make_model(name, 96, pad_token_id=0).train()
    plan = packing_plan(model.config, "sdpa", "cuda")
    samples = _samples()
    rows = [[samples[i] for i in row] for row in ROWS]
    ref_loss, ref_grads = _losses_and_grads(model, PaddedCollator(0)(samples))
    flat = plan.collator(0)(rows)
    res = {"layout": plan.layout, "seq_idx": plan.seq_idx}
    loss, grads = _losses_and_grads(model, flat)
    res["loss"], res["grad"] = (loss - ref_loss).abs().max().item(), _max_grad_diff(grads, ref_grads)
    for drop in ("seq_idx", "cu_seq_lens_q"):  # each boundary input is needed
        partial = {k: v for k, v in flat.items() if k != drop}
        res["without_" + drop] = (_losses_and_grads(model, partial)[0] - ref_loss).abs().max().item()
    out[name] = res
print("RESULT " + json.dumps(out))
'''


def test_linear_attention_flat_path_with_kernels(tmp_path):
    """With the linear-attention kernels present (CUDA in real runs; stand-ins with the kernels'
    documented semantics here) packing picks the flat layout for Qwen3.5, and the collator's
    cu_seq_lens and seq_idx reach the kernels through transformers and keep samples apart: flat ==
    padded, while dropping either input leaks."""
    for pkg, code in (("fla", FAKE_FLA), ("causal_conv1d", FAKE_CONV)):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(textwrap.dedent(code))
    p = subprocess.run([sys.executable, "-c", FAKE_KERNEL_CHECK], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"))
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
    for name, res in json.loads(lines[0][7:]).items():
        assert res["layout"] == "flat" and res["seq_idx"], (name, res)
        assert res["loss"] < LOSS_TOL and res["grad"] < 1e-5, (name, res)
        # a leak moves later samples far more than rounding does (exact path: < 1e-6)
        assert res["without_seq_idx"] > 1e-4 and res["without_cu_seq_lens_q"] > 1e-4, (name, res)


# --- LoRA --target_modules all -------------------------------------------------------------------

# family -> {kind: number of targets}; experts are stacked 3-D weights (2 per MoE layer)
EXPECTED_KINDS = {
    "llama": {"attention": 8, "MLP": 6},
    "qwen2": {"attention": 8, "MLP": 6},
    "qwen3": {"attention": 8, "MLP": 6},
    "qwen3_moe": {"attention": 8, "experts": 4},
    "qwen3_5_text": {"attention": 9, "MLP": 6},
    "qwen3_5": {"attention": 9, "MLP": 6},
    "gemma3_text": {"attention": 8, "MLP": 6},
    "gemma3": {"attention": 8, "MLP": 6},
    "mistral": {"attention": 8, "MLP": 6},
    "phi3": {"attention": 4, "MLP": 4},
    "glm4": {"attention": 8, "MLP": 4},
    "deepseek_v3": {"attention": 10, "MLP": 3, "experts": 2, "shared experts": 3},
}


@pytest.mark.parametrize("name", ALL)
def test_lora_all_targets(models, name):
    from medgpt_ds.model import _kind, lora_targets

    model = models[name]
    t = lora_targets(model, "all")
    kinds: dict[str, int] = {}
    for n in t.modules + t.parameters:
        kinds[_kind(n)] = kinds.get(_kind(n), 0) + 1
    assert kinds == EXPECTED_KINDS[name], (kinds, t.summary())
    params = dict(model.named_parameters())
    assert all(params[p].ndim == 3 for p in t.parameters)
    assert not any(n.rsplit(".", 1)[-1] in ("lm_head", "gate") for n in t.modules)  # heads, routers
    n_moe = {"qwen3_moe": 2, "deepseek_v3": 1}.get(name, 0)
    assert len(t.routers) == n_moe and all(r.endswith(".mlp.gate") for r in t.routers)
    if name in COMPOSITES:  # the language model only, by its original names
        assert all(".language_model." in n for n in t.modules) and t.modules[0].startswith("model.language_model.")


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_moe_lora_trains_experts_and_reloads(tmp_path, models, name):
    """LoRA all on a MoE: dropout stays on linear layers and is 0 on the stacked experts (peft
    refuses it there), every targeted kind gets gradients, and the saved adapter reloads to the same
    logits, with the shared experts and dense MLP of DeepSeek-V3 keeping their LoRA (stock peft 0.21
    rewrites those names onto the experts and fails to load; ours keeps them)."""
    from types import SimpleNamespace

    from peft.tuners.lora import LoraLayer, ParamWrapper

    from medgpt_ds.model import _kind, apply_lora, load_adapter

    base = models[name]
    args = SimpleNamespace(peft_path=None, modules_to_save=None, target_modules="all", lora_rank=4, lora_alpha=8,
                           lora_dropout=0.1)
    peft_model = apply_lora(copy.deepcopy(base), args).train()
    wrappers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    assert any(isinstance(m, ParamWrapper) for m in wrappers)
    for m in wrappers:
        p = m.lora_dropout["default"].p if isinstance(m.lora_dropout["default"], torch.nn.Dropout) else 0.0
        assert p == (0.0 if isinstance(m, ParamWrapper) else 0.1)
    ids = torch.randint(1, V - 8, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    got_grad = {_kind(n) for n, p in peft_model.named_parameters() if "lora_" in n and p.grad is not None
                and p.grad.abs().sum() > 0}
    assert got_grad == set(EXPECTED_KINDS[name]), got_grad
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    with torch.no_grad():
        want, plain = peft_model(input_ids=ids).logits, base(input_ids=ids).logits
        got = load_adapter(copy.deepcopy(base), str(tmp_path)).eval()(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == sorted(
        n for n, p in base.named_parameters() if p.ndim == 3 and ".experts." in n)


# --- composite (text + vision) checkpoints -------------------------------------------------------

def _model_args(path: str):
    from medgpt_ds.config import ModelArguments

    return ModelArguments(model_name_or_path=path, attn_implementation="sdpa")


def _train_args(**kw):
    from medgpt_ds.config import TrainingArguments

    return TrainingArguments(output_dir="unused", **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, models):
    """Family models saved as checkpoint dirs (with a tiny tokenizer whose vocabulary fits V)."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tok_models

    vocab = {f"t{i}": i for i in range(V)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="t1")),
                                  pad_token="t0", eos_token="t2", unk_token="t1")
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in ("qwen3_5", "gemma3", "qwen3_5_text", "gemma3_text"):
        models[name].save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


@pytest.mark.parametrize("name", COMPOSITES)
def test_composite_loads_whole_and_adapter_keeps_original_names(tmp_path, saved, models, name):
    """A text+vision checkpoint loads as its own *ForConditionalGeneration (not a text-only causal
    LM): the vision tower is frozen, LoRA lands on the language model under the original module
    names, and the adapter loads onto the original class with plain peft and changes its logits."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from medgpt_ds.config import LoraArguments
    from medgpt_ds.model import load_model

    tok = AutoTokenizer.from_pretrained(saved[name])
    lora = LoraArguments(use_peft=True, lora_rank=4, lora_alpha=8, lora_dropout=0.0, target_modules="all")
    peft_model = load_model(_model_args(saved[name]), _train_args(), lora, tok, {"zero_optimization": {"stage": 0}})
    base_cls = type(models[name])
    assert type(peft_model.get_base_model()) is base_cls and base_cls.__name__.endswith("ForConditionalGeneration")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".language_model." in n and "lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    peft_model.eval().save_pretrained(tmp_path)
    ids = torch.randint(3, V - 8, (1, 12), generator=torch.Generator().manual_seed(2))
    original = AutoModelForImageTextToText.from_pretrained(saved[name]).eval()
    assert type(original) is base_cls
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        plain = original(input_ids=ids).logits
        got = PeftModel.from_pretrained(original, str(tmp_path)).eval()(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-2  # the adapter acts on the original class
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# --- PPO value head ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen3_5_text", "gemma3_text", "gemma3"])
def test_value_head_where_transformers_has_none(tmp_path, saved, models, name):
    """transformers has no token classifier for these types; value_model_class builds one on the
    model's own base class: it loads the causal LM's base weights, gives one value per token, saves
    and reloads, and takes a reward model's score head over."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    from medgpt_ds.model import value_model_class

    config = AutoConfig.from_pretrained(saved[name])
    config.num_labels, config.classifier_dropout, config.token_classification_bias = 1, 0.0, False
    with pytest.raises(ValueError):
        AutoModelForTokenClassification.from_config(config)
    cls = value_model_class(config)
    critic = cls.from_pretrained(saved[name], config=config).eval()
    lm = models[name]
    lm_sd, critic_sd = lm.state_dict(), critic.state_dict()
    shared = [k for k in critic_sd if k.startswith("model.")]
    assert len(shared) == len([k for k in lm_sd if k.startswith("model.")])
    for k in shared:
        torch.testing.assert_close(critic_sd[k], lm_sd[k], atol=0, rtol=0, msg=k)
    ids = torch.randint(3, V - 8, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        values = critic(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert values.shape == (2, 7, 1) and values.std() > 0
    critic.save_pretrained(tmp_path / "critic")
    again = cls.from_pretrained(tmp_path / "critic", config=config).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, values,
                                   atol=1e-6, rtol=0)
    # from a reward model (the rm stage's export): its score head becomes the value head
    rm_config = copy.deepcopy(config)
    rm = AutoModelForSequenceClassification.from_config(rm_config)
    rm.save_pretrained(tmp_path / "rm")
    from_rm = cls.from_pretrained(tmp_path / "rm", config=config)
    torch.testing.assert_close(from_rm.score.weight, rm.score.weight, atol=0, rtol=0)


# --- the hub layout exports write ------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_hub_layout_is_what_save_pretrained_writes(models, name):
    """medgpt_ds.convert.layout, unit by unit, gives exactly the keys and tensors transformers'
    save_pretrained writes (revert_weight_conversion over the whole state dict) for every family:
    per-expert MoE weights, Gemma3's language_model.model.*; and reading that layout back unit by
    unit gives the model's own state dict."""
    from transformers.core_model_loading import revert_weight_conversion

    from medgpt_ds.convert.layout import HubReader, Layout
    from medgpt_ds.convert.plans import tied_duplicates

    model = models[name]
    dups = tied_duplicates(model)
    own = {k: v for k, v in model.state_dict().items() if k not in dups}
    want = revert_weight_conversion(model, dict(own))
    layout = Layout(model, {k: v.shape for k, v in own.items()}, to_hub=True)
    got = {}
    for unit in layout.units:
        out = layout.convert(unit, {s: own[s] for s, _ in unit.sources})
        assert {k: v.shape for k, v in out.items()} == unit.targets  # planned on meta tensors
        got.update(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    if name in ("qwen3_moe", "deepseek_v3"):
        assert "model.layers.1.mlp.experts.3.down_proj.weight" in got and len(got) > len(own)
    reader = HubReader({k: v.shape for k, v in got.items()}, {k: v.dtype for k, v in got.items()}, model)
    assert reader.where.keys() == own.keys() and not reader.layout.unexpected
    assert all(torch.equal(reader.tensor(k, got.__getitem__), own[k]) for k in own)
