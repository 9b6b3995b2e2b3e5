"""Direct Preference Optimization: fit the policy to preference pairs against a fixed reference.

Paper: DPO, https://arxiv.org/abs/2305.18290 (eq. 7); losses in medgpt_ds/losses.py (sigmoid with
label smoothing = cDPO, ipo, hinge, robust). Chosen and rejected run in one forward (data/pairs.py).
The reference log-probs come from one of (--reference):

- model: a frozen DeepSpeed engine of --ref_model_name_or_path (default: the policy's start),
  ZeRO-3 partitioned when training is ZeRO-3, params optionally offloaded to CPU (--ref_offload);
- adapter: the LoRA policy with its adapter disabled (no second copy; needs --use_peft);
- precomputed: computed once before training over the train and eval pairs (every rank its
  shard, gathered), cached in output_dir/reference_logps.pt keyed by a hash of each tokenized
  pair, and reused by every epoch, resume and later runs with the same reference.

    deepspeed --num_gpus 2 launch/train.py --stage dpo --model_name_or_path outputs/sft \
        --train_file_dir data/demo/reward --template_name chatml --beta 0.1 --reference precomputed \
        --deepspeed ds_configs/zero3.json --output_dir outputs/dpo
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import set_seed

from medgpt_ds import checkpoint, dist, engine as eng, long_context, loop, sequence_parallel
from medgpt_ds.convert import write_hf_meta
from medgpt_ds.data.pairs import PairCollator, load_pairs, pair_logps
from medgpt_ds.data.templates import get_chat_template
from medgpt_ds.errors import UserError
from medgpt_ds.losses import DPO_LOSS_TYPES, dpo_loss
from medgpt_ds.model import count_parameters, load_model, load_tokenizer, resolve_dtype
from medgpt_ds.sequence_parallel import ShardCollator

REFERENCES = ("auto", "model", "adapter", "precomputed")
CACHE_FILE = "reference_logps.pt"


@dataclass
class Arguments:
    beta: float = field(default=0.1, metadata={"help": "DPO beta: strength of the implicit KL to the reference (tau for ipo)."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {', '.join(DPO_LOSS_TYPES)}."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Assumed share of flipped labels (cDPO for sigmoid, rDPO for robust); 0: off."})
    reference: str = field(
        default="auto", metadata={"help": "Reference log-probs: model, adapter (LoRA disabled), precomputed; "
                                          "auto = adapter with --use_peft, else model."})
    ref_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Reference model (default: the policy's start, incl. --peft_path)."})
    ref_offload: bool = field(default=False, metadata={"help": "ZeRO-3 only: keep the frozen reference's params on CPU."})

    def __post_init__(self):
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"--loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {self.loss_type!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"--reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        if self.beta <= 0:
            raise ValueError("--beta must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError("--label_smoothing must be in [0, 0.5)")
        if self.reference == "adapter" and self.ref_model_name_or_path:
            raise ValueError("--reference adapter uses the policy's own base; drop --ref_model_name_or_path")


def build_reference(cfg, a: Arguments, tokenizer, ds_config: dict):
    """Frozen engine of the reference model, partitioned like training (ZeRO-3) or replicated."""
    frozen = eng.frozen_ds_config(ds_config, offload_params=a.ref_offload)
    if a.ref_offload and eng.zero_stage(ds_config) != 3:
        dist.print0("warning: --ref_offload only applies under ZeRO-3; the reference stays on the device")
    margs = dataclasses.replace(cfg.model, model_name_or_path=a.ref_model_name_or_path or cfg.model.model_name_or_path,
                                model_config=None if a.ref_model_name_or_path else cfg.model.model_config)
    targs = dataclasses.replace(cfg.train, gradient_checkpointing=False, neft_alpha=0.0)
    # the policy's start includes a continued adapter (--peft_path); an explicit reference does not
    largs = dataclasses.replace(cfg.lora, use_peft=bool(cfg.lora.peft_path and not a.ref_model_name_or_path))
    model = load_model(margs, targs, largs, tokenizer, frozen)
    if dist.sp_size() > 1:
        sequence_parallel.check_model(model)
    return eng.init_frozen_engine(model, frozen)


def _files_stamp(path: Optional[str]) -> list:
    if not path or not os.path.isdir(path):
        return [path]
    return [path] + sorted((f, s.st_size, int(s.st_mtime)) for f in os.listdir(path)
                           if f.endswith((".safetensors", ".bin", ".json")) and (s := os.stat(os.path.join(path, f))))


def reference_fingerprint(cfg, a: Arguments) -> str:
    """What the cached log-probs depend on besides the tokens (those are in each pair's id)."""
    m, t = cfg.model, cfg.train
    src = [_files_stamp(a.ref_model_name_or_path)] if a.ref_model_name_or_path else \
        [_files_stamp(m.model_name_or_path), m.model_config, t.seed, _files_stamp(cfg.lora.peft_path)]
    return json.dumps(src + [str(resolve_dtype(m, t)), m.attn_implementation, m.load_in_4bit, m.load_in_8bit], default=str)


def precompute_reference(cfg, a: Arguments, engine, tokenizer, ds_config: dict, items: list[dict],
                         chunk_size: int = 0) -> None:
    """Attach item["ref"] = [chosen sum, rejected sum, chosen n, rejected n] to every item, from the
    cache in output_dir or computed now (data-parallel ranks split the missing pairs, then all-gather)."""
    path = os.path.join(cfg.train.output_dir, CACHE_FILE)
    fp = reference_fingerprint(cfg, a)
    table: dict = {}
    if dist.is_main() and os.path.isfile(path):
        saved = torch.load(path, weights_only=True)
        if saved.get("fingerprint") == fp:
            table = dict(zip(saved["ids"], saved["values"].tolist()))
        else:
            dist.print0(f"reference log-probs: {path} was computed with another reference; recomputing")
    table = dist.broadcast_object(table)
    by_id = {x["id"]: x for x in items}
    missing = sorted(set(by_id) - set(table))
    dist.print0(f"reference log-probs: {len(by_id) - len(missing)} of {len(by_id)} pairs from {CACHE_FILE}, "
                f"computing {len(missing)}")
    if missing:
        ref = build_reference(cfg, a, tokenizer, ds_config) if a.ref_model_name_or_path else engine
        world, rank, micro = dist.dp_world_size(), dist.dp_rank(), cfg.train.per_device_eval_batch_size
        collate = PairCollator(tokenizer.pad_token_id)
        if dist.sp_size() > 1:
            collate = ShardCollator(collate, tokenizer.pad_token_id)
        mine = missing[rank::world]
        local = []
        was_training = ref.module.training
        ref.module.eval()
        with torch.no_grad():
            # every rank runs the same number of forwards (ZeRO-3 gathers are collective)
            for b in range(math.ceil(len(missing) / (world * micro))):
                ids = mine[b * micro:(b + 1) * micro]
                batch = collate([by_id[i] for i in (ids or missing[:1])])
                batch = {k: (v.to(dist.device()) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                sums, counts = pair_logps(ref, batch, chunk_size)
                n = len(ids)
                vals = torch.stack([sums[:n], sums[n:2 * n], counts[:n], counts[n:2 * n]], -1).double().cpu().tolist()
                local += list(zip(ids, vals))
        ref.module.train(was_training)
        if ref is not engine:
            del ref
            gc.collect()
        for part in dist.all_gather_object(local):
            table.update(dict(part))
        if dist.is_main():
            keys = sorted(table)
            tmp = f"{path}.tmp"
            torch.save({"fingerprint": fp, "ids": keys, "values": torch.tensor([table[k] for k in keys], dtype=torch.float64)},
                       tmp)
            os.replace(tmp, path)
        dist.barrier()
    for x in items:
        x["ref"] = table[x["id"]]


def run(cfg) -> loop.TrainState:
    t, d, a = cfg.train, cfg.data, cfg.stage_args or Arguments()
    reference = a.reference if a.reference != "auto" else ("adapter" if cfg.lora.use_peft else "model")
    if reference == "adapter" and not cfg.lora.use_peft:
        raise UserError("--reference adapter disables the LoRA adapter for the reference: add --use_peft "
                        "(or use --reference model / precomputed)")
    dist.init(t.ddp_timeout)
    dist.init_sequence_parallel(t.sequence_parallel_size)
    dist.announce()
    resume = checkpoint.prepare_output_dir(cfg)
    set_seed(t.seed)

    tokenizer = load_tokenizer(cfg.model)
    tokenizer.chat_template = get_chat_template(d.template_name, tokenizer)
    train_items, eval_items = load_pairs(cfg, tokenizer, "dpo")

    steps_per_epoch, _ = loop.epoch_layout(len(train_items), t.per_device_train_batch_size,
                                           t.gradient_accumulation_steps, dist.dp_world_size())
    total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * steps_per_epoch))

    ds_config = eng.build_ds_config(cfg, hidden_size=None, num_training_steps=total_steps)
    model = load_model(cfg.model, t, cfg.lora, tokenizer, ds_config)
    long_context.prepare_model(model, t)
    engine, _, _ = eng.init_train_engine(model, ds_config, t, total_steps)
    chunk = long_context.loss_chunk_size(t, engine, "dpo")
    ref_engine = build_reference(cfg, a, tokenizer, ds_config) if reference == "model" else None
    if reference == "precomputed":
        # before loop.train loads any checkpoint: the policy engine still holds its start weights
        precompute_reference(cfg, a, engine, tokenizer, ds_config, train_items + eval_items, chunk)
    dist.print0(f"dpo: loss {a.loss_type}, beta {a.beta}, label_smoothing {a.label_smoothing}, reference {reference}")
    average = a.loss_type == "ipo"  # IPO uses per-token mean log-probs (as TRL)

    def reference_logps(engine, batch: dict):
        """(2B,) reference answer log-prob sums."""
        if reference == "precomputed":
            ref = batch["ref_logps"]  # (B, 4)
            return torch.cat([ref[:, 0], ref[:, 1]])
        module = engine.module if reference == "adapter" else ref_engine.module
        was_training = module.training
        module.eval()
        with torch.no_grad():
            if reference == "adapter":
                with engine.module.disable_adapter():
                    sums, _ = pair_logps(engine.module, batch, chunk)
            else:
                sums, _ = pair_logps(ref_engine, batch, chunk)
        module.train(was_training)
        return sums

    def loss_fn(engine, batch: dict):
        ref = reference_logps(engine, batch)
        sums, counts = pair_logps(engine, batch, chunk)  # (2B,)
        ref = ref.to(sums.dtype)
        if average:
            sums, ref = sums / counts.clamp(min=1), ref / counts.clamp(min=1)
        n = batch["input_ids"].size(0) // 2
        loss, metrics = dpo_loss(sums[:n], sums[n:], ref[:n], ref[n:], beta=a.beta, loss_type=a.loss_type,
                                 label_smoothing=a.label_smoothing)
        # the loop wants sums over pairs; the ranks of a sequence-parallel group each hold the same
        # loss and 1/N of the pairs (ShardCollator), so each returns 1/N of the sum
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
