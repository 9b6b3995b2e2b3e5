"""Tokenizer and model loading: pretrained dirs or from-scratch configs, attention choice,
LoRA / QLoRA, gradient checkpointing, NEFTune, and ZeRO-3-safe construction (zero.Init).
"""
from __future__ import annotations

import importlib.util
import json
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from medgpt_ds import dist
from medgpt_ds.errors import PathNotFound, UserError

# From-scratch presets (the "learn the pipeline on a laptop" path). Vocabulary comes from the tokenizer.
PRESETS: dict[str, dict] = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 rms_norm_eps=1e-6, tie_word_embeddings=False),
    "tiny-tied": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      rms_norm_eps=1e-6, tie_word_embeddings=True),
    "small": dict(model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                  rms_norm_eps=1e-6, tie_word_embeddings=False),
}

# What a local model folder must hold for transformers to load it (checked before it is asked to:
# its own errors mislead, e.g. a folder with only a config.json ends in "install sentencepiece").
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(model_args):
    """The tokenizer of --tokenizer_name_or_path (else the model's), with a pad token."""
    path = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    tok = AutoTokenizer.from_pretrained(path, cache_dir=model_args.cache_dir,
                                        trust_remote_code=model_args.trust_remote_code)
    if tok.pad_token is None:
        # eos as pad is safe: pad positions are masked from attention and loss by the collators
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise ValueError(f"tokenizer {path} has no pad, eos or unk token; add one")
    return tok


def in_hub_cache(repo_id: str, cache_dir: Optional[str] = None) -> bool:
    """Whether a hub id's config.json is in the local hub cache (an invalid id is simply not cached)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir), str)
    except Exception:  # noqa: BLE001 - an invalid repo id raises; it is not cached either
        return False


def check_model_path(path: str, flag: str, *, weights: bool = True, tokenizer: bool = False,
                     cache_dir: Optional[str] = None) -> None:
    """UserError naming ``flag`` when ``path`` cannot be what it is passed as: missing (and not a
    cached hub id), a DeepSpeed training checkpoint instead of a Hugging Face folder, or a folder
    without weights (``weights``) or tokenizer files (``tokenizer``). Hub ids are left to transformers."""
    local = os.path.expanduser(path)
    if not os.path.exists(local):
        local_looking = path.startswith(("/", ".", "~")) or path.count("/") != 1
        if (local_looking or os.environ.get("HF_HUB_OFFLINE") == "1") and not in_hub_cache(path, cache_dir):
            raise PathNotFound(f"{flag} {path}: no such directory (and not in the hub cache)")
        return
    if not os.path.isdir(local):
        raise UserError(f"{flag} {path} is a file; pass the model folder")
    names = set(os.listdir(local))
    has_config = bool(names & {"config.json", "adapter_config.json"})
    if not has_config and any(n.endswith("_model_states.pt") for n in names):
        parent = os.path.dirname(os.path.normpath(local))
        export = f"the run's final export {parent}, or " if os.path.isfile(os.path.join(parent, "config.json")) else ""
        raise UserError(f"{flag} {path} is a DeepSpeed training checkpoint, not a Hugging Face model: pass {export}"
                        f"a folder converted with: python tools/zero_to_hf.py --checkpoint_dir {path} "
                        f"--output_dir {os.path.normpath(path)}-hf")
    if not has_config and ("latest" in names or any(n.startswith("checkpoint-") for n in names)):
        raise UserError(f"{flag} {path} holds DeepSpeed checkpoints but no Hugging Face export (the run did not "
                        f"finish?): convert the latest with: python tools/zero_to_hf.py --checkpoint_dir {path} "
                        f"--output_dir {os.path.normpath(path)}/hf")
    missing = []
    if weights and not has_config:
        missing.append("config.json")
    if weights and not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        missing.append("weights (model.safetensors, model-*-of-*.safetensors or pytorch_model.bin)")
    if tokenizer and not (names & set(TOKENIZER_FILES) or any(n.endswith((".tiktoken", ".model")) for n in names)):
        missing.append("tokenizer files (tokenizer.json, tokenizer_config.json or tokenizer.model; or pass "
                       "--tokenizer_name_or_path)")
    if missing:
        has = ", ".join(sorted(names)[:6]) + (" ..." if len(names) > 6 else "") if names else "nothing"
        raise UserError(f"{flag} {path} is not a complete model folder: no {' and no '.join(missing)} (it holds {has})")


def check_model_files(model_args) -> None:
    """Before any rank loads anything: the model and tokenizer folders of a training run are complete."""
    m = model_args
    if m.model_name_or_path:
        check_model_path(m.model_name_or_path, "--model_name_or_path", weights=True,
                         tokenizer=not m.tokenizer_name_or_path, cache_dir=m.cache_dir)
    if m.tokenizer_name_or_path:
        check_model_path(m.tokenizer_name_or_path, "--tokenizer_name_or_path", weights=False, tokenizer=True,
                         cache_dir=m.cache_dir)


def check_inference_model(args) -> None:
    """chat / serve / web_demo / evaluate: the --model_name_or_path, --adapter_name_or_path and
    --tokenizer_name_or_path they were given, before anything is loaded."""
    model, adapter, tok = args.model_name_or_path, args.adapter_name_or_path, args.tokenizer_name_or_path
    if adapter:
        check_model_path(adapter, "--adapter_name_or_path")
    if model:
        is_adapter = os.path.isfile(os.path.join(os.path.expanduser(model), "adapter_config.json"))
        adapter_tok = bool(adapter) and any(os.path.isfile(os.path.join(adapter, n)) for n in TOKENIZER_FILES)
        check_model_path(model, "--model_name_or_path", tokenizer=not (tok or is_adapter or adapter_tok))
    if tok:
        check_model_path(tok, "--tokenizer_name_or_path", weights=False, tokenizer=True)


def resolve_dtype(model_args, train_args) -> torch.dtype:
    if model_args.torch_dtype != "auto":
        return getattr(torch, model_args.torch_dtype)
    if train_args.bf16:
        return torch.bfloat16
    if train_args.fp16:
        return torch.float16
    return torch.float32


_warned_flash_attn = False


def resolve_attn_implementation(model_args) -> str:
    """The attention a run uses. ``--attn_implementation flash_attention_2`` where it cannot run is an
    error; MedicalGPT's ``--flash_attn True`` asks for it where available: without CUDA or flash-attn
    it warns once and uses sdpa, as MedicalGPT does."""
    global _warned_flash_attn
    have_fa = importlib.util.find_spec("flash_attn") is not None
    runnable = have_fa and dist.on_cuda()
    if model_args.attn_implementation == "flash_attention_2":
        if not runnable:
            raise UserError("flash_attention_2 needs a CUDA GPU and the flash-attn package "
                             "(pip install medgpt-ds[gpu]); use --attn_implementation sdpa")
        return "flash_attention_2"
    if model_args.flash_attn and model_args.attn_implementation == "auto":  # an explicit choice wins
        if runnable:
            return "flash_attention_2"
        if not _warned_flash_attn:
            why = "no CUDA device" if not dist.on_cuda() else "the flash-attn package is not installed"
            dist.print0(f"warning: --flash_attn True: flash_attention_2 cannot run here ({why}); using sdpa")
            _warned_flash_attn = True
        return "sdpa"
    if model_args.attn_implementation == "auto":
        return "flash_attention_2" if have_fa and dist.on_cuda() else "sdpa"
    return model_args.attn_implementation


def build_config(model_args, tokenizer) -> PretrainedConfig:
    """Config for from-scratch training: a preset name or a config.json path."""
    spec = model_args.model_config
    if spec in PRESETS:
        kw = dict(PRESETS[spec])
        model_type = kw.pop("model_type")
        config = AutoConfig.for_model(model_type, **kw)
    elif os.path.isfile(spec) or os.path.isdir(spec):
        path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
        with open(path) as f:
            kw = json.load(f)
        model_type = kw.pop("model_type", None)
        if model_type is None:
            raise UserError(f"--model_config {path} has no model_type")
        config = AutoConfig.for_model(model_type, **kw)
    else:
        raise UserError(f"--model_config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json path")
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    return config


def load_config(model_args, tokenizer) -> PretrainedConfig:
    """The config of the model a run trains (before loading weights): the from-scratch config or
    the pretrained checkpoint's own (a composite text + vision config stays composite)."""
    if model_args.model_config:
        return build_config(model_args, tokenizer)
    return AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir,
                                      revision=model_args.model_revision,
                                      trust_remote_code=model_args.trust_remote_code)


def is_composite(config) -> bool:
    """A text + vision checkpoint (``*ForConditionalGeneration``: Qwen3.5 as shipped, Gemma3 4B+,
    ...): its config nests a text config and a vision config."""
    return (config is not None and getattr(config, "vision_config", None) is not None
            and hasattr(config, "get_text_config") and config.get_text_config() is not config)


def _composite_class(config):
    """The class that loads a composite checkpoint whole (None when transformers has none for it).
    AutoModelForCausalLM would build the text part only for some (Qwen3.5 -> Qwen3_5ForCausalLM)
    and an export of that would lose the vision tower."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    auto_map = getattr(config, "auto_map", None) or {}
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or "AutoModelForImageTextToText" in auto_map:
        return AutoModelForImageTextToText
    return None


def freeze_outside_language_model(model) -> tuple[int, int]:
    """Text training on a composite model: only the language model (with its embeddings) and the
    heads outside the base model (LM head, score head) train; the vision tower and projector are
    frozen, so they are exported exactly as loaded (AdamW's decoupled weight decay would shrink them
    even without gradients). Returns (trainable, frozen) parameter counts."""
    inner = {id(p) for p in model.base_model.parameters()}
    keep = {id(p) for p in model.get_decoder().parameters()} | {id(p) for p in model.parameters() if id(p) not in inner}
    counts = [0, 0]
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if id(p) in keep:
            counts[0] += n
        else:
            p.requires_grad_(False)
            counts[1] += n
    return counts[0], counts[1]


@contextmanager
def zero3_init(ds_config: dict):
    """Under ZeRO-3, register ``ds_config`` with transformers for the duration of the block, so
    from_pretrained / from_config build the model under deepspeed.zero.Init (no rank ever holds the
    whole model) and resizing and peft gather partitioned weights. transformers keeps only a weakref:
    the local name keeps the config alive exactly as long as the block runs."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    # here, not at the top: HfDeepSpeedConfig imports DeepSpeed and checks accelerate (ZeRO-3 only)
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_ds_config = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_ds_config


def load_model(model_args, train_args, lora_args, tokenizer, ds_config: dict, *, model_cls=AutoModelForCausalLM,
               extra_config: Optional[dict] = None, peft_task_type: str = "CAUSAL_LM"):
    """Load (or build from a config) the model to train, with LoRA/QLoRA and checkpointing applied,
    ZeRO-3 partitioned as ``ds_config`` says (zero.Init). ``model_cls`` is AutoModelForCausalLM (a
    composite text + vision checkpoint loads whole, its vision tower frozen),
    AutoModelForSequenceClassification for reward models (extra_config num_labels=1) or
    ``value_model_class`` for the PPO critic; ``extra_config`` holds config attributes to set (or
    ``config``: the config to load with).
    """
    with zero3_init(ds_config):
        return _load_model(model_args, train_args, lora_args, tokenizer, ds_config, model_cls, extra_config,
                           peft_task_type)


def _load_model(model_args, train_args, lora_args, tokenizer, ds_config: dict, model_cls, extra_config: Optional[dict],
                peft_task_type: str):
    dtype = resolve_dtype(model_args, train_args)
    attn = resolve_attn_implementation(model_args)
    quant = None
    if model_args.load_in_4bit or model_args.load_in_8bit:
        if ds_config.get("zero_optimization", {}).get("stage") == 3:
            raise UserError("QLoRA / 4-bit / 8-bit loading is not supported with ZeRO-3 (quantized weights "
                             "cannot be partitioned); use ds_configs/zero2.json or zero2_offload.json")
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=model_args.load_in_4bit, load_in_8bit=model_args.load_in_8bit,
            bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.float32)
    if model_args.model_config:
        config = build_config(model_args, tokenizer)
        for k, v in (extra_config or {}).items():
            setattr(config, k, v)
        torch.manual_seed(train_args.seed)  # identical random init on every rank
        model = model_cls.from_config(config, attn_implementation=attn, dtype=dtype)
    else:
        if not os.path.isdir(model_args.model_name_or_path):
            dist.print0(f"loading {model_args.model_name_or_path} from the hub cache / hub (not a local dir)")
        extra = dict(extra_config or {})
        config = extra.pop("config", None) or load_config(model_args, tokenizer)
        for k, v in extra.items():  # on the config object: a composite config rejects unknown kwargs
            setattr(config, k, v)
        if model_cls is AutoModelForCausalLM:
            model_cls = _composite_class(config) or model_cls
        model = model_cls.from_pretrained(
            model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir,
            revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code, dtype=dtype,
            attn_implementation=attn, quantization_config=quant)
    if ds_config.get("zero_optimization", {}).get("stage") == 3 and "_weight_conversions" in vars(model):
        # transformers' ZeRO-3 loader records every weight conversion of the model type, applied or not
        # (its plain loader records the applied ones), and save_pretrained reverts them all: a Qwen3.5
        # export came out as model.language_model.model.language_model.*. Without the record,
        # save_pretrained writes the type's own hub layout (per-expert MoE weights included).
        del model._weight_conversions
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        resize_for_tokenizer(model, tokenizer, model_args, ds_config)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # packed batches need it off (docs/architecture.md); generation turns it back on
    if is_composite(model.config) and hasattr(model, "get_decoder"):
        trainable, frozen = freeze_outside_language_model(model)
        dist.print0(f"{type(model).__name__}: text training on the language model ({trainable:,} parameters); the "
                    f"vision tower and projector ({frozen:,}) stay frozen and are exported unchanged")

    if train_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train_args.gradient_checkpointing)
    if lora_args.use_peft:
        model = apply_lora(model, lora_args, peft_task_type)
        if train_args.gradient_checkpointing:
            model.enable_input_require_grads()
    if train_args.neft_alpha > 0:
        add_neftune(model, train_args.neft_alpha)
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        blocks = register_moe_leaf_modules(model)
        if blocks:
            dist.print0(f"ZeRO-3: MoE blocks {', '.join(blocks)} are leaf modules (each gathered whole before it runs)")
    return model


_VALUE_CLASSES: dict = {}


def value_model_class(config):
    """The PPO critic's class for ``config``: a per-token value head (one label) on the base model.

    transformers' own token classifier where it has one; for model types it lacks one for
    (``qwen3_5_text``, ``gemma3_text``, the ``gemma3`` composite, ...) the same head
    (``GenericForTokenClassification``: the base model + a linear ``score``) built on the model's
    own base class, so it loads from a causal LM or reward model checkpoint (the base weights, and
    the reward model's ``score`` head), shards under zero.Init and saves like any transformers model.
    """
    from transformers import AutoModel, AutoModelForTokenClassification, PreTrainedModel
    from transformers.modeling_layers import GenericForTokenClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES

    auto_map = getattr(config, "auto_map", None) or {}
    if config.model_type in MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES or "AutoModelForTokenClassification" in auto_map:
        return AutoModelForTokenClassification
    if type(config) not in _VALUE_CLASSES:
        try:
            base = AutoModel._model_mapping[type(config)]
        except KeyError:
            raise UserError(f"no value head for model type {config.model_type!r}: transformers has no base model "
                            "class for it; pass --critic_model_path with a token classifier")
        pretrained = next(c for c in base.__mro__[1:] if issubclass(c, PreTrainedModel))
        name = base.__name__.removesuffix("Model") + "ForTokenClassification"
        _VALUE_CLASSES[type(config)] = type(name, (GenericForTokenClassification, pretrained), {"__module__": __name__})
    return _VALUE_CLASSES[type(config)]


def resize_for_tokenizer(model, tokenizer, model_args, ds_config: dict) -> None:
    """The tokenizer was extended with domain vocabulary: grow the embeddings. New rows start as the
    mean of the embeddings of the pieces the base tokenizer splits each new token into (outside
    ZeRO-3); under ZeRO-3 transformers gathers and resizes with mean initialisation."""
    old = model.get_input_embeddings().num_embeddings
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        dist.print0(f"resized embeddings {old} -> {len(tokenizer)} (mean init, ZeRO-3)")
        return
    from medgpt_ds.tokenizer import resize_embeddings_for

    base_tok = None
    if model_args.tokenizer_name_or_path and model_args.model_name_or_path:
        try:
            base_tok = AutoTokenizer.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir,
                                                     trust_remote_code=model_args.trust_remote_code)
        except (OSError, ValueError):
            base_tok = None  # the model dir ships no tokenizer: transformers' mean init
    info = resize_embeddings_for(model, tokenizer, base_tok)
    dist.print0(f"resized embeddings {info['old']} -> {info['new']} for the extended tokenizer "
                f"({info['from_pieces']} new rows initialised from their base-tokenizer pieces)")


# Output heads never get LoRA from `all` (a classifier head is trained in full via modules_to_save).
_HEADS = {"lm_head", "score", "v_head", "value_head", "output", "classifier"}
_LINEAR_CLASSES = ("Linear4bit", "Linear8bitLt")


def _shape(p: torch.nn.Parameter) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partitioned parameter keeps its shape in ds_shape


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in _LINEAR_CLASSES


def _kind(name: str) -> str:
    """attention / MLP / experts / shared experts / other, from a module or parameter path."""
    parts = name.split(".")
    if any(p.startswith("shared_expert") or p == "shared_mlp" for p in parts):
        return "shared experts"
    if any(p.endswith("experts") for p in parts):
        return "experts"
    if any("attn" in p or "attention" in p for p in parts):
        return "attention"
    if any(p in ("mlp", "feed_forward", "ffn") or p.endswith("mlp") for p in parts):
        return "MLP"
    return "other"


def language_model_prefix(model) -> str:
    """Module path of the language model inside a composite (text + vision) model, '' otherwise."""
    if not is_composite(getattr(model, "config", None)):
        return ""
    decoder = model.get_decoder()
    return next(n for n, m in model.named_modules() if m is decoder)


@dataclass
class LoraTargets:
    """What LoRA adapts: linear modules and stacked expert weights (peft ``target_parameters``), by
    full name, and a per-kind count for the log."""

    modules: list[str]
    parameters: list[str]
    routers: list[str]

    def summary(self) -> str:
        by_kind: dict[str, list[str]] = {}
        for name in self.modules + self.parameters:
            by_kind.setdefault(_kind(name), []).append(name)
        parts = []
        for kind in ("attention", "MLP", "experts", "shared experts", "other"):
            names = by_kind.get(kind, [])
            if names:
                leaves = " ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
                what = "stacked expert weights" if kind == "experts" and set(names) <= set(self.parameters) else ""
                parts.append(f"{kind} {len(names)}{' ' + what if what else ''} ({leaves})")
        if self.routers:
            parts.append(f"{len(self.routers)} MoE routers left frozen")
        return ", ".join(parts)


def lora_targets(model, spec: str) -> LoraTargets:
    """Resolve --target_modules to full module / parameter names of the language model.

    ``all``: every linear layer (attention, MLP, shared experts, experts that are separate modules)
    and every stacked expert weight (transformers 5 stores a MoE layer's experts as 3-D parameters,
    reached with peft's ``target_parameters``), except output heads and MoE routers (the linear
    layers beside ``experts`` in a MoE block). A comma list names leaves (``q_proj,v_proj``) and
    takes linear layers and stacked expert weights of those names. In a composite text + vision
    model only the language model is targeted.
    """
    prefix = language_model_prefix(model)
    names = None if spec in ("all", "all-linear") else {s.strip() for s in spec.split(",") if s.strip()}
    modules, parameters, routers, linear, experts = [], [], [], set(), set()
    moe_blocks = {n for n, m in model.named_modules() if isinstance(getattr(m, "experts", None), torch.nn.Module)}
    for name, module in model.named_modules():
        if prefix and not name.startswith(prefix + "."):
            continue
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        # a MoE block's children besides its experts and shared experts route tokens (gate, router,
        # shared_expert_gate: a linear layer in transformers-4-style models, a custom module in 5)
        is_router = (parent in moe_blocks and leaf != "experts" and not leaf.startswith("shared_expert")
                     and any(True for _ in module.parameters()))
        if is_router and names is None:
            routers.append(name)
        elif _is_linear(module):
            if leaf not in _HEADS:
                linear.add(leaf)
            if leaf in names if names is not None else leaf not in _HEADS:
                modules.append(name)
        if isinstance(module, torch.nn.modules.conv._ConvNd) or "expert" not in leaf:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if len(_shape(p)) == 3:
                experts.add(pname)
                if names is None or pname in names:
                    parameters.append(f"{name}.{pname}")
    if names is not None:
        missing = sorted(names - {n.rsplit(".", 1)[-1] for n in modules + parameters})
        if missing:
            # peft fails only when nothing matches and silently skips the rest: name both cases
            msg = (f"--target_modules {spec}: {', '.join(missing)} not found in {type(model).__name__}; its linear "
                   f"layers are {', '.join(sorted(linear))}"
                   + (f" and its stacked expert weights {', '.join(sorted(experts))}" if experts else "")
                   + " (or pass --target_modules all)")
            if not modules and not parameters:
                raise UserError(msg)
            dist.print0(f"warning: {msg}; LoRA goes on the others")
    if not modules and not parameters:
        raise UserError("--target_modules all found no linear layers in this model")
    return LoraTargets(modules, parameters, routers)


@contextmanager
def v5_native_peft():
    """Let peft build or load LoRA on exactly the transformers-5 names it is given.

    peft <= 0.21.2 rewrites targets named like transformers-4 MoE projections (``gate_proj``,
    ``up_proj``, ``down_proj``, ``gate``) into targets on the stacked experts for every
    qwen2_moe-style model (DeepSeek-V2/V3, Qwen3-MoE, GLM4-MoE, ...; peft issue #3711), so shared
    experts and dense MLPs silently lose their LoRA. Our targets are already transformers-5 module
    and parameter names: switch that rewrite off while peft builds or loads them.
    """
    try:
        from peft.utils import transformers_weight_conversion as twc
    except ImportError:  # peft without the transformers-5 conversion: nothing to switch off
        yield
        return
    original = twc.convert_peft_config_for_transformers
    twc.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        twc.convert_peft_config_for_transformers = original


def load_adapter(model, path: str, is_trainable: bool = False, **kwargs):
    """``PeftModel.from_pretrained`` for adapters this trainer wrote (exact transformers-5 names: see
    ``v5_native_peft``); an adapter written by transformers-4-era peft (no target_parameters and
    targets that are not linear layers of this model) keeps peft's own renaming."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(path)
    targets = getattr(config, "target_modules", None) or []
    names = {n for n, m in model.named_modules() if _is_linear(m)}
    native = bool(getattr(config, "target_parameters", None)) or (
        not isinstance(targets, str) and all(t in names or any(n.endswith("." + t) for n in names) for t in targets))
    with v5_native_peft() if native else nullcontext():
        return PeftModel.from_pretrained(model, path, is_trainable=is_trainable, **kwargs)


def apply_lora(model, lora_args, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig, get_peft_model

    if lora_args.peft_path:
        dist.print0(f"continuing LoRA adapter from {lora_args.peft_path}")
        return load_adapter(model, lora_args.peft_path, is_trainable=True)
    modules_to_save = [s.strip() for s in lora_args.modules_to_save.split(",")] if lora_args.modules_to_save else None
    targets = lora_targets(model, lora_args.target_modules)
    dist.print0(f"LoRA targets (--target_modules {lora_args.target_modules}): {targets.summary()}")
    dropout = lora_args.lora_dropout
    if targets.parameters and dropout:
        # peft's parameter LoRA cannot apply dropout to the input of a stacked expert weight
        dist.print0(f"LoRA: dropout {dropout} on the linear layers, 0 on the {len(targets.parameters)} stacked "
                    "expert weights (peft's parameter LoRA has no input dropout)")
    config = LoraConfig(
        task_type=task_type, r=lora_args.lora_rank, lora_alpha=lora_args.lora_alpha,
        lora_dropout=0.0 if targets.parameters else dropout, target_modules=targets.modules or None,
        target_parameters=targets.parameters or None, modules_to_save=modules_to_save)
    with v5_native_peft():
        model = get_peft_model(model, config)
    if targets.parameters and dropout:
        from peft.tuners.lora import LoraLayer, ParamWrapper

        for module in model.modules():
            if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
                for adapter in module.lora_dropout:
                    module.lora_dropout[adapter] = torch.nn.Dropout(p=dropout)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    dist.print0(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)")
    return model


def register_moe_leaf_modules(model) -> list[str]:
    """ZeRO-3: make every MoE block whose experts are separate modules (an ``experts`` ModuleList, as
    in transformers-4-style and remote-code MoE models) a DeepSpeed leaf module, gathered whole before
    it runs. Ranks route their tokens to different experts, so each rank would otherwise gather a
    different set of expert parameters and the collectives mismatch (a hang on NCCL).
    transformers-5 stacked experts are one module with 3-D weights, gathered whole anyway. Call
    before deepspeed.initialize. Returns the block class names."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = {type(m) for m in model.modules()
               if isinstance(getattr(m, "experts", None), (torch.nn.ModuleList, torch.nn.ModuleDict))}
    if classes:
        set_z3_leaf_modules(model, sorted(classes, key=lambda c: c.__name__))
    return sorted(c.__name__ for c in classes)


def add_neftune(model, alpha: float) -> None:
    """NEFTune (arXiv:2310.05914): uniform noise alpha/sqrt(L*d) on input embeddings while training."""
    emb = model.get_input_embeddings()

    def hook(module, inputs, output):
        if module.training:
            dims = output.size(1) * output.size(2)
            mag = alpha / dims ** 0.5
            output = output + torch.zeros_like(output).uniform_(-mag, mag)
        return output

    emb.register_forward_hook(hook)


def count_parameters(model) -> int:
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
