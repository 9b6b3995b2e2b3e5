"""MedicalGPT's script flags as they are shipped: TRL-style aliases, list flags, and the defaults of
MedicalGPT's training scripts that differ from ours.

MedicalGPT's run_*.sh pass flags of three families: its own dataclasses (model_name_or_path,
lora_rank, ...: our names), the HF Trainer's (do_eval, eval_strategy, ...) and TRL's ModelConfig /
GRPOConfig / RLOOConfig (dtype, lora_r, lora_target_modules as a space-separated list,
max_completion_length, use_vllm, train_samples). ``rewrite_argv`` maps the last two onto our flags
before parsing, so every run_*.sh runs with only the script name and paths changed;
``default_notices`` names, in one line at start, each default a MedicalGPT script relies on
(without setting it) that differs here.
"""
from __future__ import annotations

from typing import Optional

from medgpt_ds.errors import UserError

# Alias -> our flag. A dict value maps per stage (a stage not in it does not take the alias). An alias
# is applied only when the stage has no flag of that name itself (its own meaning wins).
FLAG_ALIASES: dict[str, object] = {
    "dtype": "torch_dtype",  # TRL ModelConfig
    "lora_r": "lora_rank",
    "lora_target_modules": "target_modules",
    "lora_modules_to_save": "modules_to_save",
    "train_samples": "max_train_samples",  # MedicalGPT grpo_training.py: -1 = all
    # TRL: the response length; ppo / grpo sample up to it, preference stages cut responses at it
    "max_completion_length": {"ppo": "max_new_tokens", "grpo": "max_new_tokens", "rm": "max_target_length",
                              "dpo": "max_target_length", "orpo": "max_target_length"},
    "max_prompt_length": {"ppo": "max_source_length", "grpo": "max_source_length", "rm": "max_source_length",
                          "dpo": "max_source_length", "orpo": "max_source_length"},
}

# Why an alias has no meaning in the stages it does not map to (replaces difflib's guess).
ALIAS_HINTS = {
    "max_completion_length": "the response length of ppo/grpo (and dpo/orpo/rm); sft cuts samples at "
                             "--model_max_length, pt at --block_size",
    "max_prompt_length": "the prompt length of ppo/grpo/dpo/orpo/rm (--max_source_length); sft cuts samples at "
                         "--model_max_length",
    "use_vllm": "vLLM generates rollouts in ppo and grpo only",
}

# Flags that take a list: MedicalGPT/TRL pass them space-separated (`--lora_target_modules q_proj
# k_proj`), our dataclasses hold a comma-separated string; both forms are accepted.
LIST_FLAGS = ("target_modules", "modules_to_save", "report_to")


def _flag_name(arg: str) -> Optional[str]:
    return arg[2:].split("=", 1)[0] if arg.startswith("--") and len(arg) > 2 else None


def _truthy(value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "t", "yes", "y", "1"):
        return True
    if v in ("false", "f", "no", "n", "0"):
        return False
    raise UserError(f"--use_vllm expects True or False, got {value!r}")


def rewrite_argv(argv: list[str], stage: str, known: set[str]) -> tuple[list[str], list[str]]:
    """(``argv`` with MedicalGPT/TRL aliases renamed to our flags and list flags joined with commas,
    notices about what was mapped).

    ``--use_vllm`` (when the stage has no such flag): False is the default here (rollouts generated
    by the trained engine itself) and is dropped; True selects ``--rollout_backend vllm``.
    """
    out: list[str] = []
    notices: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        name = _flag_name(a)
        if name is None:
            out.append(a)
            i += 1
            continue
        inline = a.split("=", 1)[1] if "=" in a else None
        if name not in known:
            target = FLAG_ALIASES.get(name)
            if isinstance(target, dict):
                target = target.get(stage)
            if target:
                name = target
            elif name == "use_vllm" and stage in ("ppo", "grpo") and "rollout_backend" in known:
                value = inline
                if value is None and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    value = argv[i + 1]
                    i += 1
                i += 1
                if value is None or _truthy(value):
                    out += ["--rollout_backend", "vllm"]
                    notices.append("--use_vllm True: rollouts are generated with --rollout_backend vllm")
                continue
        if name in LIST_FLAGS and inline is None:
            values = []
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                values.append(argv[j])
                j += 1
            out += [f"--{name}", ",".join(v.strip(",") for v in values if v.strip(","))] if values else [f"--{name}"]
            i = j
            continue
        out.append(f"--{name}" + (f"={inline}" if inline is not None else ""))
        i += 1
    return out, notices


def given_flags(argv: list[str]) -> set[str]:
    """The flag names present in ``argv`` (after rewrite_argv)."""
    return {n for n in map(_flag_name, argv) if n}


# --- defaults ----------------------------------------------------------------------------------

_HF = {"learning_rate": 5e-5, "lr_scheduler_type": "linear", "num_train_epochs": 3.0}
_LORA = {"use_peft": True, "lora_alpha": 32.0}
_PREF = {"learning_rate": 5e-4, "warmup_steps": 100, "max_steps": 200, "lr_scheduler_type": "cosine",
         "gradient_accumulation_steps": 4, "gradient_checkpointing": True, "logging_steps": 1,
         "use_peft": True, "lora_alpha": 16.0, "max_source_length": 2048, "max_target_length": 512}
_TRL_RL = {"learning_rate": 1e-6, "lr_scheduler_type": "linear", "num_train_epochs": 3.0, "bf16": True,
           "max_new_tokens": 512}

# What MedicalGPT's training scripts (HEAD) use when a flag is not given, where it differs from ours:
# stage -> (script, {flag: value}). The HF Trainer's, its own dataclasses', or TRL's config defaults.
MEDICALGPT_DEFAULTS: dict[str, tuple[str, dict]] = {
    "pt": ("pretraining.py", {**_HF, **_LORA}),
    "sft": ("supervised_finetuning.py", {**_HF, **_LORA, "model_max_length": 512, "packing": False}),
    "rm": ("reward_modeling.py", {**_HF, **_LORA, "max_source_length": 2048, "max_target_length": 512}),
    "dpo": ("dpo_training.py", dict(_PREF)),
    "orpo": ("orpo_training.py", dict(_PREF)),
    "ppo": ("ppo_training.py (TRL RLOOConfig)", dict(_TRL_RL)),
    "grpo": ("grpo_training.py (TRL GRPOConfig)", {**_TRL_RL, "num_generations": 8, "beta": 0.0,
                                                    "loss_type": "dapo", "system_prompt": "think_answer"}),
}


def _effective(cfg, flag: str):
    for part in (cfg.train, cfg.data, cfg.model, cfg.lora, cfg.stage_args):
        if part is not None and hasattr(part, flag):
            return getattr(part, flag)
    return None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return "none" if v is None else str(v)


def default_notices(cfg, given: set[str]) -> list[str]:
    """One line naming the defaults MedicalGPT's script for this stage would use for the flags not
    given here, where they differ from ours (empty when none differ)."""
    stage = cfg.train.stage
    if stage not in MEDICALGPT_DEFAULTS:
        return []
    script, table = MEDICALGPT_DEFAULTS[stage]
    diffs = []
    for flag, theirs in table.items():
        if flag in given:
            continue
        ours = _effective(cfg, flag)
        if flag == "packing" and ours is None:
            ours = True  # sft packs unless told otherwise
        if flag == "max_steps" and (ours is None or ours <= 0):
            continue  # ours trains by epochs: no difference to name beyond num_train_epochs
        if ours is None and flag != "system_prompt":
            continue
        if ours != theirs and not (isinstance(ours, float) and isinstance(theirs, float) and abs(ours - theirs) < 1e-15):
            diffs.append(f"--{flag} {_fmt(ours)} (MedicalGPT: {_fmt(theirs)})")
    if not diffs:
        return []
    return [f"defaults not set on the command line that differ from MedicalGPT's {script}: " + ", ".join(diffs)
            + "; pass a flag to choose"]
