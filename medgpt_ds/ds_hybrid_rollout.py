"""--rollout_backend ds_hybrid: DeepSpeed's Hybrid Engine (the actor's ``hybrid_engine`` block).

Inside ``engine.generate`` the engine swaps its training layout for fused inference containers.
CUDA only, for the old decoder layouts DeepSpeed has containers for, without PEFT adapters: the
``check`` hook refuses everything else before any model is loaded. Opt-in; "hybrid" is the default.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

from deepspeed.runtime.hybrid_engine import DeepSpeedHybridEngine

from medgpt_ds import dist
from medgpt_ds.engine import DSConfigError
from medgpt_ds.generation import DEFAULT_WAY_OUT, HFBackend, SamplingParams

# Decoder families DeepSpeed's Hybrid Engine has inference containers for (old layouts only).
DS_HYBRID_MODEL_TYPES = ("opt", "bloom", "gpt_neox", "llama")


class DSHybridBackend(HFBackend):
    """Rollouts through ``engine.generate`` of a DeepSpeedHybridEngine (it gathers and fuses by itself)."""

    def __init__(self, engine, tokenizer, params: SamplingParams, *, zero3: bool, args=None):
        if not isinstance(engine, DeepSpeedHybridEngine):
            raise RuntimeError("--rollout_backend ds_hybrid needs the actor built with a hybrid_engine block "
                               "(DSHybridBackend.patch_ds_config)")
        batch_size: Optional[int] = getattr(args, "generation_batch_size", None)
        super().__init__(engine, tokenizer, params, zero3=zero3, gather=False, batch_size=batch_size)
        self.synced_gpus = zero3 and dist.world_size() > 1

    @staticmethod
    def check(*, model_type: Optional[str], device_type: str, use_peft: bool) -> None:
        """Refuse what the Hybrid Engine cannot run (DSConfigError, with the way out)."""
        if device_type != "cuda":
            raise DSConfigError(f"--rollout_backend ds_hybrid: DeepSpeed's Hybrid Engine has CUDA kernels only and "
                                f"fails on the {device_type} backend ('not implemented on CPU backend'); {DEFAULT_WAY_OUT}")
        if model_type not in DS_HYBRID_MODEL_TYPES:
            raise DSConfigError(f"--rollout_backend ds_hybrid: DeepSpeed's Hybrid Engine has no inference container for "
                                f"model_type {model_type!r} (only {', '.join(DS_HYBRID_MODEL_TYPES)}); {DEFAULT_WAY_OUT}")
        if use_peft:
            raise DSConfigError(f"--rollout_backend ds_hybrid: the Hybrid Engine fuses only its own LoRA layers, not "
                                f"PEFT adapters; {DEFAULT_WAY_OUT}")

    @staticmethod
    def patch_ds_config(ds_config: dict, max_tokens: int) -> None:
        """The ``hybrid_engine`` block of the actor's DeepSpeed config (prompt + response tokens)."""
        ds_config["hybrid_engine"] = {"enabled": True, "max_out_tokens": max_tokens, "inference_tp_size": 1,
                                      "release_inference_cache": False, "pin_parameters": True,
                                      "tp_gather_partition_size": 8}

    def _context(self):
        return nullcontext(self.engine)  # engine.generate gathers and fuses by itself

    def _generate(self, model, ids, mask):
        try:
            return super()._generate(model, ids, mask)
        except Exception as e:  # noqa: BLE001 - re-raised with the way out
            raise RuntimeError(f"DeepSpeed Hybrid Engine generation failed ({type(e).__name__}: {e}); its inference "
                               "kernels lag current transformers. Use --rollout_backend hybrid (the default).") from e
