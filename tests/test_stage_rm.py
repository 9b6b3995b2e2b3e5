"""Reward modeling: the loss on a built batch against hand-derived numbers, a 2-rank ZeRO-3 LoRA run
whose exported adapter (with the score head) reloads onto the base and scores exactly as trained,
a learning test, and MedicalGPT's real preference sample."""
import json
import math
import os

import pytest
import torch

from medgpt_ds.data.pairs import PairCollator, encode_pair
from medgpt_ds.data.templates import TEMPLATES
from medgpt_ds.stages.rm import pairwise_loss_sum, rewards
from tests.launch_utils import SHARED_DATA, ds_config_copy, losses, metrics, train
from tests.helpers import RECS, pair_data_args, split_demo_pairs, write_synthetic_pairs

CHATML = TEMPLATES["chatml"]


@pytest.mark.unit
def test_rm_loss_on_built_batch_equals_hand_derived(tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tiny_tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(config).double().eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # rewards of order 1, so the sigmoid is not saturated or flat
    items = [encode_pair(tiny_tokenizer, CHATML, r, pair_data_args()) for r in RECS]
    batch = PairCollator(tiny_tokenizer.pad_token_id)(items)
    with torch.no_grad():
        chosen, rejected = rewards(model, batch)
        # by hand: each sequence alone, reward = score weight . hidden state of its LAST token
        hand = []
        for x in items:
            for ans in (x["chosen_ids"], x["rejected_ids"]):
                h = model.model(input_ids=torch.tensor([x["prompt_ids"] + ans])).last_hidden_state[0, -1]
                hand.append(float(h @ model.score.weight[0]))
    n = len(items)
    hc, hr = hand[0::2], hand[1::2]
    assert chosen.tolist() == pytest.approx(hc, abs=1e-9) and rejected.tolist() == pytest.approx(hr, abs=1e-9)
    for m in (0.0, 0.5):
        with torch.no_grad():
            loss_sum, mets = pairwise_loss_sum(model, batch, margin=m)
        want = sum(math.log1p(math.exp(-(c - r - m))) for c, r in zip(hc, hr))  # sum of -log sigmoid(r_c - r_r - m)
        assert loss_sum.item() == pytest.approx(want, rel=1e-9)
        assert mets["accuracy"].item() == pytest.approx(sum(c > r for c, r in zip(hc, hr)))
        assert mets["margin"].item() == pytest.approx(sum(c - r for c, r in zip(hc, hr)), rel=1e-6)
    with torch.no_grad():
        loss_sum, _ = pairwise_loss_sum(model, batch, center_rewards_coefficient=0.01)
    want = sum(math.log1p(math.exp(-(c - r))) + 0.01 * (c + r) ** 2 for c, r in zip(hc, hr))
    assert loss_sum.item() == pytest.approx(want, rel=1e-9) and n == 3


def _common(model_dir, train_file, eval_file, out, *extra):
    return ["--stage", "rm", "--model_name_or_path", model_dir, "--template_name", "chatml", "--train_file_dir", train_file,
            "--validation_file_dir", eval_file, "--max_source_length", "64", "--max_target_length", "64",
            "--output_dir", str(out), "--report_to", "none", *extra]


@pytest.mark.distributed
def test_rm_lora_zero3_two_ranks_exports_scoring_reward_model(tmp_path, tiny_base_dir):
    train_file, eval_file = split_demo_pairs(tmp_path / "data")
    out = tmp_path / "rm"
    ds = ds_config_copy(tmp_path, "zero3", stage3_param_persistence_threshold=0)
    train(_common(tiny_base_dir, train_file, eval_file, out, "--deepspeed", ds, "--use_peft", "--lora_rank", "4",
                  "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--max_steps", "4", "--logging_steps", "1",
                  "--eval_steps", "4", "--margin", "0.1"), nproc=2)
    curve = losses(str(out))
    assert sorted(curve) == [1, 2, 3, 4] and all(math.isfinite(v) for v in curve.values())
    ev = metrics(str(out), "eval")[-1]
    assert ev["units"] == 8 and 0.0 <= ev["accuracy"] <= 1.0
    meta = json.loads((out / "checkpoint-4" / "hf_meta" / "medgpt_meta.json").read_text())
    assert meta["model_kind"] == "reward" and meta["use_peft"] and "score" in meta["modules_to_save"]
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] == "SEQ_CLS" and "score" in adapter_cfg["modules_to_save"]

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    weights = load_file(str(out / "adapter_model.safetensors"))
    score = [v for k, v in weights.items() if "score" in k]
    assert score and score[0].shape[0] == 1 and all(v.numel() > 0 for v in weights.values())  # gathered, not (0,)
    # the adapter reloads onto the base, with the trained score head, and scores text as in training
    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_base_dir, num_labels=1)
    init_score = base.score.weight.detach().clone()
    model = PeftModel.from_pretrained(base, str(out)).eval()
    assert not torch.allclose(model.base_model.model.score.modules_to_save["default"].weight, init_score)
    from medgpt_ds.data.formats import load_records

    items = [encode_pair(tok, tok.chat_template, r, pair_data_args()) for r in load_records([eval_file], "preference")]
    batch = PairCollator(tok.pad_token_id)(items)
    with torch.no_grad():
        chosen, rejected = rewards(model, batch)
    assert (chosen - rejected).mean().item() == pytest.approx(ev["margin"], abs=1e-5)
    assert (chosen > rejected).float().mean().item() == pytest.approx(ev["accuracy"])
    enc = tok.apply_chat_template([{"role": "user", "content": "How is asthma treated?"},
                                   {"role": "assistant", "content": "With inhalers."}], tokenize=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        assert model(**enc).logits.shape == (1, 1)  # one scalar reward per text


@pytest.mark.smoke
def test_rm_learns_a_rule_on_held_out_pairs(tmp_path, tiny_base_dir):
    train_file, eval_file = write_synthetic_pairs(tmp_path)
    out = tmp_path / "rm_learn"
    train(_common(tiny_base_dir, train_file, eval_file, out, "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
                  "--max_steps", "24", "--logging_steps", "4", "--eval_steps", "24"))
    ev = metrics(str(out), "eval")[-1]
    assert ev["units"] == 64
    assert ev["accuracy"] >= 0.9, ev  # chance is 0.5
    assert ev["loss"] < math.log(2) - 0.3, ev


@pytest.mark.smoke
def test_rm_real_medicalgpt_pairs(tmp_path, tiny_base_dir):
    path = os.path.join(SHARED_DATA, "reward", "dpo_zh_500.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"real MedicalGPT sample not present at {path}")
    out = tmp_path / "rm_real"
    p = train(["--stage", "rm", "--model_name_or_path", tiny_base_dir, "--template_name", "qwen", "--train_file_dir", path,
               "--max_train_samples", "48", "--max_source_length", "96", "--max_target_length", "96",
               "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--max_steps", "3", "--logging_steps", "1",
               "--output_dir", str(out), "--report_to", "none"])
    assert "rm train: 48 of 48 pairs kept" in p.stdout and "truncated" in p.stdout
    assert sorted(losses(str(out))) == [1, 2, 3] and all(math.isfinite(v) for v in losses(str(out)).values())
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()  # the full reward model loads by itself
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    enc = tok(["感冒了怎么办？多休息。", "感冒了怎么办？不知道"], padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = model(**enc).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()
