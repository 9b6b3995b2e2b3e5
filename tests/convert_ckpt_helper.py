"""Makes real DeepSpeed checkpoints for tests/test_convert*.py (run under the deepspeed launcher).

    deepspeed --num_gpus 2 tests/convert_ckpt_helper.py --out DIR --tokenizer TOK_DIR
    deepspeed --num_gpus 1 tests/convert_ckpt_helper.py --out DIR --tokenizer TOK_DIR --resume

Save mode trains every case in CASES for a few steps on 2 ranks, saves
``DIR/<case>/checkpoint-3`` the way the trainer does (tag dir + ``latest`` + hf_meta), and writes
``DIR/<case>/expected.pt`` with the engine's logits on fixed inputs. Cases with ``post_step`` also
take one more step with a fixed global batch and record the logits after it, so a resume at
another world size / ZeRO stage can be checked by replaying that step.

Resume mode (1 rank) loads each ``DIR/<case>/universal`` checkpoint (made by
tools/zero_to_universal.py) into an engine of ZeRO stage ``resume_stage``, replays the step and
writes ``DIR/<case>/resumed.pt``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deepspeed  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification  # noqa: E402

from medgpt_ds.convert import write_hf_meta  # noqa: E402

STEPS = 3
SEQ = 12
MICRO = 2
CASES = {
    # name: zero stage, model kind, tied embeddings, lora, extra
    "z2_full": dict(stage=2, kind="causal_lm", tied=False, lora=False, post_step=True, resume_stage=3),
    "z3_full_tied": dict(stage=3, kind="causal_lm", tied=True, lora=False, post_step=True, resume_stage=2),
    "z1_full_tied": dict(stage=1, kind="causal_lm", tied=True, lora=False),
    "z0_full": dict(stage=0, kind="causal_lm", tied=False, lora=False),
    "z2_lora": dict(stage=2, kind="causal_lm", tied=False, lora=True),
    "z3_lora_tied": dict(stage=3, kind="causal_lm", tied=True, lora=True),
    "z2_reward": dict(stage=2, kind="reward", tied=False, lora=False),
    "z3_reward_lora": dict(stage=3, kind="reward", tied=False, lora=True),
    "z3_lora_bf16": dict(stage=3, kind="causal_lm", tied=False, lora=True, bf16=True),
    # extended tokenizer + LoRA: the grown (frozen) embedding rows exist only in the checkpoint
    "z2_lora_resized": dict(stage=2, kind="causal_lm", tied=False, lora=True, resize=8),
}


def model_config(vocab_size: int, pad_id: int, tied: bool, kind: str) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied, pad_token_id=pad_id, num_labels=1,
        bos_token_id=None, eos_token_id=pad_id,
    )


def ds_config(stage: int, micro: int, bf16: bool = False) -> dict:
    cfg = {
        "bf16": {"enabled": bf16},
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1000,
        "wall_clock_breakdown": False,
    }
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return cfg


def build(case: dict, tok, base_dir: str | None):
    torch.manual_seed(0)
    cfg = model_config(len(tok), tok.pad_token_id, case["tied"], case["kind"])
    cls = LlamaForCausalLM if case["kind"] == "causal_lm" else LlamaForSequenceClassification
    model = cls(cfg)
    peft_config = None
    if case["lora"]:
        from peft import LoraConfig, TaskType, get_peft_model

        if base_dir and int(os.environ.get("RANK", "0")) == 0:
            model.save_pretrained(base_dir)
            tok.save_pretrained(base_dir)
        if case.get("resize"):
            torch.manual_seed(1)
            model.resize_token_embeddings(cfg.vocab_size + case["resize"])
        task = TaskType.CAUSAL_LM if case["kind"] == "causal_lm" else TaskType.SEQ_CLS
        peft_config = LoraConfig(task_type=task, r=4, lora_alpha=8, lora_dropout=0.0,
                                 target_modules=["q_proj", "v_proj", "down_proj"])
        model = get_peft_model(model, peft_config)
    return model, peft_config


def batch(step: int, rows: int, vocab: int, offset: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    full = torch.randint(5, vocab, (2 * MICRO, SEQ), generator=g)
    return full[offset:offset + rows]


def loss_of(engine, kind: str, ids: torch.Tensor) -> torch.Tensor:
    if kind == "causal_lm":
        return engine(input_ids=ids, labels=ids, use_cache=False).loss
    score = engine(input_ids=ids).logits.squeeze(-1)  # (B,)
    return ((score - 1.0) ** 2).mean()


def outputs(engine, kind: str, probe: torch.Tensor) -> torch.Tensor:
    engine.eval()
    with torch.no_grad():
        out = engine(input_ids=probe, use_cache=False) if kind == "causal_lm" else engine(input_ids=probe)
    engine.train()
    return out.logits.float().cpu()


def probe_ids(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, vocab, (3, 9), generator=g)
    ids[:, -1] = vocab - 1 - torch.arange(3)  # the last rows too (grown vocabulary)
    return ids


def save_case(name: str, case: dict, root: str, tok) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    case_dir = os.path.join(root, name)
    base_dir = os.path.join(case_dir, "base") if case["lora"] else None
    model, peft_config = build(case, tok, base_dir)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config(case["stage"], MICRO, case.get("bf16", False)))
    vocab = len(tok)
    for step in range(STEPS):
        loss = loss_of(engine, case["kind"], batch(step, MICRO, vocab, rank * MICRO))
        engine.backward(loss)
        engine.step()
    tag = f"checkpoint-{STEPS}"
    engine.save_checkpoint(case_dir, tag=tag, client_state={"global_step": STEPS}, save_latest=False)
    rows = engine.module.get_input_embeddings().weight.ds_shape[0] if case["stage"] == 3 else \
        engine.module.get_input_embeddings().weight.shape[0]
    probe = probe_ids(rows)  # includes grown-vocabulary ids when resized
    expected = {"probe": probe, "logits": outputs(engine, case["kind"], probe),
                "world_size": world, "stage": case["stage"]}
    if rank == 0:
        with open(os.path.join(case_dir, "latest"), "w") as f:
            f.write(tag)
        write_hf_meta(os.path.join(case_dir, tag), engine.module, tok, model_kind=case["kind"],
                      base_model=base_dir, peft_config=peft_config, torch_dtype="bf16" if case.get("bf16") else "fp32")
    if case.get("post_step"):
        loss = loss_of(engine, case["kind"], batch(STEPS, MICRO, vocab, rank * MICRO))
        engine.backward(loss)
        engine.step()
        expected["post_step_logits"] = outputs(engine, case["kind"], probe_ids(vocab))
    if rank == 0:
        torch.save(expected, os.path.join(case_dir, "expected.pt"))
    engine.destroy()


def resume_case(name: str, case: dict, root: str, tok) -> None:
    """1 rank: load the universal checkpoint at another ZeRO stage, replay the post-save step."""
    case_dir = os.path.join(root, name)
    model, _ = build(case, tok, None)
    cfg = ds_config(case["resume_stage"], 2 * MICRO)  # 1 rank carries the whole global batch
    cfg["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=cfg)
    load_path, client = engine.load_checkpoint(case_dir)  # latest_universal
    assert load_path is not None, f"nothing loaded from {case_dir}"
    vocab = len(tok)
    result = {"loaded_logits": outputs(engine, case["kind"], probe_ids(vocab)),
              "global_step": client.get("global_step"), "stage": case["resume_stage"]}
    loss = loss_of(engine, case["kind"], batch(STEPS, 2 * MICRO, vocab))
    engine.backward(loss)
    engine.step()
    result["post_step_logits"] = outputs(engine, case["kind"], probe_ids(vocab))
    torch.save(result, os.path.join(case_dir, "resumed.pt"))
    engine.destroy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    done = []
    for name in args.cases.split(","):
        case = CASES[name]
        if args.resume:
            if "resume_stage" in case:
                resume_case(name, case, args.out, tok)
                done.append(name)
        else:
            save_case(name, case, args.out, tok)
            done.append(name)
    if int(os.environ["RANK"]) == 0:
        with open(os.path.join(args.out, "resumed.json" if args.resume else "saved.json"), "w") as f:
            json.dump(done, f)


if __name__ == "__main__":
    main()
