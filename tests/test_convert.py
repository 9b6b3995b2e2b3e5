"""ZeRO checkpoint -> Hugging Face export, for every case, against the engine's own logits.

One 2-rank launch (tests/convert_ckpt_helper.py) trains tiny Llama models under ZeRO-0/1/2/3 (full,
LoRA, reward model, reward + LoRA, tied and untied embeddings) and saves checkpoints the way the
trainer does, with the engine's logits on fixed inputs; every export must reproduce them. A second,
1-rank launch resumes two of them from universal checkpoints at another ZeRO stage.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medgpt_ds.convert import (
    META_DIR,
    CheckpointError,
    ZeroCheckpoint,
    canonical_dtype,
    export_checkpoint,
    read_hf_meta,
    resolve_tag_dir,
    to_universal,
    verify_export,
    write_hf_meta,
)

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "convert_ckpt_helper.py"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CASES = ["z0_full", "z1_full_tied", "z2_full", "z3_full_tied", "z2_lora", "z3_lora_tied", "z2_reward",
         "z3_reward_lora", "z2_lora_resized"]
BF16_CASES = ["z3_lora_bf16"]  # trained in bf16: checked against the engine in bf16
QUIET = {"log": lambda msg: None}


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launch(nproc: int, *args: str, timeout: int = 600) -> None:
    deepspeed = Path(sys.executable).with_name("deepspeed")
    from tests.launch_utils import free_port

    cmd = [str(deepspeed), "--num_gpus", str(nproc), "--master_port", str(free_port()), str(HELPER), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    from medgpt_ds.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tok")
    texts = [f"patient {i} has fever and cough; take medicine {i % 7} twice a day" for i in range(200)]
    train_bpe_tokenizer(texts=texts, vocab_size=300, output_dir=str(out), chat_template=CHATML)
    return str(out)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory, tokenizer_dir) -> Path:
    """DIR/<case>/{checkpoint-3, latest, expected.pt, base/ (LoRA)} from one 2-rank launch."""
    out = tmp_path_factory.mktemp("ds_ckpts")
    reuse = os.environ.get("MEDGPT_TEST_CKPTS")  # developer shortcut: a folder an earlier run made
    if reuse and (Path(reuse) / "saved.json").is_file():
        shutil.copytree(reuse, out, dirs_exist_ok=True)
    else:
        _launch(2, "--out", str(out), "--tokenizer", tokenizer_dir)
    assert sorted(json.loads((out / "saved.json").read_text())) == sorted(CASES + BF16_CASES)
    return out


def _load_export(case_dir: Path, out: Path, kind: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if "reward" in case_dir.name else AutoModelForCausalLM
    if kind == "adapter":
        base = cls.from_pretrained(case_dir / "base")
        rows = _adapter_embedding_rows(out)
        if rows:  # an extended vocabulary travels in the adapter: grow the base first
            base.resize_token_embeddings(rows)
        model = PeftModel.from_pretrained(base, out)
    else:
        model = cls.from_pretrained(out, dtype=torch.float32)
    return model.eval()


def _adapter_embedding_rows(out: Path) -> int | None:
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        rows = [f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("embed_tokens.weight")]
    return rows[0] if rows else None


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---------------------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_export_reproduces_engine_logits(ckpts, case, tmp_path):
    case_dir = ckpts / case
    expected = torch.load(case_dir / "expected.pt")
    modes = [False, True] if "lora" in case else [False]
    for merge in modes:
        out = tmp_path / f"hf{'-merged' if merge else ''}"
        # Point at the run dir: the tag comes from `latest`. Tiny shards exercise the index.
        res = export_checkpoint(str(case_dir), str(out), merge_lora=merge, max_shard_size="40KB", **QUIET)
        assert res.kind == ("merged" if merge else "adapter" if "lora" in case else "full")
        got = _logits(_load_export(case_dir, out, res.kind), expected["probe"])
        torch.testing.assert_close(got, expected["logits"], rtol=0, atol=1e-5)

        meta = json.loads((out / "medgpt_meta.json").read_text())
        assert meta["export"]["zero_stage"] == expected["stage"] and meta["export"]["world_size"] == 2
        if res.kind == "adapter":
            assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
            assert (_adapter_embedding_rows(out) is not None) is ("resized" in case)
            base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
            assert base.endswith(f"{case}/base")
        else:
            index = json.loads((out / "model.safetensors.index.json").read_text())
            assert len(set(index["weight_map"].values())) == len(res.files) > 1
            assert all((out / f).is_file() for f in res.files)
            config = json.loads((out / "config.json").read_text())
            tied = "tied" in case
            assert config.get("tie_word_embeddings", False) is tied
            assert ("lm_head.weight" in index["weight_map"]) is (not tied and "reward" not in case)
            assert (out / "generation_config.json").is_file() is ("reward" not in case)
            if "reward" not in case:  # generate() stops at the template's end of turn as well as eos
                from transformers import AutoTokenizer, GenerationConfig

                im_end = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|im_end|>")
                assert im_end in GenerationConfig.from_pretrained(out).eos_token_id
            if "reward" in case:
                assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
                assert "score.weight" in index["weight_map"]


@pytest.mark.distributed
def test_bf16_lora_checkpoint(ckpts, tmp_path):
    """bf16 ZeRO-3 LoRA run: fp32 master LoRA weights, bf16 frozen base fragments; exported in bf16
    (the training dtype, by default) and matching the bf16 engine's logits to bf16 precision."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    case_dir = ckpts / "z3_lora_bf16"
    expected = torch.load(case_dir / "expected.pt")
    for merge in (False, True):
        out = tmp_path / f"hf{merge}"
        res = export_checkpoint(str(case_dir), str(out), merge_lora=merge, verify=True, **QUIET)
        assert res.dtype == "bfloat16" and res.verify["ok"]
        fname = out / ("model.safetensors" if merge else "adapter_model.safetensors")
        with safe_open(str(fname), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        if merge:
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
        else:
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(case_dir / "base", dtype=torch.bfloat16)
            model = PeftModel.from_pretrained(base, out).eval()
        got = _logits(model, expected["probe"])
        assert (got - expected["logits"]).abs().max() < 0.01 * max(1.0, expected["logits"].abs().max().item())


@pytest.mark.distributed
def test_export_carries_tokenizer_chat_template_and_dtype(ckpts, tmp_path, tokenizer_dir):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    res = export_checkpoint(str(ckpts / "z3_full_tied" / "checkpoint-3"), str(out), dtype="bf16", **QUIET)
    assert res.files == ["model.safetensors"] and res.dtype == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHATML
    ref = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "<|im_start|>user\npatient 3 has fever<|im_end|>\n"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    # bf16 weights are the fp32 ones rounded: logits stay close to the engine's.
    expected = torch.load(ckpts / "z3_full_tied" / "expected.pt")
    got = _logits(_load_export(ckpts / "z3_full_tied", out, "full"), expected["probe"])
    assert (got - expected["logits"]).abs().max() < 0.05


@pytest.mark.distributed
@pytest.mark.parametrize("case,merge", [("z2_full", False), ("z3_lora_tied", True), ("z3_reward_lora", False)])
def test_verify_passes(ckpts, tmp_path, case, merge):
    res = export_checkpoint(str(ckpts / case), str(tmp_path / "hf"), merge_lora=merge, verify=True, **QUIET)
    assert res.verify["ok"] and res.verify["max_abs_diff"] < 1e-5 and res.verify["argmax_agree"] == "3/3"


@pytest.mark.distributed
def test_verify_catches_a_corrupted_export(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "hf"
    export_checkpoint(str(ckpts / "z2_full"), str(out), **QUIET)
    sd = load_file(str(out / "model.safetensors"))
    sd["model.layers.0.mlp.down_proj.weight"] += 0.5
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    report = verify_export(str(out), str(ckpts / "z2_full"), **QUIET)
    assert not report["ok"] and report["max_abs_diff"] > report["tolerance"]


@pytest.mark.distributed
def test_stream_reader_matches_deepspeed_zero_to_fp32(ckpts):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for case in CASES[1:] + BF16_CASES:  # DeepSpeed's reader does not do ZeRO-0
        ckpt = ZeroCheckpoint(str(ckpts / case))
        ref = get_fp32_state_dict_from_zero_checkpoint(str(ckpts / case))
        assert set(ref) == set(ckpt.names) | set(ckpt.aliases), case
        with ckpt.open() as files:
            for name in ref:
                assert torch.equal(ckpt.tensor(name, files).float(), ref[name].float()), (case, name)


@pytest.mark.distributed
def test_deepspeed_zero_to_fp32_script_still_works(ckpts, tmp_path):
    case_dir = ckpts / "z3_lora_tied"
    proc = subprocess.run([sys.executable, str(case_dir / "zero_to_fp32.py"), str(case_dir), str(tmp_path / "fp32")],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sd = torch.load(tmp_path / "fp32" / "pytorch_model.bin")
    assert any(".lora_A.default.weight" in k for k in sd)


@pytest.mark.distributed
def test_cli(ckpts, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import zero_to_hf
    finally:
        sys.path.pop(0)
    rc = zero_to_hf.main(["--checkpoint_dir", str(ckpts / "z2_lora" / "checkpoint-3"), "--output_dir",
                          str(tmp_path / "m"), "--merge_lora", "--dtype", "fp32", "--max_shard_size", "30KB"])
    assert rc == 0 and "wrote merged model" in capsys.readouterr().out
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    rc = zero_to_hf.main(["--checkpoint_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "x")])
    assert rc == 2 and "checkpoint dir not found" in capsys.readouterr().err


# --- bad input: one clear error each -----------------------------------------------------------

@pytest.mark.unit
def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint dir not found"):
        export_checkpoint(str(tmp_path / "missing"), str(tmp_path / "out"), **QUIET)
    (tmp_path / "run" / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="checkpoint-5: pass one of them"):
        resolve_tag_dir(str(tmp_path / "run"))


@pytest.mark.unit
def test_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        export_checkpoint(str(tmp_path), str(tmp_path / "out"), dtype="int4", **QUIET)
    assert canonical_dtype("bf16") == "bfloat16" and canonical_dtype(torch.float16) == "float16"


@pytest.mark.distributed
def test_adapter_for_a_different_base(ckpts, tmp_path):
    from transformers import LlamaConfig

    other = tmp_path / "other_base"
    LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(other)
    with pytest.raises(CheckpointError, match="different base model.*hidden_size: adapter 32 vs base 64"):
        export_checkpoint(str(ckpts / "z2_lora"), str(tmp_path / "out"), base_model=str(other), **QUIET)


@pytest.mark.distributed
def test_other_bad_inputs(ckpts, tmp_path):
    with pytest.raises(CheckpointError, match="full-model checkpoint"):
        export_checkpoint(str(ckpts / "z2_full"), str(tmp_path / "o"), merge_lora=True, **QUIET)
    tag = ckpts / "z2_full" / "checkpoint-3"
    with pytest.raises(ValueError, match="must not be inside the checkpoint"):
        export_checkpoint(str(tag), str(tag / "hf"), **QUIET)
    bare = tmp_path / "bare" / "checkpoint-3"
    shutil.copytree(tag, bare, ignore=shutil.ignore_patterns(META_DIR))
    with pytest.raises(CheckpointError, match="pass --base_model"):
        export_checkpoint(str(bare), str(tmp_path / "o"), **QUIET)
    # ... and with --base_model it works (config + tokenizer from the base).
    base = tmp_path / "base"
    shutil.copytree(tag / META_DIR, base)
    res = export_checkpoint(str(bare), str(tmp_path / "o2"), base_model=str(base), **QUIET)
    assert res.kind == "full" and (tmp_path / "o2" / "tokenizer.json").is_file()
    # A config that does not match the weights is named, with shapes.
    from transformers import LlamaConfig

    cfg = LlamaConfig.from_pretrained(base)
    cfg.intermediate_size = 48
    cfg.save_pretrained(base)
    with pytest.raises(CheckpointError, match="shape mismatch.*mlp"):
        export_checkpoint(str(bare), str(tmp_path / "o3"), base_model=str(base), **QUIET)
    # Incomplete save: one rank's optimizer file missing.
    broken = tmp_path / "broken" / "checkpoint-3"
    shutil.copytree(ckpts / "z3_full_tied" / "checkpoint-3", broken)
    (broken / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="world size 2 but 1 \\*_optim_states.pt"):
        export_checkpoint(str(broken), str(tmp_path / "o4"), **QUIET)
    (broken / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="no \\*_optim_states.pt files"):
        export_checkpoint(str(broken), str(tmp_path / "o4"), **QUIET)


# --- hf_meta ----------------------------------------------------------------------------------

@pytest.mark.unit
def test_write_hf_meta_for_a_reward_lora_model(tmp_path, tokenizer_dir):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    model = get_peft_model(LlamaForSequenceClassification(cfg),
                           LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["q_proj"]))
    out = Path(write_hf_meta(str(tmp_path), model, tok, model_kind="reward", base_model="/models/base",
                             torch_dtype="bf16"))
    meta = read_hf_meta(str(tmp_path))
    assert meta["model_kind"] == "reward" and meta["use_peft"] and meta["torch_dtype"] == "bfloat16"
    assert meta["modules_to_save"] == ["classifier", "score"] and meta["base_model"] == "/models/base"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "/models/base"
    assert not (out / "generation_config.json").exists()
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML
    with pytest.raises(ValueError, match="model_kind"):
        write_hf_meta(str(tmp_path), model, tok, model_kind="critic", base_model=None, torch_dtype="fp32")


# --- changing topology ---------------------------------------------------------------------------

@pytest.mark.distributed
def test_resume_at_another_world_size_and_zero_stage(ckpts, tokenizer_dir):
    """ZeRO-2 x 2 ranks -> ZeRO-3 x 1 rank and ZeRO-3 x 2 -> ZeRO-2 x 1 via universal checkpoints.

    The resumed engine must hold the saved weights exactly and, replaying the next step with the same
    global batch, land where the original run did: that needs the Adam moments and step count too.
    """
    for case in ("z2_full", "z3_full_tied"):
        (ckpts / case / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
        out = to_universal(str(ckpts / case), **QUIET)
        assert json.loads((Path(out) / "trainer_state.json").read_text()) == {"global_step": 3}
        assert Path(out).name == "checkpoint-3-universal"
        assert (ckpts / case / "latest_universal").read_text() == "checkpoint-3-universal"
        assert (Path(out) / META_DIR / "medgpt_meta.json").is_file()
    with pytest.raises(CheckpointError, match="universal checkpoint"):
        export_checkpoint(str(ckpts / "z2_full" / "checkpoint-3-universal"), str(ckpts / "no_export"), **QUIET)
    _launch(1, "--out", str(ckpts), "--tokenizer", tokenizer_dir, "--resume", "--cases", "z2_full,z3_full_tied")
    for case in ("z2_full", "z3_full_tied"):
        expected = torch.load(ckpts / case / "expected.pt")
        resumed = torch.load(ckpts / case / "resumed.pt")
        assert resumed["stage"] != expected["stage"] and resumed["global_step"] == 3
        torch.testing.assert_close(resumed["loaded_logits"], expected["logits"], rtol=0, atol=1e-6)
        moved = (expected["post_step_logits"] - expected["logits"]).abs().max()
        assert moved > 0.1  # the replayed step really changes the model ...
        torch.testing.assert_close(resumed["post_step_logits"], expected["post_step_logits"], rtol=0, atol=1e-5)


@pytest.mark.distributed
def test_zero0_needs_no_universal_conversion(ckpts):
    with pytest.raises(CheckpointError, match="ZeRO-0 checkpoint"):
        to_universal(str(ckpts / "z0_full"), **QUIET)
