"""Every model family on 2 ranks under ZeRO-3 (persistence threshold 0: every weight is sharded), all
in ONE deepspeed launch (tests/families_launch.py runs them back to back): one sft step in full and
with LoRA ``all`` per family, rm and grpo for qwen3, qwen3_moe and the Qwen3.5 composite, ppo with
our value head for qwen3_5_text and gemma3_text, and a remote-code MoE whose experts are separate
modules (ranks route to different experts). Then, here: each trainer export reloads and gives the
logits of the weights DeepSpeed's own zero_to_fp32 reads from the run's checkpoint.

Tolerances: fp32 throughout; the export and the checkpoint hold the same fp32 numbers, so logits
agree to float rounding (1e-5 on logits of magnitude ~1).
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from tests.family_models import COMPOSITES, FAMILIES, make_model, save_remote_moe
from tests.launch_utils import ROOT, ds_config_copy, env, free_port, metrics

pytestmark = pytest.mark.families
SFT_FAMILIES = tuple(FAMILIES) + COMPOSITES
RL_FAMILIES = ("qwen3", "qwen3_moe", "qwen3_5")
PPO_FAMILIES = ("qwen3_5_text", "gemma3_text")
DEMO = os.path.join(ROOT, "data", "demo")


def _runs(models: dict, ds: str, out) -> list[dict]:
    common = ["--template_name", "chatml", "--report_to", "none", "--logging_steps", "1", "--max_steps", "1",
              "--lr_scheduler_type", "constant", "--seed", "3", "--deepspeed", ds]
    sft = ["--stage", "sft", "--train_file_dir", f"{DEMO}/sft", "--model_max_length", "64",
           "--per_device_train_batch_size", "2", "--learning_rate", "1e-2"]
    lora = ["--use_peft", "--target_modules", "all", "--lora_rank", "4", "--lora_alpha", "8"]
    rollout = ["--reward_funcs", "format", "--max_new_tokens", "4", "--max_source_length", "48",
               "--learning_rate", "1e-3", "--train_file_dir"]
    runs = []
    for f in SFT_FAMILIES:
        runs.append({"name": f"{f}/sft", "argv": sft + ["--model_name_or_path", models[f]]})
        runs.append({"name": f"{f}/lora", "argv": sft + lora + ["--model_name_or_path", models[f]]})
    for f in RL_FAMILIES:
        runs.append({"name": f"{f}/rm", "argv": [
            "--stage", "rm", "--model_name_or_path", models[f], "--train_file_dir", f"{DEMO}/reward",
            "--max_source_length", "32", "--max_target_length", "32", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-3"]})
        runs.append({"name": f"{f}/grpo", "argv": [
            "--stage", "grpo", "--sft_model_path", models[f], "--per_device_train_batch_size", "4",
            "--num_generations", "2", "--rollout_batch_size", "2", *rollout, f"{DEMO}/grpo"]})
    for f in PPO_FAMILIES:
        runs.append({"name": f"{f}/ppo", "argv": [
            "--stage", "ppo", "--sft_model_path", models[f], "--per_device_train_batch_size", "2",
            "--rollout_batch_size", "2", *rollout, f"{DEMO}/sft"]})
    # micro batch 1 of short rows: the ranks' tokens pick different experts among 16
    runs.append({"name": "remote_moe/sft", "argv": [
        "--stage", "sft", "--train_file_dir", f"{DEMO}/sft", "--model_max_length", "64", "--trust_remote_code",
        "--per_device_train_batch_size", "1", "--learning_rate", "1e-2", "--model_name_or_path", models["remote_moe"]]})
    for r in runs:
        r["argv"] += common + ["--output_dir", str(out / r["name"].replace("/", "_"))]
    return runs


@pytest.fixture(scope="module")
def launched(tmp_path_factory, demo_tokenizer_dir):
    """Save every family's tiny model with the demo tokenizer, run everything in one 2-rank launch."""
    import subprocess

    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("families_dist")
    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    models = {}
    for name in SFT_FAMILIES:
        path = str(tmp / "models" / name)
        make_model(name, len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).save_pretrained(path)
        tok.save_pretrained(path)
        models[name] = path
    models["remote_moe"] = save_remote_moe(str(tmp / "models" / "remote_moe"), tok)
    ds = ds_config_copy(tmp, "zero3", stage3_param_persistence_threshold=0)
    runs_file = tmp / "runs.json"
    runs_file.write_text(json.dumps(_runs(models, ds, tmp / "out"), indent=1))
    cmd = [os.path.join(os.path.dirname(__import__("sys").executable), "deepspeed"), "--num_gpus", "2",
           "--master_port", str(free_port()), os.path.join(ROOT, "tests", "families_launch.py"), str(runs_file)]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1500)
    done = json.loads((tmp / "runs.json.done").read_text()) if (tmp / "runs.json.done").exists() else []
    if p.returncode != 0:
        raise AssertionError(f"families launch failed (rc {p.returncode}) after {[d['name'] for d in done]}:\n"
                             f"{p.stdout[-8000:]}\n--- stderr\n{p.stderr[-8000:]}")
    return {"models": models, "out": tmp / "out", "done": {d["name"]: d["seconds"] for d in done},
            "stdout": p.stdout}


def _out(launched, run: str):
    return launched["out"] / run.replace("/", "_")


def _checkpoint_state(out) -> dict[str, torch.Tensor]:
    """The trained weights as DeepSpeed's own zero_to_fp32 reads them from the ZeRO-3 checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(out), tag="checkpoint-1")


def _model_class(path: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from medgpt_ds.model import is_composite

    return AutoModelForImageTextToText if is_composite(AutoConfig.from_pretrained(path)) else AutoModelForCausalLM


def _probe(n_vocab: int = 500) -> torch.Tensor:
    return torch.randint(5, n_vocab, (2, 12), generator=torch.Generator().manual_seed(4))


def _safetensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors") and not name.startswith("adapter_"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def test_every_run_finished(launched):
    names = [r for r in launched["done"]]
    assert len(names) == 2 * len(SFT_FAMILIES) + 2 * len(RL_FAMILIES) + len(PPO_FAMILIES) + 1, names
    for name in names:
        train = metrics(str(_out(launched, name)))
        assert train and all(math.isfinite(v) for r in train for k, v in r.items()
                             if k in ("loss", "grad_norm", "value_loss", "entropy")), (name, train)


@pytest.mark.parametrize("family", SFT_FAMILIES)
def test_sft_full_export_is_the_trained_model(launched, family):
    out, base = _out(launched, f"{family}/sft"), launched["models"][family]
    cls = _model_class(base)
    exported = cls.from_pretrained(str(out)).eval()
    reference = cls.from_pretrained(base).eval()
    trained = _checkpoint_state(out)
    missing, unexpected = reference.load_state_dict(trained, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and reference.config.get_text_config().tie_word_embeddings}
    assert not unexpected and set(missing) == tied, (missing, unexpected)
    ids = _probe()
    with torch.no_grad():
        got, want = exported(input_ids=ids).logits, reference(input_ids=ids).logits
        before = cls.from_pretrained(base).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - before).abs().max() > 1e-3  # one step at lr 1e-2 moved the model
    exp_t, base_t = _safetensors(out), _safetensors(base)
    assert set(exp_t) == set(base_t)  # the checkpoint's own layout (per-expert MoE weights, composite prefixes)
    if family in COMPOSITES:  # the whole original model: same type, vision untouched
        text = [k for k in base_t if "language_model." in k or k.startswith("lm_head")]  # gemma3's hub layout
        vision = sorted(set(base_t) - set(text))  # has no "model." in front: language_model.model.*
        assert vision and all(torch.equal(exp_t[k], base_t[k]) for k in vision)
        assert any(not torch.equal(exp_t[k], base_t[k]) for k in text)
        exp_cfg, base_cfg = (json.loads(open(os.path.join(p, "config.json")).read()) for p in (out, base))
        assert (exp_cfg["model_type"], exp_cfg["architectures"]) == (base_cfg["model_type"], base_cfg["architectures"])


@pytest.mark.parametrize("family", SFT_FAMILIES)
def test_sft_lora_all_export_is_the_trained_adapter(launched, family):
    from peft import LoraConfig, get_peft_model

    from medgpt_ds.model import load_adapter, v5_native_peft

    out, base = _out(launched, f"{family}/lora"), launched["models"][family]
    cls = _model_class(base)
    cfg = json.loads((out / "adapter_config.json").read_text())
    if family in ("qwen3_moe", "deepseek_v3"):  # the experts, as stacked weights
        assert cfg["target_parameters"] and all(".experts." in p for p in cfg["target_parameters"])
    if family == "deepseek_v3":  # shared experts and the dense first layer keep their LoRA
        assert any(".shared_experts." in m for m in cfg["target_modules"])
        assert any(m.startswith("model.layers.0.mlp.") for m in cfg["target_modules"])
    if family in COMPOSITES:
        assert cfg["target_modules"] and all(".language_model." in m for m in cfg["target_modules"])
    got_model = load_adapter(cls.from_pretrained(base), str(out)).eval()
    with v5_native_peft():
        reference = get_peft_model(cls.from_pretrained(base), LoraConfig.from_pretrained(str(out))).eval()
    reference.load_state_dict(_checkpoint_state(out), strict=True)
    ids = _probe()
    with torch.no_grad():
        got, want = got_model(input_ids=ids).logits, reference(input_ids=ids).logits
        before = cls.from_pretrained(base).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - before).abs().max() > 1e-4  # one step moved lora_B off zero


@pytest.mark.parametrize("family", RL_FAMILIES)
def test_rm_and_grpo(launched, family):
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(str(_out(launched, f"{family}/rm"))).eval()
    with torch.no_grad():
        scores = rm(input_ids=_probe()).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()
    actor = _out(launched, f"{family}/grpo")
    cls = _model_class(launched["models"][family])
    model = cls.from_pretrained(str(actor)).eval()
    assert type(model).__name__ == json.loads(open(os.path.join(launched["models"][family], "config.json")).read())[
        "architectures"][0]
    assert metrics(str(actor))[0]["response_length"] > 0


@pytest.mark.parametrize("family", PPO_FAMILIES)
def test_ppo_critic_is_our_value_head(launched, family):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = _out(launched, f"{family}/ppo")
    critic = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-1" / "critic"), tag="state")
    assert critic["score.weight"].shape == (1, 32)  # one value per token from the hidden state
    assert any(k.startswith("model.layers.") for k in critic) and "lm_head.weight" not in critic
    rec = metrics(str(out))[0]
    assert math.isfinite(rec["value_loss"]) and rec["value_loss"] > 0


def test_remote_moe_with_separate_experts_is_a_zero3_leaf(launched):
    """Without the leaf registration this run dies in its first forward (gloo: "Received data size
    doesn't match expected size. Is there a distributed collective mismatch"; checked by hand)."""
    assert "ZeRO-3: MoE blocks TinyMoeBlock are leaf modules" in launched["stdout"]
    assert math.isfinite(metrics(str(_out(launched, "remote_moe/sft")))[0]["loss"])


# --- tools/zero_to_hf.py and tools/merge_lora.py on the runs' checkpoints ------------------------------

CONVERT_FAMILIES = ("qwen3_moe", "deepseek_v3", "qwen3_5", "gemma3")


def _tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run_tool(capsys, name: str, *argv) -> str:
    rc = _tool(name)([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out.out[-3000:] + out.err[-3000:]
    assert "-> OK" in out.out, out.out[-3000:]  # --verify passed (it raises on a failure too)
    return out.out


@pytest.mark.parametrize("family", CONVERT_FAMILIES)
def test_zero_to_hf_and_merge_lora_write_the_hub_layout(launched, family, tmp_path, capsys):
    """zero_to_hf full, adapter and --merge_lora, and merge_lora.py on the adapter + base, each with
    --verify (the export reloaded by transformers / peft against DeepSpeed's own reader or peft's
    unmerged adapter), on the 2-rank ZeRO-3 checkpoints. Full and merged exports hold exactly the keys
    save_pretrained writes (the trainer's export and the base model folder: per-expert MoE weights,
    Gemma3's language_model.model.*); the full export is the trainer's export tensor for tensor, and
    both merges agree."""
    from safetensors import safe_open

    sft, lora, base = _out(launched, f"{family}/sft"), _out(launched, f"{family}/lora"), launched["models"][family]
    _run_tool(capsys, "zero_to_hf", "--checkpoint_dir", sft, "--output_dir", tmp_path / "full", "--verify")
    _run_tool(capsys, "zero_to_hf", "--checkpoint_dir", lora, "--output_dir", tmp_path / "adapter", "--verify")
    _run_tool(capsys, "zero_to_hf", "--checkpoint_dir", lora, "--output_dir", tmp_path / "merged", "--merge_lora",
              "--verify")
    _run_tool(capsys, "merge_lora", "--base_model", base, "--adapter", tmp_path / "adapter", "--output_dir",
              tmp_path / "merge_tool", "--verify")

    hub = set(_safetensors(base))  # save_pretrained of the family's model
    trainer, full = _safetensors(sft), _safetensors(tmp_path / "full")
    merged, merge_tool = _safetensors(tmp_path / "merged"), _safetensors(tmp_path / "merge_tool")
    assert set(trainer) == set(full) == set(merged) == set(merge_tool) == hub
    if family in ("qwen3_moe", "deepseek_v3"):
        assert any(".mlp.experts.0.gate_proj.weight" in k for k in hub) and not any(k.endswith("gate_up_proj")
                                                                                    for k in hub)
    if family == "gemma3":
        assert all(k.startswith(("language_model.model.", "vision_tower.", "multi_modal_projector.")) for k in hub)
    assert all(torch.equal(full[k], trainer[k]) for k in hub)
    for k in hub:
        torch.testing.assert_close(merge_tool[k], merged[k], atol=1e-6, rtol=0)
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as a, \
            safe_open(str(lora / "adapter_model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())  # the trainer's own adapter naming
    base_t = _safetensors(base)
    changed = {k for k in hub if not torch.equal(merged[k], base_t[k])}  # where the LoRA was merged
    assert changed and not any("norm" in k for k in changed)
    if family in ("qwen3_moe", "deepseek_v3"):
        assert any(".experts.0." in k for k in changed) and any(".experts.3." in k for k in changed)
    if family == "deepseek_v3":  # shared experts and the dense first layer keep their own LoRA
        assert any(".shared_experts." in k for k in changed) and any(".layers.0.mlp." in k for k in changed)
    if family in COMPOSITES:
        assert all("language_model." in k for k in changed)


@pytest.mark.parametrize("family", PPO_FAMILIES)
def test_zero_to_hf_value_head(launched, family, tmp_path, capsys):
    """The PPO critic of a model type transformers has no token classifier for exports with
    --model_kind value as our value head (medgpt_ds.model.value_model_class) and verifies."""
    from medgpt_ds.convert.plans import load_config
    from medgpt_ds.model import value_model_class

    critic = _out(launched, f"{family}/ppo") / "checkpoint-1" / "critic" / "state"
    _run_tool(capsys, "zero_to_hf", "--checkpoint_dir", critic, "--base_model", launched["models"][family],
              "--model_kind", "value", "--output_dir", tmp_path / "critic", "--verify")
    config = load_config(str(tmp_path / "critic"))
    model = value_model_class(config).from_pretrained(str(tmp_path / "critic"), config=config).eval()
    with torch.no_grad():
        values = model(input_ids=_probe()).logits
    assert values.shape == (2, 12, 1) and torch.isfinite(values).all()


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_chat_serve_evaluate_load_the_moe_adapter(launched, family):
    """inference.load_causal_lm (chat, serve, evaluate with --adapter_name_or_path) merges the run's
    MoE LoRA adapter to the logits of the adapter itself (stock PeftModel.from_pretrained refuses
    DeepSeek's: peft moves its shared-expert / dense-MLP LoRA onto the experts, a size mismatch)."""
    from transformers import AutoModelForCausalLM

    from medgpt_ds.inference import load_causal_lm
    from medgpt_ds.model import load_adapter

    out, base = _out(launched, f"{family}/lora"), launched["models"][family]
    merged = load_causal_lm(base, adapter=str(out), dtype="float32", device="cpu")
    reference = load_adapter(AutoModelForCausalLM.from_pretrained(base), str(out)).eval()
    ids = _probe()
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits, reference(input_ids=ids).logits
        before = AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - before).abs().max() > 1e-4
