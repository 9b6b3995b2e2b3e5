"""DeepSpeed checkpoints <-> Hugging Face models.

Modules (each read top to bottom):
    hf_meta     ``hf_meta/`` written into every checkpoint: config, tokenizer, adapter config, meta
    safe_load   unpickling checkpoint files through an allow-list (``--trust_checkpoint`` to bypass)
    zero        lazy index of a ZeRO 0/1/2/3 tag dir: any tensor materialized on demand
    plans       output key -> how to produce it (full model, PEFT adapter, LoRA merged per layer)
    layout      the hub layout save_pretrained writes (per-expert MoE weights, composite prefixes), per unit
    writer      sharded safetensors, written tensor by tensor
    export      the conversion (tools/zero_to_hf.py)
    verify      --verify: logits of the export against DeepSpeed's own reader / PEFT
    lora_merge  base folder + adapter folder -> merged folder (tools/merge_lora.py)
    universal   DeepSpeed universal checkpoints, to resume at another topology (tools/zero_to_universal.py)
"""
from medgpt_ds.convert.export import ExportResult, check_same_base, export_checkpoint, write_generation_config
from medgpt_ds.convert.hf_meta import (
    DTYPE_NAMES,
    META_DIR,
    META_FILE,
    META_VERSION,
    MODEL_KINDS,
    canonical_dtype,
    read_hf_meta,
    write_hf_meta,
)
from medgpt_ds.convert.layout import HubReader, Layout, to_hub_layout
from medgpt_ds.convert.lora_merge import LoraFolders, check_adapter_fits_base, merge_lora_folders
from medgpt_ds.convert.plans import build_model, plan_adapter, plan_full, plan_merged
from medgpt_ds.convert.safe_load import load_pickle, vet_checkpoint_files
from medgpt_ds.convert.universal import to_universal
from medgpt_ds.convert.verify import DEFAULT_PROMPTS, reference_state_dict, verify_export, verify_merge
from medgpt_ds.convert.writer import write_safetensors
from medgpt_ds.convert.zero import ZeroCheckpoint, resolve_tag_dir
from medgpt_ds.errors import CheckpointError

__all__ = [
    "DEFAULT_PROMPTS", "DTYPE_NAMES", "META_DIR", "META_FILE", "META_VERSION", "MODEL_KINDS", "CheckpointError",
    "ExportResult", "HubReader", "Layout", "LoraFolders", "ZeroCheckpoint", "build_model", "canonical_dtype",
    "check_adapter_fits_base", "check_same_base", "export_checkpoint", "load_pickle", "merge_lora_folders",
    "plan_adapter", "plan_full", "plan_merged", "read_hf_meta", "reference_state_dict", "resolve_tag_dir",
    "to_hub_layout", "to_universal", "verify_export", "verify_merge", "vet_checkpoint_files",
    "write_generation_config", "write_hf_meta", "write_safetensors",
]
