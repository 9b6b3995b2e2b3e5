"""The one generation layer: rollouts of the RL stages (ppo, grpo) and serving (chat, serve, web
demo, evaluate) sample through it.

- ``SamplingParams``: how to sample, with the model's stop token ids and stop strings resolved;
- ``Generation``: what every backend returns (prompts left-padded, responses right-padded, masks);
- ``GenerationBackend``: the protocol of a backend (``generate`` / ``update_weights`` / ``close``);
- ``StopCriterion``: the one stopping rule (stop ids, stop strings, a cancellation event), checked
  after every token; ``cut_at_stop`` cuts answer text at a stop string;
- ``HFBackend``: ``model.generate`` on a module or a DeepSpeed engine, with the ZeRO-3 variants
  "hybrid" (shards gathered once per call) and "per_token" (gathered by ZeRO-3's hooks every step);
- ``BACKENDS``: ``--rollout_backend`` name -> the factory that builds it, one line per backend.

A new backend is one file, ``medgpt_ds/<name>_rollout.py``, with a class that implements
``GenerationBackend`` and is built as ``Cls(engine, tokenizer, params, *, zero3, args)``, plus its
line in ``BACKENDS`` (docs/architecture.md). ``stop_at_end_of_turn`` is the one routine that makes a
saved ``generation_config`` stop at the chat template's end of turn (trainer export and conversion).
"""

from __future__ import annotations

import importlib
import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch
from transformers import StoppingCriteria

from medgpt_ds import dist
from medgpt_ds.data.templates import turn_terminators
from medgpt_ds.errors import UserError

# --rollout_backend name -> "module:factory". A factory is called as
# factory(engine, tokenizer, params, zero3=..., args=RolloutArguments or None) and returns a
# GenerationBackend. It may carry two optional hooks, both called before any model is loaded:
# check(model_type=, device_type=, use_peft=) raises UserError for a setup it cannot run, and
# patch_ds_config(ds_config, max_tokens) adds what the actor's DeepSpeed config needs. A factory or
# check hook that declares a ``cfg`` keyword also gets the run's RunConfig (output dir, lengths, seed).
BACKENDS = {
    "hybrid": "medgpt_ds.generation:hybrid",
    "per_token": "medgpt_ds.generation:per_token",
    "ds_hybrid": "medgpt_ds.ds_hybrid_rollout:DSHybridBackend",
    "vllm": "medgpt_ds.vllm_rollout:VLLMBackend",
}
DEFAULT_WAY_OUT = ("use --rollout_backend hybrid (the default: ZeRO-3 shards gathered once per rollout, KV-cached "
                   "generate)")


@dataclass
class SamplingParams:
    """How responses are sampled; ``stop_token_ids`` (eos, end-of-turn) and ``stop_strings`` end a response."""

    max_new_tokens: int
    pad_token_id: int
    stop_token_ids: list[int]
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: list[str] = field(default_factory=list)
    repetition_penalty: float = 1.0

    def generate_kwargs(self) -> dict:
        """Keyword arguments of ``model.generate`` (temperature 0: greedy; KV cache on)."""
        kw = {"max_new_tokens": self.max_new_tokens, "pad_token_id": self.pad_token_id,
              "eos_token_id": list(self.stop_token_ids) or None, "use_cache": True}
        if self.repetition_penalty != 1.0:
            kw["repetition_penalty"] = self.repetition_penalty
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    @property
    def logit_temperature(self) -> float:
        """The temperature log-probs are scored at (the sampling one; 1 for greedy)."""
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class Generation:
    """One batch of generations on one rank: prompts left-padded to P tokens, responses right-padded to R.

    ``response_mask`` marks the response tokens up to and including the one that ended it (a stop
    token, or the last token of a stop string); ``has_eos`` is False for rows cut at max_new_tokens
    (or cancelled). ``logprobs`` are the sampled tokens' log-probs as the engine reports them (None
    for the HF backends: the stages score them); ``weight_version`` is the ``update_weights`` step the
    generating weights came from (-1: the trained engine's own, always current).
    """

    sequences: torch.Tensor  # (B, P + R)
    prompt_mask: torch.Tensor  # (B, P) bool
    response_mask: torch.Tensor  # (B, R) bool
    has_eos: torch.Tensor  # (B,) bool
    steps: int = 0  # decoding steps this rank ran (differs across ranks; logged)
    logprobs: Optional[torch.Tensor] = None  # (B, R) float, zero where masked
    weight_version: int = -1

    @property
    def prompt_length(self) -> int:
        return self.prompt_mask.size(1)

    @property
    def response_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]  # (B, R)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1).long()  # (B, P + R)

    @property
    def position_ids(self) -> torch.Tensor:
        # positions count attended tokens only, so left padding does not shift them
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P + R)

    def __len__(self) -> int:
        return self.sequences.size(0)

    def select(self, idx) -> Generation:
        """The rows ``idx`` (a slice, list or tensor of row indices)."""
        return Generation(self.sequences[idx], self.prompt_mask[idx], self.response_mask[idx], self.has_eos[idx],
                          self.steps, None if self.logprobs is None else self.logprobs[idx], self.weight_version)

    def responses(self) -> list[list[int]]:
        """The valid response ids of each row."""
        return [row[m].tolist() for row, m in zip(self.response_ids, self.response_mask)]


class GenerationBackend(Protocol):
    """What ppo, grpo and serving need from a generation engine."""

    def generate(self, prompts: list[list[int]]) -> Generation:
        """Responses to ``prompts`` (token ids, no padding), rows in the order given. Collective for
        the ZeRO-3 HF backends: every rank calls it once per rollout."""

    def update_weights(self, step: int) -> None:
        """Called by ppo/grpo after every optimizer step of the actor (``step``: the actor's optimizer
        step count). A backend holding its own copy of the weights syncs them (it may defer that to
        its next ``generate``) and reports ``step`` as ``Generation.weight_version``; a no-op for the
        HF backends, which generate with the engine's own weights."""

    def close(self) -> None:
        """Release what the backend holds (servers, memory); called once when the run ends."""


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, P), mask (B, P) bool) with every prompt right-aligned at P = the longest prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = True
    return ids.to(device), mask.to(device)


class StopCriterion(StoppingCriteria):
    """The stopping rule of every HF generation. A row ends at a stop token or at the token whose
    decoded tail completes a stop string, and the criterion records how many tokens it had then
    (generate pads after that, and pad may equal eos). ``cancel`` (a ``threading.Event``) is checked
    after every token: once set, every row ends at the next token, so a consumer that went away
    stops a running generation without waiting for it to finish. ``on_token`` (no arguments), when
    given, is called after every token too: the serving watchdog's sign of progress."""

    def __init__(self, tokenizer, prompt_length: int, stop_ids: list[int], stop_strings: list[str], batch: int,
                 device, cancel=None, on_token=None):
        self.tokenizer, self.prompt_length, self.cancel, self.on_token = tokenizer, prompt_length, cancel, on_token
        self.stop_ids = torch.tensor(stop_ids or [-1], device=device)
        self.stop_strings = list(stop_strings)
        # a stop string spans at most this many tokens (byte-level pieces can be < 1 char)
        self.window = 4 * max((len(s.encode()) for s in self.stop_strings), default=0) + 4
        self.end = torch.full((batch,), -1, dtype=torch.long, device=device)  # (B,), -1: still running

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        n = input_ids.size(1) - self.prompt_length  # tokens generated so far
        hit = torch.isin(input_ids[:, -1], self.stop_ids)  # (B,)
        if self.stop_strings:
            for i in (self.end < 0).nonzero().flatten().tolist():
                tail = self.tokenizer.decode(input_ids[i, max(self.prompt_length, input_ids.size(1) - self.window):])
                if any(s in tail for s in self.stop_strings):
                    hit[i] = True
        self.end = torch.where(hit & (self.end < 0), n, self.end)
        if self.on_token is not None:
            self.on_token()
        if self.cancel is not None and self.cancel.is_set():
            return torch.ones_like(hit)
        return self.end >= 0


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string in it, and whether one was found."""
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _zero3_offload(engine):
    opt = getattr(engine, "optimizer", None)
    if opt is None:
        raise RuntimeError("gathering ZeRO-3 parameters for generation needs the trained engine (with an optimizer)")
    return opt.parameter_offload if hasattr(opt, "parameter_offload") else opt


@contextmanager
def gathered_for_generation(engine):
    """ZeRO-3: all-gather the engine's parameters ONCE, switch its per-module gather hooks off while
    generating (each decoding step would re-gather every layer), then re-partition and restore them.
    All ranks must enter together; afterwards each rank may decode a different number of steps."""
    import deepspeed  # here, not at the top: serving (chat, serve) generates without loading DeepSpeed

    offload = _zero3_offload(engine)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for p in offload.module.parameters():
            p.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield engine.module
        finally:
            coordinator = offload.get_param_coordinator()
            if not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()  # the generation forwards left a stale fetch trace
            offload._register_deepspeed_module(offload.module)


class HFBackend:
    """``model.generate`` (KV cache on) on a module or on a DeepSpeed engine's module.

    ``gather=True`` ("hybrid", the rollout default): under ZeRO-3 the shards are gathered once per
    call and every rank decodes on its own, so ranks may stop at different lengths. ``gather=False``
    ("per_token"): the ZeRO-3 hooks gather each layer at every decoding step, so all ranks must run
    the same number of forwards: ``synced_gpus=True`` keeps finished ranks stepping (without it, ranks
    that stop at different lengths deadlock). ZeRO-0/1/2 and plain modules: plain generate.
    ``streamer``, ``cancel`` and ``on_token`` are for serving (tokens streamed as they come; a
    cancellation event and a progress callback, both seen after every token: ``StopCriterion``).
    """

    def __init__(self, engine, tokenizer, params: SamplingParams, *, zero3: bool = False, gather: bool = True,
                 batch_size: Optional[int] = None, device=None, streamer=None, cancel=None, on_token=None):
        self.engine, self.tokenizer, self.params = engine, tokenizer, params
        self.module = getattr(engine, "module", engine)  # an engine's model, or the model itself
        self.zero3, self.gather, self.batch_size = zero3, gather, batch_size
        self.synced_gpus = zero3 and not gather and dist.world_size() > 1
        self.device = device if device is not None else dist.device()
        self.streamer, self.cancel, self.on_token = streamer, cancel, on_token

    def _context(self):
        return gathered_for_generation(self.engine) if self.zero3 and self.gather else nullcontext(self.module)

    def _generate(self, model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stop = StopCriterion(self.tokenizer, ids.size(1), self.params.stop_token_ids, self.params.stop_strings,
                             ids.size(0), ids.device, self.cancel, self.on_token)
        extra = {"streamer": self.streamer} if self.streamer is not None else {}
        out = model.generate(input_ids=ids, attention_mask=mask.long(), stopping_criteria=[stop],
                             synced_gpus=self.synced_gpus, **self.params.generate_kwargs(), **extra)
        return out[:, ids.size(1):], stop.end  # (b, r), (b,)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]]) -> Generation:
        ids, mask = left_pad(prompts, self.params.pad_token_id, self.device)
        size = self.batch_size or len(prompts)
        was_training = self.module.training
        self.engine.eval()
        try:
            with self._context() as model:
                parts = [self._generate(model, ids[i:i + size], mask[i:i + size]) for i in range(0, len(prompts), size)]
        finally:
            self.engine.train(was_training)
        return _assemble(ids, mask, parts, self.params.pad_token_id)

    def update_weights(self, step: int) -> None:
        """Nothing to do: the engine's own weights generate."""

    def close(self) -> None:
        """Nothing held."""


def _assemble(ids, mask, parts: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> Generation:
    """Join generate() chunks into one Generation (responses right-padded to the longest)."""
    width = max(r.size(1) for r, _ in parts)
    responses = torch.cat([torch.nn.functional.pad(r, (0, width - r.size(1)), value=pad_id) for r, _ in parts])
    end = torch.cat([e for _, e in parts])  # (B,), -1: cut by max_new_tokens
    has_eos = end >= 0
    length = torch.where(has_eos, end, torch.tensor([r.size(1) for r, e in parts for _ in e], device=end.device))
    response_mask = torch.arange(width, device=ids.device).unsqueeze(0) < length.unsqueeze(1)  # (B, R)
    responses = responses.masked_fill(~response_mask, pad_id)
    return Generation(torch.cat([ids, responses], dim=1), mask, response_mask, has_eos, steps=width)


def hybrid(engine, tokenizer, params: SamplingParams, *, zero3: bool, args=None) -> HFBackend:
    """--rollout_backend hybrid: ZeRO-3 shards gathered once per rollout, KV-cached generate."""
    return HFBackend(engine, tokenizer, params, zero3=zero3, gather=True,
                     batch_size=getattr(args, "generation_batch_size", None))


def per_token(engine, tokenizer, params: SamplingParams, *, zero3: bool, args=None) -> HFBackend:
    """--rollout_backend per_token: no gather, ZeRO-3 hooks at every step (synced_gpus); the slow baseline."""
    return HFBackend(engine, tokenizer, params, zero3=zero3, gather=False,
                     batch_size=getattr(args, "generation_batch_size", None))


def backend_factory(name: str):
    """The factory registered for ``name`` in BACKENDS (UserError when unknown or not in this version)."""
    if name not in BACKENDS:
        raise UserError(f"--rollout_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    module_name, attr = BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise UserError(f"--rollout_backend {name} is not implemented yet ({module_name} is not part of this "
                        f"version of medgpt-ds); {DEFAULT_WAY_OUT}") from None
    return getattr(module, attr)


def _with_cfg(fn, cfg) -> dict:
    """``{"cfg": cfg}`` when ``fn`` takes a ``cfg`` keyword (backends that need the run's settings)."""
    params = inspect.signature(fn).parameters.values()
    takes = any(p.name == "cfg" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return {"cfg": cfg} if cfg is not None and takes else {}


def check_backend(name: str, *, model_type: Optional[str], device_type: str, use_peft: bool, cfg=None,
                  model_config=None) -> None:
    """Refuse a backend that cannot run here, before any model is loaded (UserError, with the way out).
    ``model_config`` (the policy's config) goes to backends whose check takes it."""
    check = getattr(backend_factory(name), "check", None)
    if check is not None:
        extra = _with_cfg(check, cfg)
        if model_config is not None and "model_config" in inspect.signature(check).parameters:
            extra["model_config"] = model_config
        check(model_type=model_type, device_type=device_type, use_peft=use_peft, **extra)


def patch_ds_config(name: str, ds_config: dict, max_tokens: int) -> None:
    """Let the backend add what it needs to the actor's DeepSpeed config (before the actor is built)."""
    patch = getattr(backend_factory(name), "patch_ds_config", None)
    if patch is not None:
        patch(ds_config, max_tokens)


def make_backend(name: str, engine, tokenizer, params: SamplingParams, *, zero3: bool,
                 args=None, cfg=None) -> GenerationBackend:
    """The rollout backend called ``name`` (see BACKENDS) for the actor ``engine``."""
    factory = backend_factory(name)
    return factory(engine, tokenizer, params, zero3=zero3, args=args, **_with_cfg(factory, cfg))


def stop_at_end_of_turn(generation_config, tokenizer) -> None:
    """Make plain ``generate`` (and vLLM, which reads generation_config.json) stop at the chat
    template's end-of-turn token as well as at eos: ChatML replies end with <|im_end|> while eos is
    <|endoftext|>. The config's own eos ids stay first; pad is set when missing. Used by the
    trainer's export and by the checkpoint conversion."""
    if generation_config is None or not getattr(tokenizer, "chat_template", None):
        return
    eos = generation_config.eos_token_id
    eos = [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
    ids, _ = turn_terminators(tokenizer)
    generation_config.eos_token_id = list(dict.fromkeys(eos + ids))
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
