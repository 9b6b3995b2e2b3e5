"""ORPO: SFT on the chosen answer plus an odds-ratio preference term, no reference model.

Paper: ORPO, https://arxiv.org/abs/2403.07691 (eq. 6-7), losses in medgpt_ds/losses.py. Log-probs
are per-token means of each answer; the SFT term is each pair's mean NLL of its chosen answer
(eq. 2), averaged over pairs, so the loss is the same whatever the batch / rank split.
``--loss_type simpo`` trains SimPO instead (https://arxiv.org/abs/2405.14734, eq. 6):
reference-free, length-normalised, with a target margin gamma, no SFT term.

    deepspeed --num_gpus 2 launch/train.py --stage orpo --model_name_or_path outputs/sft \
        --train_file_dir data/demo/reward --template_name chatml --orpo_beta 0.1 \
        --deepspeed ds_configs/zero2.json --output_dir outputs/orpo
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import set_seed

from medgpt_ds import checkpoint, dist, engine as eng, long_context, loop
from medgpt_ds.convert import write_hf_meta
from medgpt_ds.data.pairs import PairCollator, load_pairs, pair_logps
from medgpt_ds.data.templates import get_chat_template
from medgpt_ds.losses import orpo_loss, simpo_loss
from medgpt_ds.model import count_parameters, load_model, load_tokenizer
from medgpt_ds.sequence_parallel import ShardCollator


@dataclass
class Arguments:
    loss_type: str = field(default="orpo", metadata={"help": "orpo (odds ratio + SFT) or simpo (reference-free margin loss)."})
    orpo_beta: float = field(default=0.1, metadata={"help": "ORPO lambda: weight of the odds-ratio term next to the SFT loss."})
    simpo_beta: float = field(default=2.0, metadata={"help": "SimPO beta: scale of the length-normalised reward."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO gamma: target reward margin."})

    def __post_init__(self):
        if self.loss_type not in ("orpo", "simpo"):
            raise ValueError(f"--loss_type must be orpo or simpo, got {self.loss_type!r}")
        if self.orpo_beta < 0 or self.simpo_beta <= 0:
            raise ValueError("--orpo_beta must be >= 0 and --simpo_beta > 0")


def run(cfg) -> loop.TrainState:
    t, d, a = cfg.train, cfg.data, cfg.stage_args or Arguments()
    dist.init(t.ddp_timeout)
    dist.init_sequence_parallel(t.sequence_parallel_size)
    dist.announce()
    resume = checkpoint.prepare_output_dir(cfg)
    set_seed(t.seed)

    tokenizer = load_tokenizer(cfg.model)
    tokenizer.chat_template = get_chat_template(d.template_name, tokenizer)
    train_items, eval_items = load_pairs(cfg, tokenizer, a.loss_type)

    steps_per_epoch, _ = loop.epoch_layout(len(train_items), t.per_device_train_batch_size,
                                           t.gradient_accumulation_steps, dist.dp_world_size())
    total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * steps_per_epoch))

    ds_config = eng.build_ds_config(cfg, hidden_size=None, num_training_steps=total_steps)
    model = load_model(cfg.model, t, cfg.lora, tokenizer, ds_config)
    long_context.prepare_model(model, t)
    engine, _, _ = eng.init_train_engine(model, ds_config, t, total_steps)
    chunk = long_context.loss_chunk_size(t, engine, a.loss_type)

    def loss_fn(engine, batch: dict):
        sums, counts = pair_logps(engine, batch, chunk)  # (2B,)
        avg = sums / counts.clamp(min=1)
        n = batch["input_ids"].size(0) // 2
        if a.loss_type == "simpo":
            loss, metrics = simpo_loss(avg[:n], avg[n:], beta=a.simpo_beta, gamma=a.simpo_gamma)
        else:
            # the chosen answer's mean NLL per pair, averaged over pairs (ORPO eq. 2)
            loss, metrics = orpo_loss(avg[:n], avg[n:], chosen_nll=-avg[:n].mean(), beta=a.orpo_beta)
        # the loop wants sums over pairs; a sequence-parallel rank holds the group's loss and 1/N of its pairs
        w = n / dist.sp_size()
        return loss * w, {k: v * w for k, v in metrics.items()}

    def hf_meta(tag_dir: str) -> None:
        write_hf_meta(tag_dir, engine.module, tokenizer, model_kind="causal_lm", base_model=cfg.model.model_name_or_path,
                      torch_dtype=str(next(engine.module.parameters()).dtype))

    collate = PairCollator(tokenizer.pad_token_id)
    if dist.sp_size() > 1:
        collate = ShardCollator(collate, tokenizer.pad_token_id)
    return loop.train(cfg=cfg, engine=engine, model=model, tokenizer=tokenizer, ds_config=ds_config,
                      train_items=train_items, eval_items=eval_items, collate=collate,
                      loss_fn=long_context.with_context(loss_fn, long_context.offload_context(engine, t)),
                      unit_key="num_pairs", total_steps=total_steps, hf_meta=hf_meta,
                      num_params=count_parameters(model), resume_dir=resume)
