"""The memory savers every big recipe turns on: gradient checkpointing and QLoRA, on 2 ranks in ONE
deepspeed launch (tests/families_launch.py), ZeRO-3 with persistence threshold 0 (every weight is
sharded).

Gradient checkpointing must change no number: per-step losses and gradient norms of a packed sft run
equal those without it, full and LoRA, ZeRO-2 and ZeRO-3, ZeRO-3 + LoRA + parameter offload, and a
family with non-Llama layers (Qwen3.5's Gated DeltaNet). Each "on" run really recomputes: its engine
reports every decoder layer checkpointed.

QLoRA (bitsandbytes 4-bit nf4 base + LoRA; bitsandbytes quantizes on this CPU): under ZeRO-3 the
packed 4-bit weights are stored in the engine's dtype and really partitioned (each rank holds part
of every packed weight); ZeRO-2 and ZeRO-3 train the same adapter (same losses from step 1, the
quantized base's loss, which differs from the full-precision base's); bf16 ZeRO-3 trains from the
same quantized weights (DeepSpeed's cast would corrupt packed bytes stored in another dtype); DPO
starts at its reference (loss ln 2) on both (its reference pass runs the 4-bit layers in eval mode
without gradients, where bitsandbytes would repack them on an AVX512-BF16 CPU: model.keep_4bit_layout);
the adapter exports and reloads onto the full-precision base; a resume from a checkpoint is exact.
LLM.int8 trains under ZeRO-2. The refusals (8-bit under ZeRO-3, a quantized
checkpoint under ZeRO-3, quantizing a random --model_config model) are unit tests.

Tolerances: checkpointing recomputes the same fp32 operations on the same inputs, so losses and
gradient norms agree to 1e-6 relative (measured: bit-equal). ZeRO-2 vs ZeRO-3 differ only in the order
of floating-point reductions: 1e-5 absolute on losses of 6-8 over 2 steps (measured 3e-7), while the
4-bit rounding moves the step-1 loss by 0.12 and bf16 by 0.01.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.family_models import make_model
from tests.launch_utils import ROOT, ds_config_copy, env, free_port, metrics

pytestmark = [pytest.mark.distributed, pytest.mark.invariant]
DEMO = os.path.join(ROOT, "data", "demo")
LORA = ["--use_peft", "--target_modules", "all", "--lora_rank", "4", "--lora_alpha", "8"]
# name -> (model, ds config, extra flags): each runs with and without --gradient_checkpointing
GC_CASES = {
    "full_z2": ("llama", "z2", []),
    "lora_z3": ("llama", "z3", LORA),
    "lora_z3_offload": ("llama", "z3o", LORA),
    "qwen3_5_text_full_z3": ("qwen3_5_text", "z3", []),
}
QLORA_SFT = ["--qlora", *LORA]


def _sft(model: str, ds: str, *extra: str) -> list[str]:
    return ["--stage", "sft", "--model_name_or_path", model, "--train_file_dir", f"{DEMO}/sft",
            "--model_max_length", "64", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
            "--deepspeed", ds, *extra]


def _runs(models: dict, ds: dict, out) -> list[dict]:
    runs = []
    for name, (model, stage, extra) in GC_CASES.items():
        runs.append({"name": f"gc/{name}/off", "argv": _sft(models[model], ds[stage], *extra)})
        runs.append({"name": f"gc/{name}/on", "argv": _sft(models[model], ds[stage], *extra, "--gradient_checkpointing")})
    q = models["quantizable"]
    runs += [
        {"name": "qlora/sft_z2", "argv": _sft(q, ds["z2"], *QLORA_SFT, "--save_steps", "1")},
        {"name": "qlora/sft_z2_gc", "argv": _sft(q, ds["z2"], *QLORA_SFT, "--gradient_checkpointing")},
        {"name": "qlora/sft_z3", "argv": _sft(q, ds["z3"], *QLORA_SFT, "--save_steps", "1")},
        {"name": "qlora/sft_z3_gc", "argv": _sft(q, ds["z3"], *QLORA_SFT, "--gradient_checkpointing")},
        {"name": "qlora/sft_z3_bf16", "argv": _sft(q, ds["z3"], *QLORA_SFT, "--bf16")},
        {"name": "qlora/lora_fp_z3", "argv": _sft(q, ds["z3"], *LORA)},  # the same run, unquantized
        {"name": "qlora/int8_z2", "argv": _sft(q, ds["z2"], "--load_in_8bit", *LORA)},
    ]
    for stage in ("z2", "z3"):  # step 2 again, from the step-1 checkpoint
        runs.append({"name": f"qlora/sft_{stage}_resumed", "argv": _sft(q, ds[stage], *QLORA_SFT, "--resume_from_checkpoint",
                                                                      str(out / f"qlora_sft_{stage}" / "checkpoint-1"))})
        runs.append({"name": f"qlora/dpo_{stage}", "argv": [
            "--stage", "dpo", "--model_name_or_path", q, "--train_file_dir", f"{DEMO}/reward",
            "--max_source_length", "32", "--max_target_length", "32", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-2", "--deepspeed", ds[stage], *QLORA_SFT]})
    common = ["--template_name", "chatml", "--report_to", "none", "--logging_steps", "1", "--max_steps", "2",
              "--lr_scheduler_type", "constant", "--seed", "3"]
    for r in runs:
        folder = out / r["name"].replace("/", "_")
        r["argv"] += common + ["--output_dir", str(folder)]
        r["engine_report"] = str(folder) + "_engine"
    return runs


@pytest.fixture(scope="module")
def launched(tmp_path_factory, demo_tokenizer_dir):
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("memory_savers")
    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    models = {}
    for name in ("llama", "qwen3_5_text", "quantizable"):
        model = make_model("qwen3_5_text" if name == "qwen3_5_text" else "llama", len(tok),
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        if name == "quantizable":
            # weights of std ~0.2 instead of 0.02: peaked logits, so the loss depends on the weights and
            # 4-bit rounding (or a wrongly gathered packed weight) shows in it
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() == 2:
                        p.mul_(10)
        models[name] = str(tmp / "models" / name)
        model.save_pretrained(models[name])
        tok.save_pretrained(models[name])
    ds = {"z2": os.path.join(ROOT, "ds_configs", "zero2.json"),
          "z3": ds_config_copy(tmp, "zero3", stage3_param_persistence_threshold=0),
          "z3o": ds_config_copy(tmp, "zero3_offload", stage3_param_persistence_threshold=0)}
    runs_file = tmp / "runs.json"
    runs_file.write_text(json.dumps(_runs(models, ds, tmp / "out"), indent=1))
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
           "--master_port", str(free_port()), os.path.join(ROOT, "tests", "families_launch.py"), str(runs_file)]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1200)
    done = json.loads((tmp / "runs.json.done").read_text()) if (tmp / "runs.json.done").exists() else []
    if p.returncode != 0:
        raise AssertionError(f"memory-savers launch failed (rc {p.returncode}) after {[d['name'] for d in done]}:\n"
                             f"{p.stdout[-8000:]}\n--- stderr\n{p.stderr[-8000:]}")
    return {"models": models, "out": tmp / "out", "done": {d["name"]: d["seconds"] for d in done}}


def _folder(launched, run: str):
    return launched["out"] / run.replace("/", "_")


def _curve(launched, run: str, keys=("loss", "grad_norm")) -> dict[int, tuple]:
    rows = metrics(str(_folder(launched, run)))
    curve = {r["step"]: tuple(r[k] for k in keys) for r in rows}
    assert sorted(curve) == [1, 2] and all(math.isfinite(v) for vs in curve.values() for v in vs), (run, rows)
    return curve


def _report(launched, run: str) -> list[dict]:
    return [json.loads(open(f"{_folder(launched, run)}_engine.rank{r}.json").read()) for r in (0, 1)]


@pytest.mark.parametrize("case", GC_CASES)
def test_gradient_checkpointing_changes_no_number(launched, case):
    off, on = _curve(launched, f"gc/{case}/off"), _curve(launched, f"gc/{case}/on")
    for step in (1, 2):
        for k, a, b in zip(("loss", "grad_norm"), off[step], on[step]):
            assert b == pytest.approx(a, rel=1e-6, abs=0), (case, step, k, off, on)
    assert off[2][0] != off[1][0]  # step 2 ran on weights step 1's gradients moved
    assert [r["checkpointed_layers"] for r in _report(launched, f"gc/{case}/on")] == [2, 2]
    assert [r["checkpointed_layers"] for r in _report(launched, f"gc/{case}/off")] == [0, 0]


def _quantized(report: dict) -> dict[str, list]:
    return {k: v for k, v in report["params"].items() if v[0] == "Params4bit"}


def test_qlora_zero3_partitions_the_packed_4bit_weights(launched):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(launched["models"]["quantizable"])
    linear = 2 * (2 * cfg.hidden_size ** 2 + 2 * cfg.hidden_size * cfg.num_key_value_heads * 8
                  + 3 * cfg.hidden_size * cfg.intermediate_size)  # q, o, k, v, gate, up, down x 2 layers
    # ZeRO-2: packed in uint8, two 4-bit values a byte, whole on every rank
    z2 = _quantized(_report(launched, "qlora/sft_z2")[0])
    assert len(z2) == 14 and sum(v[1] for v in z2.values()) == linear // 2
    assert all(v[2] == v[1] for v in z2.values())
    # ZeRO-3: packed in the engine's dtype (fp32: eight values an element; bf16: four), each rank a part
    for run, per_element in (("qlora/sft_z3", 8), ("qlora/sft_z3_bf16", 4)):
        ranks = [_quantized(r) for r in _report(launched, run)]
        assert all(len(r) == 14 for r in ranks) and sum(v[1] for v in ranks[0].values()) == linear // per_element
        for name, (_, full, local) in ranks[0].items():
            assert 0 < local < full and local + ranks[1][name][2] >= full, (run, name, full, local)
    # LoRA on every quantized linear, trainable; the base frozen
    lora = [k for k in _report(launched, "qlora/sft_z3")[0]["params"] if "lora_" in k]
    assert len(lora) == 2 * 14


def test_qlora_zero2_and_zero3_train_the_same_adapter_from_the_quantized_base(launched):
    z2, z3 = _curve(launched, "qlora/sft_z2"), _curve(launched, "qlora/sft_z3")
    fp = _curve(launched, "qlora/lora_fp_z3")
    for step in (1, 2):
        assert abs(z2[step][0] - z3[step][0]) < 1e-5, (step, z2, z3)
        assert z3[step][1] == pytest.approx(z2[step][1], rel=1e-4)
    # step 1 is the 4-bit base's loss (lora_B starts at 0): close to, but not, the full-precision base's
    assert 1e-4 < abs(z3[1][0] - fp[1][0]) < 0.05 * fp[1][0], (z3, fp)
    # bf16 matmuls over the same packed weights: bf16 rounding, not garbage
    bf16 = _curve(launched, "qlora/sft_z3_bf16")
    assert abs(bf16[1][0] - z3[1][0]) < 0.02 * z3[1][0], (bf16, z3)
    # checkpointing changes nothing under QLoRA either (ZeRO-2 goes through peft's kbit preparation)
    for run, plain in (("qlora/sft_z2_gc", z2), ("qlora/sft_z3_gc", z3)):
        gc = _curve(launched, run)
        assert [r["checkpointed_layers"] for r in _report(launched, run)] == [2, 2], run
        assert all(gc[step] == pytest.approx(plain[step], rel=1e-6) for step in (1, 2)), (run, gc, plain)


@pytest.mark.parametrize("stage", ["z2", "z3"])
def test_qlora_resumes_exactly(launched, stage):
    """The checkpoint holds the 4-bit base with its quantization state (absmax, quant_map) beside the
    adapter and optimizer; a resume from step 1 redoes step 2 bit for bit."""
    rows = metrics(str(_folder(launched, f"qlora/sft_{stage}_resumed")))
    assert [r["step"] for r in rows] == [2]
    full = _curve(launched, f"qlora/sft_{stage}")
    assert (rows[0]["loss"], rows[0]["grad_norm"]) == full[2]


def test_qlora_dpo_starts_at_its_reference_on_zero2_and_zero3(launched):
    keys = ("loss", "rewards/margins", "grad_norm")
    z2, z3 = _curve(launched, "qlora/dpo_z2", keys), _curve(launched, "qlora/dpo_z3", keys)
    for curve in (z2, z3):
        assert curve[1][0] == pytest.approx(math.log(2), abs=1e-6) and abs(curve[1][1]) < 1e-6
        assert curve[2][0] != pytest.approx(math.log(2), abs=1e-6)  # the adapter moved the policy
    for step in (1, 2):
        assert abs(z2[step][0] - z3[step][0]) < 1e-5 and z3[step][2] == pytest.approx(z2[step][2], rel=1e-4)


def _adapter(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_qlora_adapter_exports_and_reloads_onto_the_full_precision_base(launched):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from medgpt_ds.model import keep_4bit_layout

    base = launched["models"]["quantizable"]
    z2, z3 = _adapter(_folder(launched, "qlora/sft_z2")), _adapter(_folder(launched, "qlora/sft_z3"))
    assert sorted(z2) == sorted(z3) and len(z3) == 2 * 14
    for k in z3:  # ZeRO-3's export is gathered (not the empty shards) and is ZeRO-2's adapter
        torch.testing.assert_close(z3[k], z2[k], atol=1e-5, rtol=0)
    assert max(z3[k].abs().max().item() for k in z3 if "lora_B" in k) > 1e-3  # two steps moved lora_B
    ids = torch.randint(5, 500, (2, 12), generator=torch.Generator().manual_seed(4))
    four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    with torch.no_grad():
        fp = AutoModelForCausalLM.from_pretrained(base).eval()
        fp_plain = fp(input_ids=ids).logits
        fp_tuned = PeftModel.from_pretrained(fp, str(_folder(launched, "qlora/sft_z3"))).eval()(input_ids=ids).logits
        q = AutoModelForCausalLM.from_pretrained(base, quantization_config=four_bit).eval()
        assert keep_4bit_layout(q) == 14  # as training does: an eval forward must not repack the weights
        packed = {n: p.data.clone() for n, p in q.named_parameters() if type(p).__name__ == "Params4bit"}
        q_plain = q(input_ids=ids).logits
        assert all(torch.equal(p.data, packed[n]) for n, p in q.named_parameters() if n in packed)
        q_tuned = PeftModel.from_pretrained(q, str(_folder(launched, "qlora/sft_z3"))).eval()(input_ids=ids).logits
    # trained on the 4-bit base, the adapter moves the full-precision base the same way; the logits stay
    # as close to the quantized model's as the base's own 4-bit rounding puts them (std-0.2 weights in
    # 4 bits: rounding of ~0.7 on logits, an adapter step of ~0.16; measured cosine 0.70)
    rounding = (q_plain - fp_plain).abs().mean().item()
    on_fp, on_q = (fp_tuned - fp_plain).flatten(), (q_tuned - q_plain).flatten()
    assert on_fp.abs().mean() > 1e-2 and on_q.abs().mean() > 1e-2
    assert torch.nn.functional.cosine_similarity(on_fp, on_q, dim=0) > 0.5
    assert (q_tuned - fp_tuned).abs().mean() < 1.2 * rounding


def test_int8_lora_trains_on_zero2(launched):
    curve = _curve(launched, "qlora/int8_z2")
    assert curve[2][0] != curve[1][0]
    quantized = {k: v for k, v in _report(launched, "qlora/int8_z2")[0]["params"].items() if v[0] == "Int8Params"}
    assert len(quantized) == 14
    assert max(t.abs().max().item() for k, t in _adapter(_folder(launched, "qlora/int8_z2")).items()
               if "lora_B" in k) > 1e-3


# --- refusals and the config that is built (no launch) ---

def _margs(**kw):
    from medgpt_ds.config import ModelArguments

    return ModelArguments(**{"model_name_or_path": "some/model", **kw})


@pytest.mark.unit
def test_quantization_config_per_zero_stage():
    from medgpt_ds.model import quantization_config

    assert quantization_config(_margs(), torch.float32, {}) is None
    z2 = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    c = quantization_config(_margs(load_in_4bit=True), torch.bfloat16, z2)
    assert (c.load_in_4bit, c.bnb_4bit_quant_type, c.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert (c.bnb_4bit_compute_dtype, c.bnb_4bit_quant_storage) == (torch.bfloat16, torch.uint8)
    for precision, storage in (({}, torch.float32), ({"bf16": {"enabled": True}}, torch.bfloat16),
                               ({"fp16": {"enabled": True}}, torch.float16)):
        c = quantization_config(_margs(load_in_4bit=True), torch.float32, {"zero_optimization": {"stage": 3}, **precision})
        assert c.bnb_4bit_quant_storage == storage, precision  # what DeepSpeed casts every parameter to
    assert quantization_config(_margs(load_in_8bit=True), torch.float32, z2).load_in_8bit


@pytest.mark.unit
def test_quantization_refusals_say_why_and_what_to_use():
    from transformers import LlamaConfig

    from medgpt_ds.errors import UserError
    from medgpt_ds.model import check_prequantized, quantization_config

    z3 = {"zero_optimization": {"stage": 3}}
    with pytest.raises(UserError, match=r"--load_in_8bit is not supported with ZeRO-3: .*use --load_in_4bit"):
        quantization_config(_margs(load_in_8bit=True), torch.float32, z3)
    with pytest.raises(UserError, match=r"quantize a pretrained checkpoint: pass --model_name_or_path"):
        quantization_config(_margs(model_name_or_path=None, model_config="tiny", load_in_4bit=True), torch.float32, {})
    saved = LlamaConfig(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(UserError, match=r"/m is a quantized checkpoint \(bitsandbytes\); ZeRO-3 cannot partition"):
        check_prequantized(saved, "/m", zero3=True)
    check_prequantized(saved, "/m", zero3=False)  # ZeRO-2 trains on it
    check_prequantized(LlamaConfig(), "/m", zero3=True)
