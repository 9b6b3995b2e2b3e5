"""Config parsing, "auto" resolution and batch arithmetic (unit)."""
import glob
import json
import os
from types import SimpleNamespace

import pytest

from medgpt_ds.config import parse_args
from medgpt_ds.engine import DSConfigError, load_ds_config, resolve_ds_config
from medgpt_ds.errors import UserError

pytestmark = pytest.mark.unit
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_args(tmp_path, *extra):
    return ["--stage", "sft", "--model_name_or_path", str(tmp_path), "--tokenizer_name_or_path", str(tmp_path),
            "--output_dir", str(tmp_path / "out"), *extra]


def test_medicalgpt_flags_parse(tmp_path):
    cfg = parse_args(base_args(
        tmp_path, "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "5", "--learning_rate", "1e-4",
        "--bf16", "--use_peft", "True", "--target_modules", "all", "--lora_rank", "16", "--template_name", "vicuna",
        "--train_on_inputs", "--max_train_samples", "10", "--neft_alpha", "5", "--packing", "False"))
    assert cfg.train.per_device_train_batch_size == 3 and cfg.train.gradient_accumulation_steps == 5
    assert cfg.train.learning_rate == 1e-4 and cfg.train.bf16 is True
    assert cfg.lora.use_peft and cfg.lora.lora_rank == 16 and cfg.lora.target_modules == "all"
    assert cfg.data.template_name == "vicuna" and cfg.data.train_on_inputs and cfg.data.packing is False
    assert cfg.data.max_train_samples == 10 and cfg.train.neft_alpha == 5.0


def test_yaml_recipe_with_cli_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stage: pt\nmodel_config: tiny\ntokenizer_name_or_path: {tmp_path}\noutput_dir: {tmp_path}/o\n"
                      "learning_rate: 0.001\nblock_size: 128\n")
    cfg = parse_args([str(recipe), "--learning_rate", "0.5"])
    assert cfg.train.stage == "pt" and cfg.data.block_size == 128
    assert cfg.train.learning_rate == 0.5  # the CLI wins over the recipe
    cfg2 = parse_args(["--config", str(recipe)])
    assert cfg2.train.learning_rate == 0.001


def test_unknown_flag_is_an_error_naming_it(tmp_path):
    with pytest.raises(UserError, match=r"unknown flag --learning_rat \(did you mean --learning_rate\?\)"):
        parse_args(base_args(tmp_path, "--learning_rat", "1"))


def test_ignored_medicalgpt_flag_warns(tmp_path, capsys):
    cfg = parse_args(base_args(tmp_path, "--device_map", "auto", "--do_train", "--ddp_find_unused_parameters", "False"))
    err = capsys.readouterr().err
    assert "--device_map is accepted but ignored" in err and "--do_train is accepted but ignored" in err
    assert cfg.train.stage == "sft"


def test_bad_values_are_errors(tmp_path):
    with pytest.raises(UserError, match="--stage must be one of"):
        parse_args(base_args(tmp_path, "--stage", "xyz"))
    with pytest.raises(UserError, match="exclusive"):
        parse_args(base_args(tmp_path, "--bf16", "--fp16"))
    with pytest.raises(UserError, match="no such directory"):
        parse_args(["--stage", "sft", "--model_name_or_path", "/nonexistent/model", "--output_dir", str(tmp_path)])
    with pytest.raises(UserError, match="--deepspeed .*no such file"):
        parse_args(base_args(tmp_path, "--deepspeed", "/nope.json"))
    with pytest.raises(UserError, match="add --use_peft"):
        parse_args(base_args(tmp_path, "--qlora", "True"))


def targs(**kw):
    d = dict(per_device_train_batch_size=2, gradient_accumulation_steps=3, max_grad_norm=1.0, bf16=False, fp16=False,
             learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.1,
             warmup_steps=0, warmup_ratio=0.1)
    d.update(kw)
    return SimpleNamespace(**d)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json"))))
def test_every_ds_config_loads_and_resolves(path):
    raw = load_ds_config(path)
    cfg = resolve_ds_config(raw, targs(bf16=True), world_size=4, hidden_size=64, num_training_steps=100)
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 2 * 3 * 4
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["optimizer"]["params"]["lr"] == 1e-3 and cfg["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert cfg["gradient_clipping"] == 1.0
    assert "auto" not in json.dumps(cfg)


def test_default_config_has_no_auto_left():
    cfg = resolve_ds_config(load_ds_config(None), targs(), world_size=1)
    assert cfg["zero_optimization"]["stage"] == 0 and "auto" not in json.dumps(cfg)


def test_batch_arithmetic_checked():
    raw = load_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json"))
    raw["train_batch_size"] = 24
    assert resolve_ds_config(raw, targs(), world_size=4)["train_batch_size"] == 24
    with pytest.raises(DSConfigError, match=r"use --gradient_accumulation_steps 6"):
        resolve_ds_config(raw, targs(), world_size=2)
    with pytest.raises(DSConfigError, match="not divisible"):
        resolve_ds_config(raw, targs(), world_size=5)
    raw = load_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json"))
    raw["train_micro_batch_size_per_gpu"] = 8
    with pytest.raises(DSConfigError, match="disagrees"):
        resolve_ds_config(raw, targs(), world_size=1)


def test_explicit_precision_conflict_and_unresolvable_auto():
    raw = load_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json"))
    raw["bf16"] = {"enabled": True}
    with pytest.raises(DSConfigError, match="bf16.enabled=True but --bf16 is False"):
        resolve_ds_config(raw, targs(), world_size=1)
    raw = load_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json"))
    raw["zero_optimization"]["mystery_knob"] = "auto"
    with pytest.raises(DSConfigError, match="zero_optimization.mystery_knob"):
        resolve_ds_config(raw, targs(), world_size=1)


def test_scheduler_block_auto_resolved():
    raw = load_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json"))
    raw["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                            "warmup_num_steps": "auto", "total_num_steps": "auto"}}
    cfg = resolve_ds_config(raw, targs(), world_size=1, num_training_steps=50)
    assert cfg["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 5,
                                          "total_num_steps": 50}


def test_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "zero_optimization": {"stage": 2,}\n}')
    with pytest.raises(DSConfigError, match=r"bad.json: not valid JSON at line 2"):
        load_ds_config(str(p))
