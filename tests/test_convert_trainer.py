"""zero_to_hf on checkpoints written by the real trainer (launch/train.py): the export equals the
trainer's own final Hugging Face export, tensor for tensor."""
from __future__ import annotations

import os

import pytest
import torch

from medgpt_ds.convert import export_checkpoint, read_hf_meta
from tests.launch_utils import ROOT, ds_config_copy, train

DEMO = os.path.join(ROOT, "data", "demo")
QUIET = {"log": lambda m: None}


def _tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


@pytest.mark.distributed
def test_sft_lora_zero3_two_ranks(tmp_path, tiny_base_dir):
    out = tmp_path / "sft"
    ds = ds_config_copy(tmp_path, "zero3", stage3_param_persistence_threshold=0)
    train(["--stage", "sft", "--model_name_or_path", tiny_base_dir, "--template_name", "chatml",
           "--train_file_dir", f"{DEMO}/sft", "--model_max_length", "128", "--per_device_train_batch_size", "2",
           "--learning_rate", "5e-3", "--max_steps", "3", "--save_steps", "3", "--logging_steps", "1",
           "--use_peft", "--target_modules", "all", "--lora_rank", "4", "--deepspeed", ds,
           "--output_dir", str(out)], nproc=2)
    meta = read_hf_meta(str(out / "checkpoint-3"))
    assert meta["use_peft"] and meta["model_kind"] == "causal_lm" and meta["base_model"] == tiny_base_dir

    adapter = tmp_path / "adapter"
    res = export_checkpoint(str(out), str(adapter), dtype="fp32", verify=True, **QUIET)
    assert res.kind == "adapter" and res.verify["ok"]
    mine, theirs = _tensors(adapter), _tensors(out)  # the trainer's final export sits in output_dir
    assert set(mine) == set(theirs) and len(mine) > 0
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k].float(), rtol=0, atol=0, msg=k)

    merged = tmp_path / "merged"
    res = export_checkpoint(str(out / "checkpoint-3"), str(merged), merge_lora=True, dtype="fp32", verify=True,
                            **QUIET)
    assert res.kind == "merged" and res.verify["ok"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.chat_template == AutoTokenizer.from_pretrained(out).chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What causes asthma?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


@pytest.mark.smoke
def test_pt_from_scratch_one_rank(tmp_path, demo_tokenizer_dir):
    out = tmp_path / "pt"
    train(["--stage", "pt", "--model_config", "tiny", "--tokenizer_name_or_path", demo_tokenizer_dir,
           "--train_file_dir", f"{DEMO}/pretrain", "--block_size", "64", "--per_device_train_batch_size", "2",
           "--learning_rate", "3e-3", "--max_steps", "2", "--save_steps", "2", "--output_dir", str(out)])
    hf = tmp_path / "hf"
    res = export_checkpoint(str(out), str(hf), verify=True, **QUIET)
    assert res.kind == "full" and res.verify["ok"]
    mine, theirs = _tensors(hf), _tensors(out)
    assert set(mine) == set(theirs)
    for k in mine:
        assert mine[k].dtype == theirs[k].dtype, k
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=0, msg=k)
