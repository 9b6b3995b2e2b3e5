"""Smoke: pt and sft end to end on one rank (plain `python launch/train.py`), and bad input that
must stop before training with one clear message."""
import json
import math
import os
import re

import pytest
import torch

from tests.launch_utils import ROOT, SHARED_DATA, losses, metrics, train

DEMO = os.path.join(ROOT, "data", "demo")


@pytest.mark.smoke
def test_pt_from_scratch_one_rank(tmp_path, demo_tokenizer_dir):
    out = tmp_path / "pt"
    train(["--stage", "pt", "--model_config", "tiny", "--tokenizer_name_or_path", demo_tokenizer_dir,
           "--train_file_dir", f"{DEMO}/pretrain", "--block_size", "128", "--per_device_train_batch_size", "4",
           "--learning_rate", "3e-3", "--max_steps", "8", "--logging_steps", "1", "--save_steps", "4",
           "--save_total_limit", "1", "--validation_split_percentage", "2", "--eval_steps", "4",
           "--output_dir", str(out)])
    curve = losses(str(out))
    assert sorted(curve) == list(range(1, 9))
    assert all(math.isfinite(v) for v in curve.values())
    assert curve[8] < curve[1] - 0.5, curve  # from ~ln(600) a few steps of lr 3e-3 must cut the loss
    ev = metrics(str(out), "eval")
    assert [r["step"] for r in ev] == [4, 8]
    assert ev[-1]["perplexity"] == pytest.approx(math.exp(ev[-1]["loss"]), rel=1e-6)
    # rotation kept only the newest checkpoint, and latest points at it
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-8"]
    assert (out / "latest").read_text() == "checkpoint-8"
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["consumed_items"] == 32
    # the manifest and the resolved DeepSpeed config are next to the run
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 and "auto" not in json.dumps(ds)
    assert json.loads((out / "run_config.json").read_text())["train"]["learning_rate"] == 3e-3
    # HF export loads with transformers and generates
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Influenza is", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] >= ids.shape[1] + 1
    assert (out / "logs").is_dir() and any(f.startswith("events.out.tfevents") for f in os.listdir(out / "logs"))


@pytest.mark.smoke
def test_sft_lora_one_rank_trains_adapter(tmp_path, tiny_base_dir):
    out = tmp_path / "sft"
    train(["--stage", "sft", "--model_name_or_path", tiny_base_dir, "--template_name", "chatml",
           "--train_file_dir", f"{DEMO}/sft", "--model_max_length", "128", "--per_device_train_batch_size", "2",
           "--gradient_accumulation_steps", "2", "--learning_rate", "5e-3", "--max_steps", "6", "--logging_steps", "1",
           "--use_peft", "--target_modules", "all", "--lora_rank", "4", "--output_dir", str(out)])
    curve = losses(str(out))
    assert sorted(curve) == list(range(1, 7)) and all(math.isfinite(v) for v in curve.values())
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.numel() > 0 for v in adapter.values())
    assert max(v.abs().max().item() for v in lora_b) > 0  # B starts at zero: nonzero means it trained
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template  # the training template travels with it
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What causes asthma?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(out))(ids).logits
    assert not torch.allclose(before, tuned)


@pytest.mark.smoke
def test_sft_real_medicalgpt_sample(tmp_path, tiny_base_dir):
    path = os.path.join(SHARED_DATA, "sft", "medical_sft_1K_format.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"real MedicalGPT sample not present at {path}")
    out = tmp_path / "sft_real"
    p = train(["--stage", "sft", "--model_name_or_path", tiny_base_dir, "--template_name", "qwen",
               "--train_file_dir", path, "--model_max_length", "256", "--max_train_samples", "200",
               "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--max_steps", "4", "--logging_steps", "1",
               "--output_dir", str(out)])
    # the counts in the log match an independent count: the records longer than 256 tokens (rendered
    # with the template by transformers, tokenized without the trainer) are truncated or dropped
    m = re.search(r"sft train: (\d+) kept, (\d+) truncated to 256 tokens, (\d+) dropped \(.*\) of (\d+)", p.stdout)
    assert m, p.stdout[-3000:]
    kept, truncated, dropped, records = map(int, m.groups())
    from transformers import AutoTokenizer

    from medgpt_ds.data.formats import load_records
    from medgpt_ds.data.templates import TEMPLATES

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    recs = load_records([path], "sft", max_samples=200, log=lambda *a: None)
    lengths = [len(tok(tok.apply_chat_template(r["messages"], chat_template=TEMPLATES["qwen"], tokenize=False),
                       add_special_tokens=False)["input_ids"]) for r in recs]
    long = sum(n > 256 for n in lengths)
    assert records == len(recs) == 200 and kept + dropped == 200
    assert 0 < long < 200 and truncated + dropped == long, (long, m.group(0))
    curve = losses(str(out))
    assert sorted(curve) == [1, 2, 3, 4] and all(math.isfinite(v) for v in curve.values())


@pytest.mark.smoke
def test_pt_real_medicalgpt_pretrain(tmp_path, demo_tokenizer_dir):
    path = os.path.join(SHARED_DATA, "pretrain")
    if not os.path.isdir(path):
        pytest.skip(f"real MedicalGPT sample not present at {path}")
    out = tmp_path / "pt_real"
    p = train(["--stage", "pt", "--model_config", "tiny", "--tokenizer_name_or_path", demo_tokenizer_dir,
               "--train_file_dir", path, "--block_size", "256", "--max_train_samples", "300",
               "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--max_steps", "3", "--logging_steps", "1",
               "--output_dir", str(out)])
    assert "long documents split" in p.stdout
    assert len(losses(str(out))) == 3


# --- bad input: one clear message naming file / line / flag, nothing left as the latest checkpoint


def _fail(tmp_path, args, nproc=1):
    out = tmp_path / "out"  # reused on purpose: a failed run's manifest must not block the next run
    p = train(["--output_dir", str(out), *args], nproc=nproc, check=False, timeout=300)
    assert p.returncode != 0
    assert not (out / "latest").exists()
    return p.stderr + p.stdout


@pytest.fixture
def sft_args(tiny_base_dir):
    return ["--stage", "sft", "--model_name_or_path", tiny_base_dir, "--template_name", "chatml",
            "--max_steps", "2"]


@pytest.mark.smoke
def test_bad_inputs_fail_clearly(tmp_path, sft_args):
    d = tmp_path / "data"
    d.mkdir()
    good = json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    (d / "a.jsonl").write_text(good + "\n" + good + "\n" + '{"conversations": [oops\n')
    err = _fail(tmp_path, sft_args + ["--train_file_dir", str(d)])
    assert "a.jsonl:3" in err and "Traceback" not in err

    (d / "a.jsonl").write_text(good + "\n" + json.dumps({"conversation": []}) + "\n")
    err = _fail(tmp_path, sft_args + ["--train_file_dir", str(d)])
    assert "a.jsonl:2" in err and "conversations" in err

    (d / "a.jsonl").write_text("\n\n")
    err = _fail(tmp_path, sft_args + ["--train_file_dir", str(d)])
    assert "a.jsonl" in err and "Traceback" not in err

    (d / "a.jsonl").write_text(good + "\n")
    bad_ds = tmp_path / "ds.json"
    bad_ds.write_text('{"zero_optimization": {"stage": 2,}}')
    err = _fail(tmp_path, sft_args + ["--train_file_dir", str(d), "--deepspeed", str(bad_ds)])
    assert "ds.json: not valid JSON at line 1" in err

    bad_ds.write_text(json.dumps({"train_batch_size": 3, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
                                  "zero_optimization": {"stage": 0}}))
    err = _fail(tmp_path, sft_args + ["--train_file_dir", str(d), "--deepspeed", str(bad_ds),
                                      "--per_device_train_batch_size", "2"])
    assert "train_batch_size=3 is not divisible by micro batch 2 x world size 1" in err

    err = _fail(tmp_path, ["--stage", "sft", "--model_name_or_path", str(tmp_path / "no_model"),
                           "--train_file_dir", str(d)])
    assert "--model_name_or_path" in err and "no such directory" in err


@pytest.mark.smoke
def test_nonempty_output_dir_needs_a_decision(tmp_path, sft_args):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "something").write_text("x")
    err = _fail(tmp_path, sft_args + ["--train_file_dir", f"{DEMO}/sft"])
    assert "--overwrite_output_dir" in err and "--resume_from_checkpoint auto" in err


@pytest.mark.smoke
def test_extended_tokenizer_resizes_embeddings(tmp_path, tiny_base_dir):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    old = len(tok)
    tok.add_tokens(["hypertension", "endocrinologist", "haematologist"])
    tok.save_pretrained(tmp_path / "tok")
    out = tmp_path / "pt"
    p = train(["--stage", "pt", "--model_name_or_path", tiny_base_dir, "--tokenizer_name_or_path", str(tmp_path / "tok"),
               "--train_file_dir", f"{DEMO}/pretrain", "--max_train_samples", "64", "--block_size", "128",
               "--per_device_train_batch_size", "2", "--max_steps", "2", "--output_dir", str(out)])
    assert f"resized embeddings {old} -> {old + 3}" in p.stdout
    assert "3 new rows initialised from their base-tokenizer pieces" in p.stdout
    assert AutoConfig.from_pretrained(out).vocab_size == old + 3
