"""Tokenizer and model loading: pretrained dirs or from-scratch configs, attention choice,
LoRA / QLoRA, gradient checkpointing, NEFTune, and ZeRO-3-safe construction (zero.Init).
"""
from __future__ import annotations

import importlib.util
import json
import os
from contextlib import contextmanager
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


def resolve_attn_implementation(model_args) -> str:
    have_fa = importlib.util.find_spec("flash_attn") is not None
    if model_args.flash_attn or model_args.attn_implementation == "flash_attention_2":
        if not (have_fa and dist.on_cuda()):
            raise UserError("flash_attention_2 needs a CUDA GPU and the flash-attn package "
                             "(pip install medgpt-ds[gpu]); use --attn_implementation sdpa")
        return "flash_attention_2"
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
    ZeRO-3 partitioned as ``ds_config`` says (zero.Init). ``model_cls`` is AutoModelForCausalLM or,
    for reward models, AutoModelForSequenceClassification (with extra_config num_labels=1).
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
        model = model_cls.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
            trust_remote_code=model_args.trust_remote_code, dtype=dtype, attn_implementation=attn,
            quantization_config=quant, **(extra_config or {}))
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        resize_for_tokenizer(model, tokenizer, model_args, ds_config)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # packed batches need it off (docs/architecture.md); generation turns it back on

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
    return model


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


def lora_target_modules(model, spec: str) -> list[str]:
    """``all`` -> every nn.Linear (or bnb linear) name except the output head(s)."""
    if spec != "all":
        return [s.strip() for s in spec.split(",") if s.strip()]
    names = set()
    heads = {"lm_head", "score", "v_head", "value_head", "output"}
    for name, module in model.named_modules():
        cls = type(module).__name__
        if isinstance(module, torch.nn.Linear) or cls in ("Linear4bit", "Linear8bitLt"):
            leaf = name.split(".")[-1]
            if leaf not in heads:
                names.add(leaf)
    if not names:
        raise UserError("--target_modules all found no linear layers in this model")
    return sorted(names)


def apply_lora(model, lora_args, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig, PeftModel, get_peft_model

    if lora_args.peft_path:
        dist.print0(f"continuing LoRA adapter from {lora_args.peft_path}")
        return PeftModel.from_pretrained(model, lora_args.peft_path, is_trainable=True)
    modules_to_save = [s.strip() for s in lora_args.modules_to_save.split(",")] if lora_args.modules_to_save else None
    targets = lora_target_modules(model, lora_args.target_modules)
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        # peft fails only when none matches and silently skips the others: name both cases
        linear = ", ".join(lora_target_modules(model, "all"))
        msg = (f"--target_modules {lora_args.target_modules}: {', '.join(missing)} not found in "
               f"{type(model).__name__}; its linear layers are {linear} (or pass --target_modules all)")
        if len(missing) == len(targets):
            raise UserError(msg)
        dist.print0(f"warning: {msg}; LoRA goes on the others")
    config = LoraConfig(
        task_type=task_type, r=lora_args.lora_rank, lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout, target_modules=targets, modules_to_save=modules_to_save)
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    dist.print0(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)")
    return model


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
