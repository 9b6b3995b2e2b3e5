"""Typed run configuration: CLI flags and YAML recipes parsed into dataclasses.

Flag names follow MedicalGPT's scripts (model_name_or_path, train_file_dir, ...) so they carry
over. A YAML recipe holds the same keys; flags given on the command line override it. Unknown
flags are errors; flags that MedicalGPT users pass but that have no meaning here are accepted
with a one-line warning (never silently dropped).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from transformers import HfArgumentParser, SchedulerType

from medgpt_ds.compat import (
    ALIAS_HINTS,
    FLAG_ALIASES,
    MEDICALGPT_STAGES_ELSEWHERE,
    default_notices,
    given_flags,
    rewrite_argv,
)
from medgpt_ds.data.templates import TEMPLATES
from medgpt_ds.errors import UserError
from medgpt_ds.generation import BACKENDS
from medgpt_ds.model import check_model_path
from medgpt_ds.report import parse_report_to, resolve_report_to
from medgpt_ds.rewards import RULE_REWARDS

# The stages: each is medgpt_ds/stages/<name>.py with run(cfg) (and its own flags as `Arguments`),
# with the kind of data it reads (data/formats.py). A new stage is its file plus its line here.
STAGE_DATA = {"pt": "pt", "sft": "sft", "rm": "preference", "ppo": "prompt", "dpo": "preference",
              "orpo": "preference", "grpo": "prompt", "opd": "sft"}
STAGES = tuple(STAGE_DATA)
SEQUENCE_PARALLEL_STAGES = ("pt", "sft", "dpo", "orpo")

# MedicalGPT / HF Trainer flags with no meaning under this trainer: accepted, warned about.
IGNORED_FLAGS = {
    "device_map": "DeepSpeed places the model; device_map is ignored under multi-rank training",
    "teacher_device_map": "the opd teacher is a frozen DeepSpeed engine (4/8-bit: whole on each rank's device)",
    "ddp_find_unused_parameters": "DeepSpeed does not use torch DDP",
    "optim": "the optimizer comes from the DeepSpeed config (AdamW by default)",
    "remove_unused_columns": "datasets are tokenized by the stage itself",
    "shift_attn": "S^2-Attn is not implemented; use --packing and --flash_attn for long contexts",
    "torch_compile": "torch.compile is not applied to DeepSpeed engines here",
    "hub_token": "no hub access at training time",
    "push_to_hub": "no hub access at training time",
    "save_safetensors": "exports are always safetensors",
    "eval_strategy": "pt/sft/rm/dpo/orpo evaluate every --eval_steps and at the end with --do_eval",
    "evaluation_strategy": "pt/sft/rm/dpo/orpo evaluate every --eval_steps and at the end with --do_eval",
    "save_strategy": "checkpoints are written every --save_steps and at the end",
    "logging_strategy": "logging runs every --logging_steps",
    "logging_first_step": "the first step is always logged",
    "do_train": "the stage always trains",
    "use_fast_tokenizer": "the fast tokenizer is used when the model ships one",
    "streaming": "datasets are tokenized up front with the datasets cache",
}


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "HF model dir or hub id to start from."})
    model_config: Optional[str] = field(
        default=None,
        metadata={"help": "Train from scratch with random weights: a config.json path or a preset (tiny, tiny-tied)."},
    )
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Tokenizer dir (default: the model's)."})
    torch_dtype: str = field(default="auto", metadata={"help": "Weights dtype when loading: auto, bfloat16, float16, float32. "
                                                               "Alias --dtype (TRL)."})
    attn_implementation: str = field(
        default="auto", metadata={"help": "auto (flash_attention_2 on CUDA with flash-attn, else sdpa), sdpa, eager, flash_attention_2."}
    )
    flash_attn: bool = field(
        default=False, metadata={"help": "MedicalGPT's flag: use flash_attention_2 where it can run (CUDA + flash-attn), "
                                         "else one warning and sdpa, as MedicalGPT does."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the model dir."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where hub downloads and the datasets cache live."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base weights in 4-bit (bitsandbytes nf4)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base weights in 8-bit (bitsandbytes)."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (only used for hub ids)."})

    def __post_init__(self):
        if self.torch_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"--torch_dtype must be auto, bfloat16, float16 or float32, got {self.torch_dtype!r}")
        if self.attn_implementation not in ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"):
            raise ValueError(f"--attn_implementation {self.attn_implementation!r} is not one of auto, sdpa, eager, flash_attention_2")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load_in_4bit and --load_in_8bit are exclusive")


@dataclass
class DataArguments:
    train_file_dir: Optional[str] = field(default=None, metadata={"help": "Dir (or file) of training data."})
    validation_file_dir: Optional[str] = field(default=None, metadata={"help": "Dir (or file) of validation data."})
    validation_split_percentage: int = field(
        default=0, metadata={"help": "Percent of train held out for eval when no validation_file_dir is given (default 0; "
                                     "1, MedicalGPT's default, when --do_eval or --eval_steps asks for evaluation)."}
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N training samples: records (conversations, pairs, prompts); "
                                        "for pt blocks of --block_size tokens (training rows), as MedicalGPT counts them. "
                                        "-1 or 0: all. Alias --train_samples (MedicalGPT grpo)."})
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N eval samples (pt: blocks, as --max_train_samples). -1: all."})
    template_name: Optional[str] = field(
        default=None, metadata={"help": "Chat template name (chatml, qwen, llama3, vicuna, ...); default: the tokenizer's own."}
    )
    block_size: int = field(default=1024, metadata={"help": "pt: tokens per training row."})
    model_max_length: int = field(default=2048, metadata={"help": "sft: max tokens per sample (and per packed row)."})
    max_source_length: int = field(default=1024, metadata={"help": "Preference/RL stages: max prompt tokens (left-truncated)."})
    max_target_length: int = field(default=1024, metadata={"help": "Preference stages: max response tokens (right-truncated)."})
    truncation_mode: str = field(default="truncate", metadata={"help": "Over-long samples: truncate or drop (counted in the log)."})
    train_on_inputs: bool = field(default=False, metadata={"help": "sft: also train on prompt tokens."})
    packing: Optional[bool] = field(default=None, metadata={"help": "Pack samples into rows (default on for pt and sft)."})
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes for tokenization."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenize instead of using the datasets cache."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader workers."})
    system_prompt: Optional[str] = field(
        default=None,
        metadata={"help": "System prompt put before every record that has none of its own (a system turn or a "
                          "`system_prompt` column wins); sft, rm, dpo, orpo, ppo, grpo. A preset name: think_answer "
                          "(MedicalGPT grpo's fixed <think>/<answer> prompt), or the text itself."})
    tool_format: Optional[str] = field(
        default=None,
        metadata={"help": "How tool calls (sharegpt function_call/observation turns, a `tools` schema column) become "
                          "text: auto (default: native when --template_name is unset and the tokenizer's chat template "
                          "renders tools, as Qwen2.5/Qwen3 do; else default), native, or MedicalGPT's formats default, "
                          "qwen, glm4, llama3, mistral."})
    skip_bad_records: bool = field(
        default=False,
        metadata={"help": "Drop records with structural errors (malformed JSON, missing fields, unknown roles) instead "
                          "of stopping; they are counted and each is listed in output_dir/rejected_records.jsonl."})

    def __post_init__(self):
        from medgpt_ds.data.templates import TOOL_FORMAT_ALIASES, TOOL_FORMATS

        for name in ("max_train_samples", "max_eval_samples"):  # MedicalGPT: -1 (any value <= 0) = all
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                setattr(self, name, None)

        if self.tool_format is not None and self.tool_format not in ("auto", *TOOL_FORMATS, *TOOL_FORMAT_ALIASES):
            raise ValueError(f"--tool_format must be auto or one of {', '.join(TOOL_FORMATS)}, got {self.tool_format!r}")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError("--validation_split_percentage must be in [0, 100)")
        if self.template_name not in (None, "", "auto") and self.template_name not in TEMPLATES:
            raise ValueError(f"--template_name {self.template_name!r} is not a known template: use one of "
                             f"{', '.join(TEMPLATES)}, or auto (the tokenizer's own)")
        if self.truncation_mode not in ("truncate", "drop"):
            raise ValueError("--truncation_mode must be truncate or drop")
        for name in ("block_size", "model_max_length", "max_source_length", "max_target_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive")


@dataclass
class TrainingArguments:
    output_dir: str = field(metadata={"help": "Where checkpoints, logs and the final HF export go."})
    stage: str = field(default="sft", metadata={"help": f"One of {', '.join(STAGES)}."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing into a non-empty output_dir."})
    deepspeed: Optional[str] = field(default=None, metadata={"help": "DeepSpeed JSON config (default: ZeRO-0 built in)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Micro batch per rank (rows when packing)."})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Eval micro batch per rank."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro batches per optimizer step."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name (linear, cosine, constant_with_warmup, ...)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of steps spent warming up."})
    warmup_steps: int = field(default=0, metadata={"help": "Warmup steps (overrides warmup_ratio when > 0)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs (ignored when max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Total optimizer steps (> 0 overrides num_train_epochs)."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps."})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "Evaluate every N steps (and at the end)."})
    do_eval: bool = field(default=False, metadata={"help": "Evaluate (needs validation data)."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N steps (0: only at the end)."})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    seed: int = field(default=42, metadata={"help": "Seed for init, data order and dropout."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision."})
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision with loss scaling."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    neft_alpha: float = field(default=0.0, metadata={"help": "NEFTune noise alpha on input embeddings (0: off)."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "A checkpoint dir, or auto (= latest in output_dir)."})
    load_universal: bool = field(default=False, metadata={"help": "Resume from a DeepSpeed universal checkpoint (other world size/stage)."})
    trust_checkpoint: bool = field(
        default=False,
        metadata={"help": "Resume without the allow-list check of the checkpoint's pickles (only for checkpoints you trust: "
                          "a hostile pickle runs code when loaded)."},
    )
    report_to: str = field(
        default="tensorboard", metadata={"help": "Trackers, comma- or space-separated: tensorboard, wandb, swanlab, mlflow "
                                                 "(offline, under the logging dir), none, all (every installed one); "
                                                 "jsonl and stdout always."})
    logging_dir: Optional[str] = field(
        default=None, metadata={"help": "Where metrics.jsonl and the --report_to trackers write (default output_dir/logs)."})
    ddp_timeout: int = field(default=1800, metadata={"help": "Seconds before a collective times out."})
    export_hf: bool = field(default=True, metadata={"help": "Write an HF model (or adapter) into output_dir at the end."})
    # --- long context and memory (DeepSpeed ALST pieces; docs/long_context.md) ---
    chunked_loss: bool = field(
        default=True, metadata={"help": "LM head + loss (pt/sft cross entropy, dpo/orpo log-probs) in chunks of tokens, so "
                                        "the (tokens x vocab) fp32 logits never exist; exact, on wherever the model's logits "
                                        "are reproduced. False: the model's full logits. (ppo/grpo: full logits.)"})
    loss_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk of the chunked loss."})
    use_liger_kernel: bool = field(
        default=False, metadata={"help": "GPU: Liger's Triton RMSNorm/SwiGLU/RoPE kernels (needs pip install liger-kernel)."})
    tiled_mlp: bool = field(
        default=False, metadata={"help": "DeepSpeed TiledMLP: each decoder MLP runs in sequence shards of ~hidden_size "
                                         "tokens, recomputed in backward (for the longest sequences)."})
    offload_activations: bool = field(
        default=False, metadata={"help": "GPU: keep activations saved for backward in CPU RAM (with "
                                         "--gradient_checkpointing: each layer's checkpointed input)."})
    sequence_parallel_size: int = field(
        default=1, metadata={"help": "Ulysses sequence parallelism (pt, sft, dpo, orpo): each sample's tokens are split "
                                     "over N ranks, attention sees the whole sequence via all-to-all. The data-parallel "
                                     "size becomes world/N, so the global batch is micro x accumulation x world/N."})

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 are exclusive")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set --max_steps > 0 or --num_train_epochs > 0")
        if not self.learning_rate >= 0:  # also NaN
            raise ValueError(f"--learning_rate must be >= 0, got {self.learning_rate}")
        schedulers = [s.value for s in SchedulerType]
        if self.lr_scheduler_type not in schedulers:
            raise ValueError(f"--lr_scheduler_type {self.lr_scheduler_type!r} is not a transformers scheduler: use one "
                             f"of {', '.join(schedulers)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("--warmup_ratio must be in [0, 1)")
        parse_report_to(self.report_to)
        if self.loss_chunk_size <= 0:
            raise ValueError(f"--loss_chunk_size must be positive, got {self.loss_chunk_size}")
        if self.sequence_parallel_size < 1:
            raise ValueError(f"--sequence_parallel_size must be >= 1, got {self.sequence_parallel_size}")
        if self.sequence_parallel_size > 1 and self.stage not in SEQUENCE_PARALLEL_STAGES:
            raise ValueError(f"--sequence_parallel_size is supported for {', '.join(SEQUENCE_PARALLEL_STAGES)}, "
                             f"not --stage {self.stage}")


@dataclass
class LoraArguments:
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    target_modules: str = field(default="all", metadata={
        "help": "Module names, comma- or space-separated, or all (every linear layer and MoE expert weight; not heads or "
                "routers). Alias --lora_target_modules (TRL)."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r. Alias --lora_r (TRL)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    modules_to_save: Optional[str] = field(
        default=None, metadata={"help": "Modules (comma- or space-separated) trained in full and saved with the adapter."})
    peft_path: Optional[str] = field(default=None, metadata={"help": "Continue training an existing adapter."})
    qlora: bool = field(default=False, metadata={"help": "QLoRA: 4-bit base (implies --load_in_4bit unless 8-bit given) + LoRA."})

    def __post_init__(self):
        if self.lora_rank <= 0:
            raise ValueError("--lora_rank must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("--lora_dropout must be in [0, 1)")


# --- ppo and grpo ----------------------------------------------------------------------------

ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")


@dataclass
class RolloutArguments:
    """Flags shared by --stage ppo and --stage grpo: models, rollout backend, sampling, rewards."""

    sft_model_path: Optional[str] = field(
        default=None, metadata={"help": "The policy to start from (the sft stage's export); default --model_name_or_path."})
    ref_model_path: Optional[str] = field(
        default=None, metadata={"help": "Frozen reference policy for the KL term; default the starting policy "
                                        "(with --use_peft: the actor with its adapter disabled, no second copy)."})
    reward_model_path: Optional[str] = field(
        default=None, metadata={"help": "Reward model (the rm stage's HF export, a sequence classifier with one "
                                        "label, read at the last non-pad token as in rm training)."})
    reward_model_weight: float = field(default=1.0, metadata={"help": "Weight of the reward model's score in the reward."})
    reward_funcs: Optional[str] = field(
        default=None, metadata={"help": "Comma-separated rule rewards: format, answer_exact, answer_normalized, "
                                        "answer_choice, or module.path:function (fn(completions, answers) -> floats)."})
    reward_weights: Optional[str] = field(
        default=None, metadata={"help": "Comma-separated weights, one per --reward_funcs entry (default all 1.0)."})
    rollout_backend: str = field(
        default="hybrid", metadata={"help": "hybrid (gather ZeRO-3 shards once per rollout, generate with the KV "
                                            "cache), per_token (no gather, synced_gpus: slow baseline), ds_hybrid "
                                            "(DeepSpeed Hybrid Engine, CUDA + OPT/BLOOM/GPT-NeoX/old Llama), vllm "
                                            "(a vLLM engine, weights synced after every optimizer step: --vllm_*)."})
    vllm_mode: str = field(
        default="server", metadata={"help": "server: a vLLM server per node, started by the trainer from the rollout "
                                            "interpreter (or --vllm_server_url), weights pushed through files; the only "
                                            "mode on CPU. colocate: vLLM inside every rank on its GPU, asleep while "
                                            "training (CUDA only)."})
    vllm_server_url: Optional[str] = field(
        default=None, metadata={"help": "Use a running vLLM server (http://host:port) instead of starting one. It must "
                                        "run with VLLM_SERVER_DEV_MODE=1, VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, "
                                        "--logprobs-mode processed_logprobs (and --enable-lora for LoRA) and see "
                                        "<output_dir>/vllm_weights (shared storage)."})
    vllm_python: Optional[str] = field(
        default=None, metadata={"help": "Interpreter that runs the vLLM server (default: .venv-rollout from `make "
                                        "rollout-env`, else this one if it imports vllm)."})
    vllm_dtype: str = field(default="auto", metadata={"help": "vLLM weight dtype: auto (the trainer's), float32, "
                                                              "bfloat16, float16."})
    vllm_max_model_len: Optional[int] = field(
        default=None, metadata={"help": "vLLM context length (default max_source_length + max_new_tokens; vLLM refuses "
                                        "longer requests)."})
    vllm_gpu_memory_utilization: Optional[float] = field(
        default=None, metadata={"help": "Fraction of GPU memory vLLM may take (default: vLLM's 0.9 for a server on its "
                                        "own GPUs, 0.3 in colocate mode)."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallelism (server mode)."})
    vllm_devices: Optional[str] = field(
        default=None, metadata={"help": "GPUs of the server the trainer starts (CUDA_VISIBLE_DEVICES, e.g. 6,7): GPUs "
                                        "the training ranks do not use. Required for server mode on GPUs."})
    vllm_lora_sync: str = field(
        default="adapter", metadata={"help": "LoRA runs: adapter (push the adapter only, under a new name every step) or "
                                             "merged (push base + adapter merged). modules_to_save, MoE expert adapters "
                                             "and colocate mode always push merged weights."})
    vllm_importance_sampling_cap: float = field(
        default=2.0, metadata={"help": "Truncated importance sampling for the engine mismatch: the policy loss is "
                                       "weighted by min(pi_trainer / pi_vllm, cap) per token (0: off; the mismatch is "
                                       "logged either way)."})
    advantage_estimator: Optional[str] = field(
        default=None, metadata={"help": "gae (ppo: critic + GAE), grpo (group-normalised rewards), rloo (leave-one-out "
                                        "baseline over the samples of a prompt), reinforce_pp (REINFORCE++: per-token "
                                        "KL in the reward, advantages normalised over the global batch). Default: gae "
                                        "for ppo, grpo for grpo; rloo / reinforce_pp train no critic."})
    max_new_tokens: int = field(default=128, metadata={"help": "Response length limit (tokens) per rollout. Alias "
                                                                "--max_completion_length (TRL, MedicalGPT's ppo/grpo)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0: greedy); also scales the "
                                                              "logits when scoring log-probs, as in sampling."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    stop: Optional[str] = field(default=None, metadata={"help": "Comma-separated stop strings, \\n for a newline (the "
                                                                "response ends with the string; eos and the "
                                                                "template's end-of-turn always stop)."})
    generation_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Responses per generate() call on a rank (default: the whole rollout at once; "
                                        "the ZeRO-3 gather still happens once)."})
    rollout_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Prompts per rank per step (default: one optimizer step's worth)."})
    kl_estimator: str = field(default="k1", metadata={"help": "Per-token KL estimator to the reference: k1, k2, k3."})
    offload_frozen: bool = field(
        default=False, metadata={"help": "ZeRO-3: keep the frozen models' (reference, reward) parameters on the CPU."})

    def __post_init__(self):
        if self.vllm_mode not in ("server", "colocate"):
            raise ValueError(f"--vllm_mode must be server or colocate, got {self.vllm_mode!r}")
        if self.vllm_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--vllm_dtype must be auto, float32, bfloat16 or float16, got {self.vllm_dtype!r}")
        if self.vllm_lora_sync not in ("adapter", "merged"):
            raise ValueError(f"--vllm_lora_sync must be adapter or merged, got {self.vllm_lora_sync!r}")
        if self.vllm_gpu_memory_utilization is not None and not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError("--vllm_gpu_memory_utilization must be in (0, 1]")
        if self.vllm_tensor_parallel_size <= 0 or (self.vllm_max_model_len is not None and self.vllm_max_model_len <= 0):
            raise ValueError("--vllm_tensor_parallel_size and --vllm_max_model_len must be positive")
        if self.vllm_importance_sampling_cap < 0 or 0 < self.vllm_importance_sampling_cap < 1:
            raise ValueError("--vllm_importance_sampling_cap must be 0 (off) or >= 1")
        if self.vllm_server_url and not self.vllm_server_url.startswith(("http://", "https://")):
            raise ValueError(f"--vllm_server_url must start with http:// or https://, got {self.vllm_server_url!r}")
        if self.advantage_estimator is not None and self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"--advantage_estimator must be one of {', '.join(ADVANTAGE_ESTIMATORS)}, "
                             f"got {self.advantage_estimator!r}")
        if self.rollout_backend not in BACKENDS:
            raise ValueError(f"--rollout_backend must be one of {', '.join(BACKENDS)}, got {self.rollout_backend!r}")
        if self.max_new_tokens <= 0:
            raise ValueError("--max_new_tokens must be positive")
        if self.temperature < 0:
            raise ValueError("--temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("--top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("--top_k must be >= 0")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"--kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
        for name in ("generation_batch_size", "rollout_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive")
        names = split_list(self.reward_funcs)
        for n in names:
            if n not in RULE_REWARDS and ":" not in n:
                raise ValueError(f"--reward_funcs: unknown reward {n!r}; use {', '.join(RULE_REWARDS)} or module:function")
        if self.reward_weights is not None:
            try:
                weights = [float(w) for w in split_list(self.reward_weights)]
            except ValueError:
                raise ValueError(f"--reward_weights must be comma-separated numbers, got {self.reward_weights!r}")
            if len(weights) != len(names):
                raise ValueError(f"--reward_weights has {len(weights)} values for {len(names)} --reward_funcs")

    def stop_strings(self) -> list[str]:
        """--stop split at commas, kept verbatim (spaces count) except that \\n and \\t are unescaped."""
        items = (self.stop or "").split(",")
        return [s.replace("\\n", "\n").replace("\\t", "\t") for s in items if s]


def split_list(value: Optional[str]) -> list[str]:
    """'a, b' -> ['a', 'b'] (empty items dropped)."""
    return [s.strip() for s in (value or "").split(",") if s.strip()]


@dataclass
class RunConfig:
    """Everything a stage needs, grouped."""

    model: ModelArguments
    data: DataArguments
    train: TrainingArguments
    lora: LoraArguments
    stage_args: Any = None
    notices: list = field(default_factory=list)  # one-line notices shown at start (rank 0)

    def to_dict(self) -> dict:
        out = {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "lora": dataclasses.asdict(self.lora),
        }
        if self.stage_args is not None:
            out["stage_args"] = dataclasses.asdict(self.stage_args)
        return out

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)


def _yaml_to_argv(path: str) -> list[str]:
    """Turn a YAML recipe into flags, so the CLI (given later) overrides it."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UserError(f"recipe file not found: {path}")
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path} is not valid YAML: {e}")
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of flag: value")
    argv: list[str] = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        argv += [f"--{key}", str(value)]
    return argv


def _split_stage(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--stage" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--stage="):
            return a.split("=", 1)[1]
    return TrainingArguments.__dataclass_fields__["stage"].default


def _strip_ignored(argv: list[str], known_flags: set[str]) -> list[str]:
    """Drop flags in IGNORED_FLAGS (with their value), warning once each."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name = a[2:].split("=", 1)[0] if a.startswith("--") else None
        if name in IGNORED_FLAGS and name not in known_flags:
            if os.environ.get("RANK", "0") == "0":  # once, not once per rank
                print(f"warning: --{name} is accepted but ignored: {IGNORED_FLAGS[name]}", file=sys.stderr)
            i += 1
            if "=" not in a and i < len(argv) and not argv[i].startswith("--"):
                i += 1
            continue
        out.append(a)
        i += 1
    return out


def parse_args(argv: list[str] | None = None, stage_dataclasses: dict | None = None) -> RunConfig:
    """Parse ``argv`` (default sys.argv[1:]) into a RunConfig.

    A YAML recipe may be given as the first positional argument or with ``--config``;
    flags after it override its values. ``stage_dataclasses`` maps a stage name to its own
    argument dataclass (e.g. DPO's beta), parsed alongside the common ones.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # launchers (deepspeed, torch.distributed.launch) append --local_rank=N; LOCAL_RANK is in the env too
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    recipe = None
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        recipe = argv.pop(0)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a YAML path")
        recipe = argv[i + 1]
        del argv[i : i + 2]
    if recipe:
        argv = _yaml_to_argv(recipe) + argv

    stage = _split_stage(argv)
    if stage not in STAGES:  # before any flag is looked at: the stage decides which flags exist
        why = f" ({MEDICALGPT_STAGES_ELSEWHERE[stage]})" if stage in MEDICALGPT_STAGES_ELSEWHERE else ""
        raise UserError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}{why}")
    extra = (stage_dataclasses or {}).get(stage)
    types = [ModelArguments, DataArguments, TrainingArguments, LoraArguments] + ([extra] if extra else [])
    parser = HfArgumentParser(types)
    parser.allow_abbrev = False  # a typo must not silently select another flag by prefix
    known = {a.dest for a in parser._actions}
    argv, notices = rewrite_argv(argv, stage, known)  # MedicalGPT / TRL names and list forms (compat.py)
    argv = _strip_ignored(argv, known)
    given = given_flags(argv)
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as e:  # raised by a dataclass __post_init__ check
        raise UserError(str(e)) from None
    *objs, remaining = parsed
    if remaining:
        msgs = []
        for i, r in enumerate(remaining):
            if r.startswith("--"):
                name = r[2:].split("=", 1)[0]
                if name in ALIAS_HINTS:
                    msgs.append(f"unknown flag --{name} for --stage {stage} ({ALIAS_HINTS[name]})")
                    continue
                close = difflib.get_close_matches(name, sorted(known | set(FLAG_ALIASES)), n=1)
                hint = f" (did you mean --{close[0]}?)" if close else ""
                msgs.append(f"unknown flag --{name}{hint}")
            elif not (i and remaining[i - 1].startswith("--") and "=" not in remaining[i - 1]):
                msgs.append(f"unexpected argument {r!r}")  # (a value right after an unknown flag is that flag's)
        raise UserError("; ".join(msgs) + f" [stage {stage}]")
    model, data, train, lora = objs[:4]
    cfg = RunConfig(model=model, data=data, train=train, lora=lora, stage_args=objs[4] if extra else None)
    _cross_checks(cfg)
    cfg.notices = notices + _eval_notices(cfg, given) + default_notices(cfg, given) + _algorithm_notices(cfg, known)
    if os.environ.get("RANK", "0") == "0":  # before the process group exists: the launcher's rank
        for line in cfg.notices:
            print(f"notice: {line}", file=sys.stderr, flush=True)
    return cfg


def _eval_notices(cfg: RunConfig, given: set[str]) -> list[str]:
    """Resolve what --do_eval / --eval_steps ask for, so neither silently does nothing: offline stages
    without validation data hold out MedicalGPT's default 1% of train; ppo/grpo say they do not evaluate."""
    t, d = cfg.train, cfg.data
    asked = t.do_eval or bool(t.eval_steps)
    if not asked:
        return []
    flags = " / ".join(f for f, on in (("--do_eval", t.do_eval), (f"--eval_steps {t.eval_steps}", t.eval_steps)) if on)
    if t.stage in ("ppo", "grpo"):
        return [f"{flags}: {t.stage} runs no evaluation pass (rewards, KL and lengths of every rollout are logged "
                "each step); the validation data is not used"]
    if d.validation_file_dir or d.validation_split_percentage > 0:
        return []
    if "validation_split_percentage" in given:  # an explicit 0
        raise UserError(f"{flags} asks for evaluation, but there is no validation data: give --validation_file_dir, "
                        "or a --validation_split_percentage above 0")
    d.validation_split_percentage = 1
    return [f"{flags} without --validation_file_dir: 1% of the training records is held out for evaluation "
            "(MedicalGPT's --validation_split_percentage default)"]


def _algorithm_notices(cfg: RunConfig, known: set[str]) -> list[str]:
    """Which RL algorithm --stage ppo trains, since MedicalGPT's run_ppo.sh trains another."""
    if cfg.train.stage != "ppo":
        return []
    estimator = getattr(cfg.stage_args, "advantage_estimator", None)
    if estimator not in (None, "gae"):
        return []
    other = ("--advantage_estimator rloo (critic-free, several samples per prompt)" if "advantage_estimator" in known
             else "--stage grpo (critic-free, group-relative advantages)")
    return ["--stage ppo trains PPO with a critic (value model from --critic_model_path or the reward model, GAE "
            "advantages); MedicalGPT's run_ppo.sh trains TRL's RLOO, which has no critic: for a critic-free run use "
            + other]


def _cross_checks(cfg: RunConfig) -> None:
    m, t, lora = cfg.model, cfg.train, cfg.lora
    if cfg.lora.qlora and not (m.load_in_4bit or m.load_in_8bit):
        m.load_in_4bit = True
    if (m.load_in_4bit or m.load_in_8bit) and not lora.use_peft:
        raise UserError("--load_in_4bit/--load_in_8bit/--qlora train an adapter: add --use_peft")
    if m.model_name_or_path and m.model_config:
        raise UserError("give either --model_name_or_path (pretrained) or --model_config (from scratch), not both")
    if t.stage in ("pt", "sft", "rm", "dpo", "orpo") and not (m.model_name_or_path or m.model_config):
        raise UserError("--model_name_or_path (or --model_config for random init) is required")
    if m.model_config and lora.use_peft:
        raise UserError("--use_peft trains an adapter on pretrained weights; with --model_config (random init) "
                         "train all weights, or save the model first and pass it as --model_name_or_path")
    if m.model_config and not (m.tokenizer_name_or_path or m.model_name_or_path):
        raise UserError("--model_config needs --tokenizer_name_or_path (train one with tools/train_tokenizer.py)")
    for flag in ("model_name_or_path", "tokenizer_name_or_path"):
        if getattr(m, flag) and not os.path.exists(os.path.expanduser(getattr(m, flag))):
            check_model_path(getattr(m, flag), f"--{flag}", cache_dir=m.cache_dir)  # the folder's contents: cli.main
    if os.path.exists(t.output_dir) and not os.path.isdir(t.output_dir):
        raise UserError(f"--output_dir {t.output_dir} is a file, not a folder")
    unwired = [f for f in ("tiled_mlp", "offload_activations", "use_liger_kernel") if getattr(t, f)]
    if unwired and t.stage in ("ppo", "grpo", "opd"):
        raise UserError(f"--{unwired[0]} is not available for --stage {t.stage} (its rollouts generate with the "
                        "model); use it for pt, sft, rm, dpo, orpo")
    if t.deepspeed and not os.path.isfile(t.deepspeed):
        raise UserError(f"--deepspeed {t.deepspeed}: no such file")
    if cfg.data.train_file_dir and not os.path.exists(cfg.data.train_file_dir):
        raise UserError(f"--train_file_dir {cfg.data.train_file_dir}: no such file or directory")
    if cfg.data.validation_file_dir and not os.path.exists(cfg.data.validation_file_dir):
        raise UserError(f"--validation_file_dir {cfg.data.validation_file_dir}: no such file or directory")
    resolve_report_to(t.report_to)  # a tracker whose package is missing fails now, not after loading the model

