"""Tiny random models of every model family users bring, built from transformers' own config classes.

Shared by the `families` tier (tests/test_families*.py) and the scripts it launches on 2 ranks. Each
family is small (hidden 32-64, 2 layers) but keeps what makes it different: tied embeddings (qwen2),
stacked MoE experts and a router (qwen3_moe), shared experts and a dense first layer (deepseek_v3),
Gated DeltaNet linear-attention layers (qwen3_5), a vision tower beside the language model (the
qwen3_5 composite as shipped), a sliding window shorter than the samples (gemma3), fused projections
(phi3, glm4).
"""
from __future__ import annotations

import torch

# text families: name -> (config class path, kwargs); vocab, pad and eos come from the caller
_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_COMMON)),
    "qwen2": ("Qwen2Config", dict(_COMMON, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(_COMMON, head_dim=8)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_COMMON, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, norm_topk_prob=True)),
    "qwen3_5_text": ("Qwen3_5TextConfig", dict(_COMMON, head_dim=8, layer_types=["linear_attention", "full_attention"],
                                               linear_key_head_dim=8, linear_value_head_dim=8,
                                               linear_num_key_heads=2, linear_num_value_heads=4)),
    "gemma3_text": ("Gemma3TextConfig", dict(_COMMON, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                                             layer_types=["sliding_attention", "full_attention"])),
    "mistral": ("MistralConfig", dict(_COMMON, head_dim=8, sliding_window=None)),
    "phi3": ("Phi3Config", dict(_COMMON, pad_token_id=0)),
    "glm4": ("Glm4Config", dict(_COMMON, head_dim=8)),
    "deepseek_v3": ("DeepseekV3Config", dict(_COMMON, moe_intermediate_size=32, n_routed_experts=4,
                                             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                                             n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                             num_key_value_heads=4)),
}
# text + vision checkpoints as shipped: Qwen3.5 (Qwen3_5ForConditionalGeneration) and Gemma3 4B+
# (Gemma3ForConditionalGeneration), each with a tiny vision tower beside the family's text model
COMPOSITES = ("qwen3_5", "gemma3")
ALL = tuple(FAMILIES) + COMPOSITES


def make_config(name: str, vocab_size: int, pad_token_id: int | None = None, eos_token_id: int | None = None,
                attn_implementation: str = "sdpa"):
    """The tiny config of family ``name`` (a key of FAMILIES, or a composite in COMPOSITES)."""
    import transformers

    ids = dict(vocab_size=vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None)
    if name == "qwen3_5":
        cls_name, kw = FAMILIES["qwen3_5_text"]
        text = dict(kw, **ids)
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=16)
        config = transformers.Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=vocab_size - 1,
                                            video_token_id=vocab_size - 2, vision_start_token_id=vocab_size - 3,
                                            vision_end_token_id=vocab_size - 4)
    elif name == "gemma3":
        text = dict(FAMILIES["gemma3_text"][1], **ids)
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=16, patch_size=4)
        config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                           image_token_index=vocab_size - 1, boi_token_index=vocab_size - 2,
                                           eoi_token_index=vocab_size - 3)
    else:
        cls_name, kw = FAMILIES[name]
        config = getattr(transformers, cls_name)(**dict(kw, **ids))
    config._attn_implementation = attn_implementation
    return config


def make_model(name: str, vocab_size: int, seed: int = 0, **kw):
    """A randomly initialised causal LM of family ``name`` (float32, eval mode); a composite is its
    ``*ForConditionalGeneration`` (text + vision)."""
    import transformers

    config = make_config(name, vocab_size, **kw)
    torch.manual_seed(seed)
    if name in COMPOSITES:
        model = transformers.AutoModelForImageTextToText.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    # random init leaves norms at 1 and biases at 0: perturb every parameter so a wrong mask, a
    # dropped weight or a wrong mapping shows up in the logits
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        for m in model.modules():
            if hasattr(m, "A_log"):  # Gated DeltaNet: slow decay, so state that leaks across samples shows
                m.A_log.copy_(torch.log(torch.empty(m.A_log.shape).uniform_(0.01, 0.1, generator=g)))
    return model.eval()


# A remote-code MoE model (``--trust_remote_code``) whose experts are separate modules, as in
# transformers 4 and most hub MoE code: a Llama with a top-1 routed MoE MLP that runs only the
# experts its tokens chose. Ranks with different tokens call different experts.
REMOTE_MOE_CODE = '''
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP


class TinyMoeConfig(LlamaConfig):
    model_type = "tiny_moe"

    def __init__(self, num_local_experts=16, **kwargs):
        self.num_local_experts = num_local_experts
        super().__init__(**kwargs)


class TinyMoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList(LlamaMLP(config) for _ in range(config.num_local_experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        probs = self.gate(flat).softmax(-1)
        weight, choice = probs.max(-1)
        out = torch.zeros_like(flat)
        for e in choice.unique().tolist():
            rows = choice == e
            out[rows] = weight[rows, None] * self.experts[e](flat[rows])
        return out.reshape(x.shape)


class TinyMoeForCausalLM(LlamaForCausalLM):
    config_class = TinyMoeConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = TinyMoeBlock(config)
        self.post_init()
'''


def save_remote_moe(out_dir: str, tokenizer, seed: int = 0) -> str:
    """Write the remote-code MoE (config, weights, modeling code with auto_map) and the tokenizer."""
    import importlib.util
    import os
    import sys

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "modeling_tiny_moe.py")
    with open(path, "w") as f:
        f.write(REMOTE_MOE_CODE)
    spec = importlib.util.spec_from_file_location("modeling_tiny_moe", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["modeling_tiny_moe"] = mod
    spec.loader.exec_module(mod)
    config = mod.TinyMoeConfig(**dict(_COMMON, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None))
    config.auto_map = {"AutoConfig": "modeling_tiny_moe.TinyMoeConfig",
                       "AutoModelForCausalLM": "modeling_tiny_moe.TinyMoeForCausalLM"}
    torch.manual_seed(seed)
    model = mod.TinyMoeForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with open(path, "w") as f:  # save_pretrained may have copied or dropped the code file
        f.write(REMOTE_MOE_CODE)
    return out_dir
