"""MedicalGPT's run_*.sh at its HEAD run here as shipped: each script's flag set, written below as
MedicalGPT ships it with only the script name, paths and sizes changed (model, data folders, output
dir; batch, lengths, sample counts and step intervals scaled down), through the launcher the script
uses (torchrun with 2 ranks for pt / sft / grpo, plain python otherwise), on a tiny Qwen3 model whose
tokenizer carries its own chat template, on MedicalGPT's own data (../shared/data/medicalgpt).

Each run must train, export, report to TensorBoard, evaluate when the script asks for it, and log no
"unknown flag" and no error. Sizes that the script sets are marked {like_this}; everything else is
MedicalGPT's text (scripts/run_*.sh at shibing624/MedicalGPT HEAD, 2f1008c).
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.launch_utils import ROOT, SHARED_DATA, env, free_port

pytestmark = [pytest.mark.medicalgpt, pytest.mark.skipif(
    not os.path.isdir(SHARED_DATA), reason=f"MedicalGPT's data folders not found at {SHARED_DATA}")]

# --- the scripts, as MedicalGPT ships them (sizes and paths in {braces}) -------------------------

RUN_PT = r"""
CUDA_VISIBLE_DEVICES=0,1 torchrun --nproc_per_node 2 training/pretraining.py \
    --model_name_or_path {model} \
    --train_file_dir {data}/pretrain \
    --validation_file_dir {data}/pretrain \
    --per_device_train_batch_size {batch} \
    --per_device_eval_batch_size {batch} \
    --do_train \
    --do_eval \
    --use_peft True \
    --seed 42 \
    --max_train_samples {max_train_samples} \
    --max_eval_samples {max_eval_samples} \
    --num_train_epochs 0.5 \
    --learning_rate 2e-4 \
    --warmup_steps {warmup} \
    --weight_decay 0.01 \
    --logging_strategy steps \
    --logging_steps {logging_steps} \
    --eval_steps {eval_steps} \
    --eval_strategy steps \
    --save_steps {save_steps} \
    --save_strategy steps \
    --save_total_limit 13 \
    --gradient_accumulation_steps {ga} \
    --preprocessing_num_workers {workers} \
    --block_size {block_size} \
    --packing True \
    --output_dir {out} \
    --ddp_timeout 30000 \
    --logging_first_step True \
    --target_modules all \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --torch_dtype bfloat16 \
    --bf16 \
    --report_to tensorboard \
    --ddp_find_unused_parameters False \
    --gradient_checkpointing True \
    --cache_dir {cache}
"""

RUN_SFT = r"""
CUDA_VISIBLE_DEVICES=0,1 torchrun --nproc_per_node 2 training/supervised_finetuning.py \
    --model_name_or_path {model} \
    --train_file_dir {data}/sft \
    --validation_file_dir {data}/sft \
    --per_device_train_batch_size {batch} \
    --per_device_eval_batch_size 1 \
    --do_train \
    --do_eval \
    --use_peft True \
    --max_train_samples {max_train_samples} \
    --max_eval_samples {max_eval_samples} \
    --model_max_length {model_max_length} \
    --num_train_epochs 1 \
    --learning_rate 2e-5 \
    --warmup_steps {warmup} \
    --weight_decay 0.05 \
    --logging_strategy steps \
    --logging_steps {logging_steps} \
    --eval_steps {eval_steps} \
    --eval_strategy steps \
    --save_steps {save_steps} \
    --save_strategy steps \
    --save_total_limit 13 \
    --gradient_accumulation_steps {ga} \
    --preprocessing_num_workers {workers} \
    --output_dir {out} \
    --ddp_timeout 30000 \
    --logging_first_step True \
    --target_modules all \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --torch_dtype bfloat16 \
    --bf16 \
    --report_to tensorboard \
    --ddp_find_unused_parameters False \
    --gradient_checkpointing True \
    --tool_format default \
    --cache_dir {cache} --flash_attn True
"""

RUN_RM = r"""
# reward model 训练暂不支持 torchrun 多卡训练
CUDA_VISIBLE_DEVICES=0,1 python3 training/reward_modeling.py \
    --model_name_or_path {model} \
    --train_file_dir {data}/reward \
    --validation_file_dir {data}/reward \
    --per_device_train_batch_size {batch} \
    --gradient_accumulation_steps {ga} \
    --per_device_eval_batch_size {batch} \
    --do_train \
    --use_peft True \
    --seed 42 \
    --max_train_samples {max_train_samples} \
    --max_eval_samples {max_eval_samples} \
    --num_train_epochs 1 \
    --learning_rate 2e-5 \
    --warmup_steps {warmup} \
    --weight_decay 0.001 \
    --logging_strategy steps \
    --logging_steps {logging_steps} \
    --eval_steps {eval_steps} \
    --eval_strategy steps \
    --save_steps {save_steps} \
    --save_strategy steps \
    --save_total_limit 3 \
    --max_source_length {max_source_length} \
    --max_target_length {max_target_length} \
    --output_dir {out} \
    --overwrite_output_dir \
    --ddp_timeout 30000 \
    --logging_first_step True \
    --target_modules all \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --bf16 \
    --torch_dtype bfloat16 \
    --report_to tensorboard \
    --ddp_find_unused_parameters False \
    --remove_unused_columns False \
    --gradient_checkpointing True
"""

RUN_DPO = r"""
CUDA_VISIBLE_DEVICES=0,1 python3 training/dpo_training.py \
    --model_name_or_path {model} \
    --train_file_dir {data}/reward \
    --validation_file_dir {data}/reward \
    --per_device_train_batch_size {batch} \
    --gradient_accumulation_steps {ga} \
    --per_device_eval_batch_size 1 \
    --do_train \
    --do_eval \
    --use_peft True \
    --max_train_samples {max_train_samples} \
    --max_eval_samples {max_eval_samples} \
    --max_steps {max_steps} \
    --eval_steps {eval_steps} \
    --save_steps {save_steps} \
    --max_source_length {max_source_length} \
    --max_target_length {max_target_length} \
    --output_dir {out} \
    --target_modules all \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --torch_dtype bfloat16 \
    --bf16 True \
    --fp16 False \
    --report_to tensorboard \
    --remove_unused_columns False \
    --gradient_checkpointing True \
    --tool_format default \
    --cache_dir {cache}
"""

RUN_ORPO = r"""
CUDA_VISIBLE_DEVICES=0,1 python3 training/orpo_training.py \
    --model_name_or_path {model} \
    --train_file_dir {data}/reward \
    --per_device_train_batch_size {batch} \
    --per_device_eval_batch_size {batch} \
    --gradient_accumulation_steps {ga} \
    --do_train \
    --do_eval \
    --use_peft True \
    --max_train_samples {max_train_samples} \
    --max_eval_samples {max_eval_samples} \
    --max_steps {max_steps} \
    --eval_steps {eval_steps} \
    --save_steps {save_steps} \
    --max_source_length {max_source_length} \
    --max_target_length {max_target_length} \
    --output_dir {out} \
    --target_modules all \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --torch_dtype bfloat16 \
    --bf16 True \
    --report_to tensorboard \
    --remove_unused_columns False \
    --gradient_checkpointing True \
    --orpo_beta 0.1 \
    --cache_dir {cache}
"""

RUN_PPO = r"""
CUDA_VISIBLE_DEVICES=0,1 python3 training/ppo_training.py \
    --sft_model_path {model} \
    --reward_model_path {reward_model} \
    --model_name_or_path {model} \
    --dtype bfloat16 \
    --train_file_dir {data}/sft \
    --validation_file_dir {data}/sft \
    --max_source_length {max_source_length} \
    --max_completion_length {max_completion_length} \
    --per_device_train_batch_size {batch} \
    --gradient_accumulation_steps {ga} \
    --gradient_checkpointing True \
    --do_train \
    --max_steps {max_steps} \
    --output_dir {out} \
    --eval_strategy steps \
    --eval_steps {eval_steps} \
    --num_train_epochs 3 \
    --report_to tensorboard
"""

RUN_GRPO = r"""
#!/bin/bash

CUDA_VISIBLE_DEVICES=0,1 torchrun --nproc_per_node 2 training/grpo_training.py \
    --model_name_or_path {model} \
    --train_file_dir {data}/grpo \
    --train_samples {train_samples} \
    --max_steps -1 --num_train_epochs 1 \
    --save_steps {save_steps} \
    --save_strategy steps \
    --save_total_limit 13 \
    --output_dir {out} \
    --dtype bfloat16 \
    --bf16 True \
    --report_to tensorboard \
    --remove_unused_columns False \
    --gradient_checkpointing False \
    --beta 0.001 \
    --learning_rate 5.0e-7 \
    --lr_scheduler_type cosine \
    --warmup_ratio 0.03 \
    --use_vllm False \
    --logging_steps {logging_steps} \
    \
    `# QLoRA配置` \
    --use_peft True \
    --qlora False \
    --load_in_4bit False \
    --lora_target_modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj \
    --lora_r 16 \
    --lora_alpha 32 \
    --lora_dropout 0.1 \
    \
    `# 显存优化配置` \
    --per_device_train_batch_size {batch} \
    --per_device_eval_batch_size 1 \
    --num_generations 4 \
    --gradient_accumulation_steps {ga} \
    --max_completion_length {max_completion_length}

echo "训练完成!"
"""


def script_command(script: str, **values) -> tuple[list[str], str]:
    """(argv after the training script, launcher) of a run_*.sh: its flags with {placeholders}
    filled, the line continuations and `# comment` substitutions taken out as bash does."""
    text = re.sub(r"`#[^`]*`", "", script).replace("\\\n", " ")
    line = next(x for x in text.splitlines() if "training/" in x)
    words = shlex.split(line.format(**values))
    i = next(k for k, w in enumerate(words) if w.startswith("training/"))
    return words[i + 1:], ("torchrun" if "torchrun" in words[:i] else "python")


def launch(stage: str, script: str, tmp_path, **values) -> tuple[subprocess.CompletedProcess, str]:
    """Run one MedicalGPT script's flags as `launch/train.py --stage <stage> ...` with its launcher."""
    out = str(tmp_path / f"outputs-{stage}")
    args, launcher = script_command(script, data=SHARED_DATA, out=out, cache=str(tmp_path / "cache"), **values)
    train_py = os.path.join(ROOT, "launch", "train.py")
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), train_py, "--stage", stage, *args]
    else:
        cmd = [sys.executable, train_py, "--stage", stage, *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    log = p.stdout + p.stderr
    with open(tmp_path / f"{stage}.log", "w") as f:  # kept beside the run for a failing test
        f.write(log)
    assert p.returncode == 0, f"{stage} failed (rc {p.returncode}):\n{log[-8000:]}"
    assert "unknown flag" not in log and "error:" not in log, log[-8000:]
    return p, out


def train_records(out: str, split: str = "train") -> list[dict]:
    with open(os.path.join(out, "logs", "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("split") == split]


def check_trained_adapter(out: str, steps: int) -> dict:
    """The run logged ``steps`` optimizer steps with finite losses, exported a LoRA adapter whose B
    matrices moved off their zero init, and wrote TensorBoard events."""
    recs = train_records(out)
    assert recs and recs[-1]["step"] == steps, [r["step"] for r in recs]
    assert all(math.isfinite(r["loss"]) for r in recs)
    weights = load_file(os.path.join(out, "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(v.float().abs().max() > 0 for v in lora_b), "the adapter did not train"
    assert glob.glob(os.path.join(out, "logs", "events.out.tfevents.*")), "no TensorBoard events"
    return weights


@pytest.fixture(scope="session")
def qwen_dirs(tmp_path_factory, demo_tokenizer_dir):
    """A tiny Qwen3 causal LM and a Qwen3 reward model (sequence classifier, one label), both with a
    tokenizer carrying its own Qwen chat template (no --template_name in any script)."""
    from transformers import AutoTokenizer, Qwen3ForSequenceClassification

    from medgpt_ds.data.templates import TEMPLATES
    from tests.family_models import make_config, make_model

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    tok.chat_template = TEMPLATES["qwen"]
    root = tmp_path_factory.mktemp("medicalgpt_models")
    dirs = {"model": str(root / "qwen3"), "reward_model": str(root / "qwen3_rm")}
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    make_model("qwen3", len(tok), seed=1, **ids).save_pretrained(dirs["model"])
    config = make_config("qwen3", len(tok), **ids)
    config.num_labels = 1
    torch.manual_seed(2)
    Qwen3ForSequenceClassification(config).save_pretrained(dirs["reward_model"])
    for d in dirs.values():
        tok.save_pretrained(d)
    return dirs


def test_run_pt(qwen_dirs, tmp_path):
    p, out = launch("pt", RUN_PT, tmp_path, model=qwen_dirs["model"], batch=2, max_train_samples=16,
                    max_eval_samples=4, warmup=1, logging_steps=1, eval_steps=1, save_steps=500, ga=1, workers=1,
                    block_size=64)
    # --max_train_samples counts blocks of block_size (MedicalGPT's meaning): 16 blocks, 2 x 1 x 2 per
    # step, 0.5 epoch = 2 steps (counted as documents, 16 long documents would make far more blocks)
    assert "--max_train_samples 16 keeps 16 of" in p.stdout
    check_trained_adapter(out, steps=2)
    evals = train_records(out, "eval")
    assert evals and all(r["units"] > 0 for r in evals)  # --do_eval / --eval_steps ran on 4 blocks


def test_run_sft(qwen_dirs, tmp_path):
    p, out = launch("sft", RUN_SFT, tmp_path, model=qwen_dirs["model"], batch=2, max_train_samples=16,
                    max_eval_samples=4, model_max_length=256, warmup=1, logging_steps=1, eval_steps=2, save_steps=500,
                    ga=1, workers=1)
    log = p.stdout + p.stderr
    assert "--flash_attn True: flash_attention_2 cannot run here" in log  # a warning and sdpa, not an error
    assert len(re.findall(r"sft train: packed \d+ samples into \d+ rows", p.stdout)) == 1  # said once, with counts
    assert "--packing True (MedicalGPT: False)" in log  # the default that differs is named at start
    check_trained_adapter(out, steps=int(re.search(r"into (\d+) rows", p.stdout).group(1)) // 4)
    assert train_records(out, "eval")


def test_run_rm(qwen_dirs, tmp_path):
    p, out = launch("rm", RUN_RM, tmp_path, model=qwen_dirs["model"], batch=2, ga=1, max_train_samples=8,
                    max_eval_samples=4, warmup=1, logging_steps=1, eval_steps=2, save_steps=500,
                    max_source_length=64, max_target_length=32)
    weights = check_trained_adapter(out, steps=4)
    assert any("score" in k for k in weights)  # the reward head is trained and saved with the adapter
    assert train_records(out, "eval")  # eval_steps with a validation folder evaluates (no --do_eval needed)


def test_run_dpo(qwen_dirs, tmp_path):
    p, out = launch("dpo", RUN_DPO, tmp_path, model=qwen_dirs["model"], batch=2, ga=1, max_train_samples=8,
                    max_eval_samples=4, max_steps=2, eval_steps=2, save_steps=50, max_source_length=64,
                    max_target_length=32)
    assert "--learning_rate 2e-05 (MedicalGPT: 0.0005)" in p.stderr  # named, not silently different
    check_trained_adapter(out, steps=2)
    assert train_records(out, "eval")


def test_run_orpo(qwen_dirs, tmp_path):
    p, out = launch("orpo", RUN_ORPO, tmp_path, model=qwen_dirs["model"], batch=2, ga=1, max_train_samples=200,
                    max_eval_samples=2, max_steps=2, eval_steps=2, save_steps=50, max_source_length=64,
                    max_target_length=32)
    # --do_eval without a validation folder: MedicalGPT's 1% split, said at start, and evaluated
    assert "1% of the training records is held out" in p.stderr
    assert "held out 2 of 200 records" in p.stdout
    check_trained_adapter(out, steps=2)
    assert train_records(out, "eval")


def test_run_ppo(qwen_dirs, tmp_path):
    p, out = launch("ppo", RUN_PPO, tmp_path, model=qwen_dirs["model"], reward_model=qwen_dirs["reward_model"],
                    max_source_length=48, max_completion_length=8, batch=1, ga=2, max_steps=2, eval_steps=1)
    log = p.stdout + p.stderr
    assert "trains PPO with a critic" in log and "MedicalGPT's run_ppo.sh trains TRL's RLOO" in log
    assert "ppo runs no evaluation pass" in log  # --eval_steps is answered, not silently dropped
    recs = train_records(out)
    assert recs[-1]["step"] == 2 and all(math.isfinite(r["loss"]) for r in recs if "loss" in r)
    assert max(r.get("response_length", r.get("rollout/response_length", 0)) for r in recs) <= 8  # --max_completion_length
    base, trained = load_file(os.path.join(qwen_dirs["model"], "model.safetensors")), load_file(
        os.path.join(out, "model.safetensors"))
    assert any(not torch.equal(base[k].to(trained[k].dtype), trained[k]) for k in trained if k in base)


def test_run_grpo(qwen_dirs, tmp_path):
    p, out = launch("grpo", RUN_GRPO, tmp_path, model=qwen_dirs["model"], train_samples=8, save_steps=50,
                    logging_steps=1, batch=4, ga=1, max_completion_length=8)
    log = p.stdout + p.stderr
    assert "--system_prompt none (MedicalGPT: think_answer)" in log
    # --train_samples 8: 8 prompts; 4 responses per rank per step (1 prompt x --num_generations 4) on 2
    # ranks: 4 steps of rollouts cut at --max_completion_length 8. A random model earns no reward from
    # the rule rewards (nor from MedicalGPT's), so its updates are zero: the loop, not learning, is checked.
    recs = train_records(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in recs)
    assert all(0 < r["response_length"] <= 8 for r in recs)
    adapter = json.load(open(os.path.join(out, "adapter_config.json")))
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 32  # --lora_r, --lora_alpha
    targets = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}  # the space-separated list
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    assert glob.glob(os.path.join(out, "logs", "events.out.tfevents.*"))
