"""Inference: load a trained model (HF dir, or base + LoRA adapter), render chats with the
training chat template, generate (batched or streamed) with stop strings, and split batch work
across ranks when launched by torchrun / deepspeed.

    from medgpt_ds.inference import ChatModel
    chat = ChatModel.load("outputs/sft")            # or a LoRA adapter dir: ChatModel.load("outputs/sft_lora")
    print(chat.generate([[{"role": "user", "content": "What causes anemia?"}]])[0].text)

Used by tools/chat.py, tools/serve.py, tools/web_demo.py and tools/evaluate.py.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import functools
import json
import os
import queue
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

from medgpt_ds import dist
from medgpt_ds.data.templates import get_chat_template, turn_terminators
from medgpt_ds.errors import PathNotFound, UserError
from medgpt_ds.generation import HFBackend, SamplingParams, cut_at_stop
from medgpt_ds.model import load_adapter

Messages = list[dict[str, str]]


# ---------------------------------------------------------------- loading

def pick_device(device: str = "auto") -> torch.device:
    """'auto': this rank's GPU when CUDA is available, else the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank())
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 on a GPU that supports it, float16 on older GPUs, float32 on the CPU."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UserError(f"--dtype {dtype}: unknown; choose auto, float32, bfloat16 or float16")
    return table[dtype]


def _is_adapter_dir(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "adapter_config.json"))


def _has_tokenizer(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "tokenizer_config.json"))


def resolve_paths(model_name_or_path: str | None, adapter: str | None = None,
                  tokenizer_name_or_path: str | None = None) -> tuple[str, str | None, str]:
    """(base model, adapter or None, tokenizer). A LoRA adapter dir passed as the model names its
    base in adapter_config.json; the tokenizer comes from the adapter dir when it saved one
    (training may have extended the vocabulary), else from the base."""
    if adapter is None and _is_adapter_dir(model_name_or_path):
        adapter, model_name_or_path = model_name_or_path, None
    if adapter is not None and not _is_adapter_dir(adapter):
        raise PathNotFound(f"{adapter}: not a LoRA adapter dir (no adapter_config.json)")
    if model_name_or_path is None:
        if adapter is None:
            raise UserError("pass --model_name_or_path (a HF model dir) and optionally --adapter_name_or_path")
        with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
            model_name_or_path = json.load(f).get("base_model_name_or_path")
        if not model_name_or_path:
            raise UserError(f"{adapter}/adapter_config.json names no base model; pass --model_name_or_path")
    if tokenizer_name_or_path is None:
        tokenizer_name_or_path = adapter if _has_tokenizer(adapter) else model_name_or_path
    return model_name_or_path, adapter, tokenizer_name_or_path


def load_chat_tokenizer(path: str, template_name: str | None = None, trust_remote_code: bool = False):
    """Tokenizer with a chat template: its own (exported by training) or the named one."""
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if template_name and template_name != "auto":
        tok.chat_template = get_chat_template(template_name, tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(model_name_or_path: str, adapter: str | None = None, tokenizer=None, dtype: str = "auto",
                   device: str = "auto", trust_remote_code: bool = False, quantize: str | None = None,
                   resize_emb: bool = False):
    """AutoModelForCausalLM in eval mode on `device`; a LoRA adapter is loaded with peft and merged
    (merged weights generate faster and behave exactly like the adapter). ``quantize`` "4bit" / "8bit"
    loads the weights with bitsandbytes; ``resize_emb`` sizes the embeddings to the tokenizer
    (MedicalGPT's --resize_emb; with an adapter a larger tokenizer always resizes)."""
    dev = pick_device(device)
    kwargs: dict[str, Any] = {}
    if quantize:
        from transformers import BitsAndBytesConfig  # bitsandbytes is optional

        kwargs = {"device_map": {"": dev}, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=quantize == "4bit", load_in_8bit=quantize == "8bit",
            bnb_4bit_compute_dtype=pick_dtype(dtype, dev))}
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=pick_dtype(dtype, dev),
                                                 trust_remote_code=trust_remote_code, **kwargs)
    n_emb = model.get_input_embeddings().weight.shape[0]
    # Training may have added tokens (extended tokenizer, embeddings saved with the adapter).
    if tokenizer is not None and ((resize_emb and len(tokenizer) != n_emb) or (adapter and len(tokenizer) > n_emb)):
        model.resize_token_embeddings(len(tokenizer))
    if adapter is not None:
        model = load_adapter(model, adapter).merge_and_unload()  # peft's MoE renaming off for our adapters
    return (model if quantize else model.to(dev)).eval()


# ---------------------------------------------------------------- generation

@dataclasses.dataclass
class GenerationConfig:
    """Sampling settings shared by the CLI, the server and the web demo."""

    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None


@dataclasses.dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or stop string), "length", or "cancelled" (the stream was closed)


class ModelTurns:
    """First come, first served use of the model: one generation at a time, the others wait in
    order. A waiter gives up when its cancellation event is set (a client that went away while
    queued never holds the model)."""

    POLL_S = 0.05  # how often a waiter looks at its cancellation event

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: collections.deque[threading.Event] = collections.deque()

    def acquire(self, cancel: threading.Event | None = None) -> bool:
        """Wait for this caller's turn; False (and out of the queue) once ``cancel`` is set."""
        me = threading.Event()
        with self._lock:
            self._queue.append(me)
            if self._queue[0] is me:
                me.set()
        while not me.wait(self.POLL_S):
            if cancel is not None and cancel.is_set():
                with self._lock:
                    if not me.is_set():
                        self._queue.remove(me)
                        return False
                self.release()  # the turn came while giving up: pass it on
                return False
        return True

    def release(self) -> None:
        """End the current turn and start the next waiter's."""
        with self._lock:
            self._queue.popleft()
            if self._queue:
                self._queue[0].set()

    @property
    def waiting(self) -> int:
        """Callers queued behind the current turn."""
        return max(len(self._queue) - 1, 0)


class ChatModel:
    """A causal LM + tokenizer + chat template, ready to answer chats.

    Generations run one at a time in arrival order (``turns``); ``health()`` tells whether one is
    running and how long since it produced a token (the server's watchdog)."""

    def __init__(self, model, tokenizer, name: str = "model", context_len: int | None = None):
        if not tokenizer.chat_template:
            raise UserError(
                f"tokenizer of {name} has no chat_template; models exported by medgpt-ds carry the training "
                "template, otherwise pass --template_name (the one used in training)")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.context_len = context_len  # a cap below the model's own limit (MedicalGPT's --context_len)
        self.device = next(model.parameters()).device
        self.eos_ids, self.template_stops = turn_terminators(
            tokenizer, eos_token_id=getattr(model.generation_config, "eos_token_id", None))
        self.turns = ModelTurns()
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}  # generations, by how they ended
        self._counts_lock = threading.Lock()
        self._live: set[_Channel] = set()  # streams whose generation thread has not ended (cancel_all)
        self._started: float | None = None  # monotonic time the running generation got the model
        self._progress = 0.0  # monotonic time of its last token (or of its start)

    @classmethod
    def load(cls, model_name_or_path: str | None, adapter: str | None = None, tokenizer_name_or_path: str | None = None,
             template_name: str | None = None, dtype: str = "auto", device: str = "auto",
             trust_remote_code: bool = False, quantize: str | None = None, resize_emb: bool = False,
             context_len: int | None = None) -> ChatModel:
        base, adapter, tok_path = resolve_paths(model_name_or_path, adapter, tokenizer_name_or_path)
        tok = load_chat_tokenizer(tok_path, template_name, trust_remote_code)
        model = load_causal_lm(base, adapter, tok, dtype, device, trust_remote_code, quantize, resize_emb)
        name = os.path.basename(os.path.normpath(adapter or base))
        return cls(model, tok, name, context_len)

    @property
    def max_length(self) -> int:
        """Context length: the model's position limit (tokenizer limits are often placeholders)."""
        n = getattr(self.model.config, "max_position_embeddings", None)
        limit = int(n) if n else int(min(self.tokenizer.model_max_length, 1 << 20))
        return min(limit, self.context_len) if self.context_len else limit

    def render(self, messages: Messages) -> str:
        """The prompt text exactly as training rendered it, ending with the assistant header."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, messages: Messages) -> list[int]:
        """Prompt ids. Control tokens typed by a user (e.g. '<|im_start|>system') are encoded as plain
        text, so only the template itself can open or close turns."""
        out = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                 sanitize_control_tokens=True, return_dict=True)
        return list(out["input_ids"])

    def sampling_params(self, cfg: GenerationConfig, prompts: list[list[int]]) -> SamplingParams:
        """The request's settings for these prompts: max_new_tokens lowered to what fits in the
        context, ending at the template's end of turn, eos and the request's stop strings."""
        return SamplingParams(max_new_tokens=self._room(prompts, cfg.max_new_tokens),
                              pad_token_id=self.tokenizer.pad_token_id, stop_token_ids=self.eos_ids,
                              temperature=cfg.temperature or 0.0, top_p=cfg.top_p, top_k=cfg.top_k,
                              stop_strings=[*self.template_stops, *cfg.stop],
                              repetition_penalty=cfg.repetition_penalty)

    def health(self, stall_timeout: float = float("inf")) -> dict[str, Any]:
        """{"status": "ok", or "unhealthy" with a "reason" once the running generation has made no
        token for ``stall_timeout`` seconds (a wedged GPU or kernel), "running": a generation holds
        the model, "waiting": queued behind it, "seconds_without_progress": since the running one got
        the model or made its last token (0 when idle), and the counts of finished generations by how
        they ended}: a server's /health."""
        started, now = self._started, time.monotonic()
        idle = 0.0 if started is None else round(now - max(self._progress, started), 3)
        wedged = started is not None and idle > stall_timeout
        state = {"status": "unhealthy" if wedged else "ok", "running": started is not None,
                 "waiting": self.turns.waiting, "seconds_without_progress": idle, **self.counts}
        if wedged:
            state["reason"] = (f"the running generation has made no token for {idle:.0f} s (--stall_timeout "
                               f"{stall_timeout:g}): the model is wedged; restart the server")
        return state

    def cancel_all(self, timeout: float) -> bool:
        """Cancel every stream, queued or generating, and wait up to ``timeout`` seconds for their
        threads to end (a server shutting down). False when one is still running: a generation that
        makes no token never looks at its cancellation (a wedged kernel)."""
        with self._counts_lock:
            live = list(self._live)
        for ch in live:
            ch.close()
        deadline = time.monotonic() + timeout
        for ch in live:
            ch.thread.join(max(0.0, deadline - time.monotonic()))
        return not any(ch.thread.is_alive() for ch in live)

    def _count(self, how: str) -> None:
        with self._counts_lock:
            self.counts[how] += 1

    def _tick(self) -> None:  # after every generated token (StopCriterion): progress for the watchdog
        self._progress = time.monotonic()

    def _backend(self, params: SamplingParams, streamer=None, cancel=None) -> HFBackend:
        return HFBackend(self.model, self.tokenizer, params, device=self.device, streamer=streamer, cancel=cancel,
                         on_token=self._tick)

    def _run(self, seed: int | None, fn: Callable[[], Any]) -> Any:
        """``fn()`` with the model: the caller holds its turn; seeds the RNG, times it for health()."""
        self._started = self._progress = time.monotonic()
        try:
            if seed is not None:
                torch.manual_seed(seed)
            return fn()
        finally:
            self._started = None

    @torch.no_grad()
    def generate(self, chats: Sequence[Messages], cfg: GenerationConfig | None = None) -> list[Completion]:
        """Answer a batch of chats (left-padded into one generate call)."""
        cfg = cfg or GenerationConfig()
        prompts = [self.encode(m) for m in chats]
        params = self.sampling_params(cfg, prompts)
        self.turns.acquire()
        try:
            gen = self._run(cfg.seed, lambda: self._backend(params).generate(prompts))
        except BaseException:
            self._count("failed")
            raise
        finally:
            self.turns.release()
        self._count("completed")
        rows = gen.responses()  # each up to and including the token that ended the turn
        return [self._completion(row, bool(ended), len(p), params) for row, ended, p in zip(rows, gen.has_eos, prompts)]

    def _completion(self, row: list[int], has_eos: bool, prompt_tokens: int, params: SamplingParams,
                    text: str | None = None, stopped: bool = False, closed: bool = False) -> Completion:
        """A generated row as a Completion: its text cut at the first stop string (unless given), and
        "stop" when the turn ended (stop token or string), "length" at the limit, "cancelled" when
        the consumer closed the stream before either."""
        if text is None:
            text, stopped = cut_at_stop(self.tokenizer.decode(row, skip_special_tokens=True), params.stop_strings)
        if has_eos or stopped:
            reason = "stop"
        elif len(row) >= params.max_new_tokens:
            reason = "length"
        else:
            reason = "cancelled" if closed else "stop"
        return Completion(text, prompt_tokens, len(row), reason)

    def _room(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        """max_new_tokens, lowered to what fits in the context after the longest prompt."""
        longest = max(len(p) for p in prompts)
        if longest >= self.max_length:
            raise UserError(f"prompt of {longest} tokens does not fit the model's context length {self.max_length}")
        return min(max_new_tokens, self.max_length - longest)

    def stream(self, messages: Messages, cfg: GenerationConfig | None = None) -> TextStream:
        """Start answering ``messages`` in a thread of its own and return the answer's pieces as they
        are generated (iterate with ``for`` or ``async for``); text that might be the start of a stop
        string is held back until it is known not to be one. ``close()`` (or dropping the stream)
        cancels the generation at its next token, or takes it out of the queue, and never blocks.
        Errors in the prompt (context length) are raised here, before anything starts."""
        cfg = cfg or GenerationConfig()
        prompt = self.encode(messages)
        params = self.sampling_params(cfg, [prompt])
        channel = _Channel(params.stop_strings)
        channel.thread = threading.Thread(target=self._stream_worker, args=(prompt, params, cfg.seed, channel),
                                          daemon=True, name="medgpt-generate")
        with self._counts_lock:
            self._live.add(channel)
        channel.thread.start()
        return TextStream(channel)

    def _stream_worker(self, prompt: list[int], params: SamplingParams, seed: int | None, ch: _Channel) -> None:
        """The generation thread of one stream: waits for its turn (giving up when cancelled), generates,
        and always ends the channel, so neither the consumer nor the next request can be left waiting.
        The turn is taken and released here, never in the consumer's thread."""
        try:
            self._stream_generate(prompt, params, seed, ch)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, who re-raises it
            traceback.clear_frames(e.__traceback__)  # keeps the lines; drops the frames' tensors (see below)
            ch.error = e
            self._count("failed")
        finally:
            with self._counts_lock:
                self._live.discard(ch)
            # Every tensor of the generation is freed by now (they lived in _stream_generate's frame).
            # Freed after the end is posted, a tensor's C++ destructor could still be running in this
            # (daemon) thread when the consumer's process exits: Python then ends the thread inside it
            # and the process aborts ("terminate called without an active exception", exit 134; seen in
            # 4 of 12 runs of tools/chat.py --prompt).
            ch.finish()

    @torch.no_grad()
    def _stream_generate(self, prompt: list[int], params: SamplingParams, seed: int | None, ch: _Channel) -> None:
        if not self.turns.acquire(ch.cancel):
            ch.completion = Completion("", len(prompt), 0, "cancelled")
            self._count("cancelled")
            return
        try:
            backend = self._backend(params, streamer=_PieceStreamer(self.tokenizer, ch), cancel=ch.cancel)
            gen = self._run(seed, lambda: backend.generate([prompt]))
        finally:
            self.turns.release()
        ch.completion = self._completion(gen.responses()[0], bool(gen.has_eos[0]), len(prompt), params,
                                         text=ch.text[:ch.sent], stopped=ch.stopped, closed=ch.closed)
        self._count("cancelled" if ch.completion.finish_reason == "cancelled" else "completed")


class _Channel:
    """What a stream's generation thread and its consumer share: the pieces (a queue the generation
    thread fills and always ends), the cancellation event, the stop-string hold-back, the outcome."""

    END = object()

    def __init__(self, stop: list[str]) -> None:
        self.pieces: queue.SimpleQueue = queue.SimpleQueue()
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.closed = False  # the consumer closed the stream (or dropped it)
        self.stop, self.hold = stop, max((len(s) for s in stop), default=1) - 1
        self.text, self.sent, self.stopped = "", 0, False
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self.wake: Callable[[], None] | None = None  # an async consumer's wake-up, set before it waits
        self.thread: threading.Thread | None = None  # the generation thread (ChatModel.stream)
        self._callbacks: list[Callable[[Completion | None], None]] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        self.closed = True
        self.cancel.set()

    def put(self, item: Any) -> None:
        self.pieces.put(item)
        wake = self.wake
        if wake is not None:
            wake()

    def feed(self, text: str, end: bool) -> None:
        """New decoded text from the streamer (generation thread): send what is known not to start a
        stop string; at a stop string send up to it and end the generation."""
        if self.stopped:
            return
        self.text += text
        cut, self.stopped = cut_at_stop(self.text, self.stop)
        if self.stopped:
            self.cancel.set()
            self._send(cut)
        else:
            self._send(self.text if end else self.text[:len(self.text) - self.hold])

    def _send(self, upto: str) -> None:
        if len(upto) > self.sent:
            self.put(upto[self.sent:])
            self.sent = len(upto)

    def finish(self) -> None:
        """The generation thread is done (finished, cancelled or failed): run the callbacks, then end
        the pieces (so a consumer that saw the end also sees what the callbacks did, e.g. a server's
        queue place given back before its client can send the next request)."""
        with self._lock:
            self.done.set()
            callbacks, self._callbacks = self._callbacks, []
        try:
            for fn in callbacks:
                fn(self.completion)
        finally:
            self.put(self.END)

    def add_done_callback(self, fn: Callable[[Completion | None], None]) -> None:
        with self._lock:
            if not self.done.is_set():
                self._callbacks.append(fn)
                return
        fn(self.completion)


class _PieceStreamer(TextStreamer):
    """transformers' word-wise text streamer, feeding a stream's channel (in the generation thread)."""

    def __init__(self, tokenizer, channel: _Channel):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.channel = channel

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.channel.feed(text, stream_end)


class TextStream:
    """The answer pieces of ChatModel.stream, generated in their own thread. Iterate it with ``for``
    (blocking) or ``async for`` (awaits without holding a thread); ``.completion`` is set once it is
    exhausted (token counts, finish reason). ``close()`` cancels the generation and returns at once;
    a stream dropped without close() is cancelled when it is garbage-collected."""

    def __init__(self, channel: _Channel) -> None:
        self._ch = channel
        weakref.finalize(self, channel.close)  # never blocks, whichever thread collects the stream

    @property
    def completion(self) -> Completion | None:
        return self._ch.completion

    @property
    def done(self) -> bool:
        """The generation thread has ended (the model is free of this stream)."""
        return self._ch.done.is_set()

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return self._take(self._ch.pieces.get(), StopIteration)

    def __aiter__(self) -> TextStream:
        return self

    async def __anext__(self) -> str:
        loop = asyncio.get_running_loop()
        while True:
            ready = asyncio.Event()
            self._ch.wake = functools.partial(_call_soon, loop, ready.set)  # before looking: no lost wake-up
            try:
                item = self._ch.pieces.get_nowait()
            except queue.Empty:
                await ready.wait()
                continue
            return self._take(item, StopAsyncIteration)

    def _take(self, item: Any, stop: type[Exception]) -> str:
        if item is _Channel.END:
            self._ch.pieces.put(item)  # every later next() ends too
            if self._ch.error is not None:
                raise self._ch.error
            raise stop
        return item

    def close(self) -> None:
        """Cancel the generation (at its next token, or in the queue); returns at once."""
        self._ch.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the generation thread has ended; False on timeout."""
        return self._ch.done.wait(timeout)

    def add_done_callback(self, fn: Callable[[Completion | None], None]) -> None:
        """Call ``fn(completion)`` once the generation thread has ended (from that thread; now if it
        has); completion is None when the generation failed. ``fn`` should not hold this stream:
        a stream dropped without close() is only cancelled once nothing holds it."""
        self._ch.add_done_callback(fn)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> None:
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the consumer's event loop is closed: nobody is waiting any more
        pass


# ---------------------------------------------------------------- prompts from records

def record_to_messages(row: dict[str, Any], system_prompt: str | None = None, where: str = "record") -> Messages:
    """One chat per input record, for batch inference. Accepts {"messages": [...]} (a trailing
    assistant turn is dropped: it is the reference answer), sharegpt {"conversations": [...]},
    {"prompt": str | messages}, {"question": str}, alpaca {"instruction", "input"}, {"text": str}.
    A record none of these fit is a UserError naming ``where`` (file:line)."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    if "messages" in row or "conversations" in row:
        key = "messages" if "messages" in row else "conversations"
        raw = row[key]
        if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
            raise UserError(f"{where}: field '{key}': expected a list of {{role, content}} objects")
        msgs = [{"role": roles.get(m.get("role") or m.get("from"), m.get("role") or m.get("from")),
                 "content": m.get("content", m.get("value", ""))} for m in raw]
    elif isinstance(row.get("prompt"), list):
        if not all(isinstance(m, dict) and "role" in m for m in row["prompt"]):
            raise UserError(f"{where}: field 'prompt': expected a string or a list of {{role, content}} objects")
        msgs = [dict(m) for m in row["prompt"]]
    else:
        text = row.get("prompt") or row.get("question") or row.get("text")
        if text is None and "instruction" in row:
            text = "\n".join(x for x in (row["instruction"], row.get("input") or "") if isinstance(x, str) and x)
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: no prompt: expected a non-empty messages, conversations, prompt, question, "
                            f"instruction or text field (keys: {', '.join(sorted(row)) or 'none'})")
        msgs = [{"role": "user", "content": text}]
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if not msgs or not any(m["role"] == "user" for m in msgs):
        raise UserError(f"{where}: no user turn to answer")
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def _lines(path: str):
    """(line number, text) of a UTF-8 file; a missing file or invalid UTF-8 is a UserError naming it."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise PathNotFound(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{n}: not valid UTF-8 (byte {e.start + 1} of the line)") from None


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The JSON value of every non-blank line; invalid JSON or UTF-8 is a UserError naming file:line."""
    return [row for _, row in _parse_json_lines(path, _lines(path))]


def _parse_json_lines(path: str, lines) -> list[tuple[int, Any]]:
    """(line number, JSON value) of every non-blank (line number, text) of ``lines``."""
    rows = []
    for n, line in lines:
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
    return rows


def read_prompt_file(path: str) -> tuple[list[dict[str, Any]], list[str], bool]:
    """(rows, where each row comes from, plain) of a batch-inference file. ``.jsonl`` / ``.json``
    files, and any file whose first non-blank line is a JSON object, are JSON Lines (a ``.json`` file
    that opens with ``[`` is one JSON list of records); anything else is plain text with one question
    a line (MedicalGPT's demo/inference.py --data_file), read as ``{"question": line}`` rows with blank
    lines skipped (counted on stderr). ``where`` is "file:line" (or "file: record N" in a list), for
    the errors of record_to_messages; invalid JSON or UTF-8 is a UserError naming the line."""
    lines = list(_lines(path))
    first = next((x for _, x in lines if x.strip()), "").lstrip()
    if path.endswith(".json") and first.startswith("["):
        try:
            data = json.loads("".join(x for _, x in lines))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        return data, [f"{path}: record {i + 1}" for i in range(len(data))], False
    if path.endswith((".jsonl", ".json")) or first.startswith("{"):
        rows = _parse_json_lines(path, lines)
        return [r for _, r in rows], [f"{path}:{n}" for n, _ in rows], False
    questions = [(n, x.strip()) for n, x in lines if x.strip()]
    if len(questions) < len(lines):
        print(f"{path}: skipped {len(lines) - len(questions)} blank line(s)", file=sys.stderr)
    return [{"question": q} for _, q in questions], [f"{path}:{n}" for n, _ in questions], True


# ---------------------------------------------------------------- ranks

def init_ranks() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed when a launcher started several ranks."""
    if dist.world_size() > 1:
        dist.init()
    return dist.rank(), dist.world_size()


def shard_map(fn: Callable[[list[Any]], list[Any]], items: Sequence[Any], batch_size: int = 1) -> list[Any] | None:
    """Apply `fn` (a batch of items -> a list of results) to this rank's strided shard items[rank::world];
    rank 0 returns every result in input order, other ranks return None."""
    rank, world = dist.rank(), dist.world_size()
    mine = list(items[rank::world])
    results: list[Any] = []
    for i in range(0, len(mine), batch_size):
        results.extend(fn(mine[i:i + batch_size]))
    if world == 1:
        return results
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, results)
    if rank != 0:
        return None
    merged: list[Any] = [None] * len(items)
    for r, part in enumerate(gathered):
        merged[r::world] = part  # item r + k*world is part[k]
    return merged


# ---------------------------------------------------------------- command-line flags

def _path_or_none(value: str) -> str | None:
    return value or None  # MedicalGPT's scripts pass --lora_model "" for "no adapter"


def add_model_args(parser) -> None:
    """Flags every inference tool shares (chat, serve, web_demo, evaluate); MedicalGPT's demo/ names
    (--base_model, --lora_model, --tokenizer_path, --only_cpu, ...) are aliases of ours."""
    g = parser.add_argument_group("model")
    g.add_argument("--model_name_or_path", "--base_model", dest="model_name_or_path", type=_path_or_none,
                   help="HF model dir (merged or full), or a LoRA adapter dir")
    g.add_argument("--adapter_name_or_path", "--lora_model", "--lora_path", dest="adapter_name_or_path",
                   type=_path_or_none, help="LoRA adapter dir to apply on --model_name_or_path (merged at load)")
    g.add_argument("--tokenizer_name_or_path", "--tokenizer_path", dest="tokenizer_name_or_path", type=_path_or_none,
                   help="default: the adapter's tokenizer if saved, else the model's")
    g.add_argument("--template_name", help="chat template name; default: the tokenizer's own (training export)")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    g.add_argument("--device", default="auto", help="auto (this rank's GPU, else cpu), cpu, cuda, cuda:1 ...")
    g.add_argument("--only_cpu", "--use_cpu", "--cpu_only", dest="device", action="store_const", const="cpu",
                   help="run on the CPU (= --device cpu)")
    q = g.add_mutually_exclusive_group()
    q.add_argument("--load_in_4bit", action="store_true", help="load the weights in 4-bit (bitsandbytes nf4)")
    q.add_argument("--load_in_8bit", action="store_true", help="load the weights in 8-bit (bitsandbytes)")
    g.add_argument("--resize_emb", action="store_true",
                   help="size the model's embeddings to the tokenizer (a tokenizer extended after the base was saved)")
    g.add_argument("--trust_remote_code", action="store_true", help="run model code shipped with the checkpoint")
    g.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def add_generation_args(parser, max_new_tokens: int = 512) -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--top_k", type=int, default=0)
    g.add_argument("--repetition_penalty", type=float, default=1.0)
    g.add_argument("--stop", "--stop_str", dest="stop", action="append", default=[],
                   help="stop string (repeatable); --stop_str is MedicalGPT's name")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--system_prompt", default=None)


def generation_config(args) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, stop=tuple(x for x in args.stop if x),
                            seed=args.seed)


def load_from_args(args) -> ChatModel:
    quantize = "4bit" if getattr(args, "load_in_4bit", False) else "8bit" if getattr(args, "load_in_8bit", False) else None
    return ChatModel.load(args.model_name_or_path, args.adapter_name_or_path, args.tokenizer_name_or_path,
                          args.template_name, args.dtype, args.device, args.trust_remote_code, quantize=quantize,
                          resize_emb=getattr(args, "resize_emb", False), context_len=getattr(args, "context_len", None))
