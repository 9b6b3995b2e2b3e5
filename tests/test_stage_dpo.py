"""DPO: the precomputed-reference cache (order-independent ids, incremental, invalidated by another
reference), 2-rank ZeRO-3 runs of every reference mode (frozen engine with CPU offload, disabled
adapter, precomputed) with a kill + resume that reproduces the uninterrupted curve, a learning test,
MedicalGPT's real sample with the ipo loss, and bad input through the CLI."""
import json
import math
import os
import random
import types

import pytest
import torch

from medgpt_ds.data.pairs import PairCollator, encode_pair, pair_logps
from medgpt_ds.data.templates import TEMPLATES
from medgpt_ds.stages.dpo import CACHE_FILE, precompute_reference
from tests.launch_utils import SHARED_DATA, ds_config_copy, losses, metrics, train
from tests.helpers import RECS, pair_data_args, pair_record, split_demo_pairs, write_synthetic_pairs

CHATML = TEMPLATES["chatml"]


class _Engine(torch.nn.Module):
    """Stands in for a DeepSpeed engine (``.module``, callable); counts the rows it scores."""

    def __init__(self, model):
        super().__init__()
        self.module = model
        self.rows = 0

    def forward(self, **kw):
        self.rows += kw["input_ids"].shape[0]
        return self.module(**kw)


def _cfg(out, ref_path="base-a"):
    return types.SimpleNamespace(
        train=types.SimpleNamespace(output_dir=str(out), per_device_eval_batch_size=2, seed=1, bf16=False, fp16=False),
        model=types.SimpleNamespace(model_name_or_path=ref_path, model_config=None, torch_dtype="auto",
                                    attn_implementation="sdpa", load_in_4bit=False, load_in_8bit=False),
        lora=types.SimpleNamespace(peft_path=None))


@pytest.mark.unit
def test_precomputed_reference_cache(tmp_path, tiny_tokenizer, tiny_llama):
    from medgpt_ds.stages.dpo import Arguments

    model = tiny_llama(len(tiny_tokenizer))
    engine = _Engine(model)
    a = Arguments(reference="precomputed")
    items = [encode_pair(tiny_tokenizer, CHATML, r, pair_data_args()) for r in RECS]
    precompute_reference(_cfg(tmp_path), a, engine, tiny_tokenizer, {}, items)
    assert engine.rows == 2 * 3  # every pair scored once: chosen and rejected rows
    assert (tmp_path / CACHE_FILE).is_file()
    with torch.no_grad():
        sums, counts = pair_logps(model, PairCollator(tiny_tokenizer.pad_token_id)(items))
    n = len(items)
    for i, x in enumerate(items):
        c_sum, r_sum, c_n, r_n = x["ref"]
        assert (c_n, r_n) == (len(x["chosen_ids"]), len(x["rejected_ids"]))
        assert c_sum == pytest.approx(sums[i].item(), abs=1e-4) and r_sum == pytest.approx(sums[n + i].item(), abs=1e-4)

    # a new run, data in another order plus one new pair: only the new pair is computed, the rest
    # comes from the cache by id
    fresh = [encode_pair(tiny_tokenizer, CHATML, r, pair_data_args()) for r in RECS]
    new = encode_pair(tiny_tokenizer, CHATML, pair_record("Is it contagious?", "Yes, for a few days.", "Never."), pair_data_args())
    again = fresh + [new]
    random.Random(3).shuffle(again)
    engine.rows = 0
    precompute_reference(_cfg(tmp_path), a, engine, tiny_tokenizer, {}, again)
    assert engine.rows == 2  # one pair
    by_id = {x["id"]: x["ref"] for x in items}
    assert all(x["ref"] == by_id[x["id"]] for x in again if x is not new)
    saved = torch.load(tmp_path / CACHE_FILE, weights_only=True)
    assert len(saved["ids"]) == 4 and saved["values"].dtype == torch.float64

    # another reference model: the cache does not apply, everything is recomputed
    engine.rows = 0
    precompute_reference(_cfg(tmp_path, ref_path="base-b"), a, engine, tiny_tokenizer, {}, [dict(x) for x in again])
    assert engine.rows == 2 * 4


def _common(model_dir, train_file, eval_file, out, *extra):
    return ["--stage", "dpo", "--model_name_or_path", model_dir, "--template_name", "chatml", "--train_file_dir", train_file,
            "--validation_file_dir", eval_file, "--max_source_length", "64", "--max_target_length", "64",
            "--output_dir", str(out), "--report_to", "none", *extra]


def _starts_at_reference(out):
    """Step 1 runs the policy at its start weights, which ARE the reference: rewards exactly 0."""
    first = metrics(str(out))[0]
    assert first["step"] == 1
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[k]) < 1e-5, (k, first)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.distributed
def test_dpo_zero3_frozen_reference_engine_offloaded(tmp_path, tiny_base_dir):
    train_file, eval_file = split_demo_pairs(tmp_path / "data")
    out = tmp_path / "dpo_model"
    ds = ds_config_copy(tmp_path, "zero3", stage3_param_persistence_threshold=0)
    p = train(_common(tiny_base_dir, train_file, eval_file, out, "--deepspeed", ds, "--reference", "model", "--ref_offload",
                      "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--max_steps", "4",
                      "--logging_steps", "1", "--eval_steps", "4"), nproc=2)
    assert "reference model" in p.stdout
    _starts_at_reference(out)
    curve = losses(str(out))
    assert sorted(curve) == [1, 2, 3, 4] and curve[4] < curve[1]
    ev = metrics(str(out), "eval")[-1]
    assert ev["units"] == 8 and ev["rewards/margins"] > 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # the consolidated ZeRO-3 export is a chat model
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    meta = json.loads((out / "checkpoint-4" / "hf_meta" / "medgpt_meta.json").read_text())
    assert meta["model_kind"] == "causal_lm"


@pytest.mark.distributed
def test_dpo_zero3_adapter_vs_precomputed_and_resume(tmp_path, tiny_base_dir):
    """The disabled-adapter reference and the precomputed one are the same numbers, so the curves
    agree; the precomputed run is killed after its step-2 checkpoint and resumed (cache reused)."""
    train_file, eval_file = split_demo_pairs(tmp_path / "data")
    ds = ds_config_copy(tmp_path, "zero3", stage3_param_persistence_threshold=0)
    run = ["--deepspeed", ds, "--use_peft", "--lora_rank", "4", "--per_device_train_batch_size", "2", "--learning_rate",
           "1e-2", "--max_steps", "4", "--logging_steps", "1", "--save_steps", "2", "--eval_steps", "4"]
    adapter = tmp_path / "dpo_adapter"
    train(_common(tiny_base_dir, train_file, eval_file, adapter, *run, "--reference", "adapter"), nproc=2)
    _starts_at_reference(adapter)

    pre = tmp_path / "dpo_pre"
    args = _common(tiny_base_dir, train_file, eval_file, pre, *run, "--reference", "precomputed")
    p = train(args, nproc=2, check=False, MEDGPT_DEBUG_FAIL_RANK=0, MEDGPT_DEBUG_FAIL_STEP=3)
    assert p.returncode != 0 and "MEDGPT_DEBUG_FAIL" in p.stdout + p.stderr
    assert (pre / "latest").read_text() == "checkpoint-2" and (pre / CACHE_FILE).is_file()
    assert "0 of 60 pairs from reference_logps.pt, computing 60" in p.stdout
    p = train(args + ["--resume_from_checkpoint", "auto"], nproc=2)
    assert "60 of 60 pairs from reference_logps.pt, computing 0" in p.stdout and "resumed from" in p.stdout

    want, got = losses(str(adapter)), losses(str(pre))
    assert sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), (step, got, want)
    ev_a, ev_p = metrics(str(adapter), "eval")[-1], metrics(str(pre), "eval")[-1]
    assert ev_p["loss"] == pytest.approx(ev_a["loss"], rel=1e-5)
    assert ev_p["rewards/accuracies"] == ev_a["rewards/accuracies"]


@pytest.mark.smoke
def test_dpo_learns_a_rule_on_held_out_pairs(tmp_path, tiny_base_dir):
    train_file, eval_file = write_synthetic_pairs(tmp_path)
    out = tmp_path / "dpo_learn"
    train(_common(tiny_base_dir, train_file, eval_file, out, "--reference", "precomputed", "--per_device_train_batch_size", "8",
                  "--learning_rate", "3e-3", "--max_steps", "24", "--logging_steps", "4", "--eval_steps", "24"))
    ev = metrics(str(out), "eval")[-1]
    assert ev["units"] == 64
    assert ev["rewards/accuracies"] >= 0.9, ev  # implicit reward beta*log(pi/ref) of chosen > rejected
    assert ev["rewards/margins"] > 0.5 and ev["loss"] < math.log(2) - 0.2, ev


@pytest.mark.smoke
def test_dpo_real_medicalgpt_pairs_ipo(tmp_path, tiny_base_dir):
    path = os.path.join(SHARED_DATA, "reward", "dpo_zh_500.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"real MedicalGPT sample not present at {path}")
    out = tmp_path / "dpo_real"
    p = train(["--stage", "dpo", "--model_name_or_path", tiny_base_dir, "--template_name", "qwen", "--train_file_dir", path,
               "--max_train_samples", "48", "--max_source_length", "128", "--max_target_length", "128",
               "--loss_type", "ipo", "--beta", "0.5", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
               "--max_steps", "3", "--logging_steps", "1", "--output_dir", str(out), "--report_to", "none"])
    assert "dpo train: 48 of 48 pairs kept" in p.stdout and "truncated (prompt from the left" in p.stdout
    curve = losses(str(out))
    assert sorted(curve) == [1, 2, 3] and all(math.isfinite(v) for v in curve.values())
    assert curve[1] == pytest.approx(1.0, abs=1e-4)  # ipo at the reference: (0 - 1/(2*0.5))^2


@pytest.mark.smoke
@pytest.mark.parametrize("stage,bad,problem", [
    ("dpo", {"conversations": [{"from": "human", "value": "hi"}], "rejected": "no"}, "missing"),
    ("rm", {"prompt": "hi", "chosen": "  ", "rejected": "no"}, "empty"),
])
def test_bad_pair_names_file_and_line(tmp_path, tiny_base_dir, stage, bad, problem):
    good = {"conversations": [{"from": "human", "value": "hello"}], "chosen": "hi there", "rejected": "go away"}
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in (good, good, bad, good)) + "\n")
    out = tmp_path / "out"
    p = train(["--stage", stage, "--model_name_or_path", tiny_base_dir, "--template_name", "chatml", "--train_file_dir",
               str(data), "--max_steps", "1", "--output_dir", str(out)], check=False, timeout=300)
    assert p.returncode != 0
    assert f"pairs.jsonl:3: field 'chosen': {problem}" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not (out / "latest").exists()
