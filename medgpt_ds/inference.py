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
import dataclasses
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from medgpt_ds import dist
from medgpt_ds.data.templates import get_chat_template, turn_terminators
from medgpt_ds.generation import Generation, HFBackend, SamplingParams, cut_at_stop
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
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
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
        raise FileNotFoundError(f"{adapter}: not a LoRA adapter dir (no adapter_config.json)")
    if model_name_or_path is None:
        if adapter is None:
            raise ValueError("pass --model_name_or_path (a HF model dir) and optionally --adapter_name_or_path")
        with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
            model_name_or_path = json.load(f).get("base_model_name_or_path")
        if not model_name_or_path:
            raise ValueError(f"{adapter}/adapter_config.json names no base model; pass --model_name_or_path")
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
    finish_reason: str  # "stop" (end of turn or stop string) or "length"


class ChatModel:
    """A causal LM + tokenizer + chat template, ready to answer chats."""

    def __init__(self, model, tokenizer, name: str = "model", context_len: int | None = None):
        if not tokenizer.chat_template:
            raise ValueError(
                f"tokenizer of {name} has no chat_template; models exported by medgpt-ds carry the training "
                "template, otherwise pass --template_name (the one used in training)")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.context_len = context_len  # a cap below the model's own limit (MedicalGPT's --context_len)
        self.device = next(model.parameters()).device
        self.eos_ids, self.template_stops = turn_terminators(
            tokenizer, eos_token_id=getattr(model.generation_config, "eos_token_id", None))
        self.lock = threading.Lock()  # one generation at a time (the server runs handlers in threads)

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

    @torch.no_grad()
    def generate(self, chats: Sequence[Messages], cfg: GenerationConfig | None = None) -> list[Completion]:
        """Answer a batch of chats (left-padded into one generate call)."""
        cfg = cfg or GenerationConfig()
        prompts = [self.encode(m) for m in chats]
        params = self.sampling_params(cfg, prompts)
        with self.lock:
            if cfg.seed is not None:
                torch.manual_seed(cfg.seed)
            gen = HFBackend(self.model, self.tokenizer, params, device=self.device).generate(prompts)
        rows = gen.responses()  # each up to and including the token that ended the turn
        return [self._completion(row, bool(ended), len(p), params) for row, ended, p in zip(rows, gen.has_eos, prompts)]

    def _completion(self, row: list[int], has_eos: bool, prompt_tokens: int, params: SamplingParams,
                    text: str | None = None, stopped: bool = False) -> Completion:
        """A generated row as a Completion: its text cut at the first stop string (unless given), and
        "stop" when the turn ended (stop token or string) or was cut short, "length" at the limit."""
        if text is None:
            text, stopped = cut_at_stop(self.tokenizer.decode(row, skip_special_tokens=True), params.stop_strings)
        ended = has_eos or stopped or len(row) < params.max_new_tokens
        return Completion(text, prompt_tokens, len(row), "stop" if ended else "length")

    def _room(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        """max_new_tokens, lowered to what fits in the context after the longest prompt."""
        longest = max(len(p) for p in prompts)
        if longest >= self.max_length:
            raise ValueError(f"prompt of {longest} tokens does not fit the model's context length {self.max_length}")
        return min(max_new_tokens, self.max_length - longest)

    def stream(self, messages: Messages, cfg: GenerationConfig | None = None) -> TextStream:
        """Iterate the answer in text pieces as tokens are generated; text that might be the start of
        a stop string is held back until it is known not to be one. Once exhausted, the stream's
        `.completion` holds the Completion (token counts, finish reason); close() stops generating."""
        out = TextStream()
        out._pieces = self._stream(messages, cfg, out)
        return out

    def _stream(self, messages: Messages, cfg: GenerationConfig | None, out: TextStream) -> Iterator[str]:
        cfg = cfg or GenerationConfig()
        prompt = self.encode(messages)
        params = self.sampling_params(cfg, [prompt])
        stop = params.stop_strings
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        backend = HFBackend(self.model, self.tokenizer, params, device=self.device, streamer=streamer, cancel=cancel)
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["gen"] = backend.generate([prompt])
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer thread below
                box["error"] = e
                streamer.end()

        hold = max((len(s) for s in stop), default=1) - 1
        text, sent, stopped, drained = "", 0, False, False
        with self.lock:
            if cfg.seed is not None:
                torch.manual_seed(cfg.seed)
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            try:
                for piece in streamer:
                    text += piece
                    cut, stopped = cut_at_stop(text, stop)
                    if stopped:
                        cancel.set()
                        if len(cut) > sent:
                            yield cut[sent:]
                        sent = len(cut)
                        break
                    safe = len(text) - hold
                    if safe > sent:
                        yield text[sent:safe]
                        sent = safe
                else:
                    drained = True
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
            finally:
                cancel.set()  # the consumer went away (client disconnect) or stopped: end generation
                if not drained:
                    for _ in streamer:  # until generate() ends the stream
                        pass
                thread.join()
        if "error" in box:
            raise box["error"]
        gen: Generation = box["gen"]
        out.completion = self._completion(gen.responses()[0], bool(gen.has_eos[0]), len(prompt), params,
                                          text=text[:sent], stopped=stopped)


class TextStream:
    """Iterator of answer pieces from ChatModel.stream; `.completion` is set once it is exhausted."""

    def __init__(self) -> None:
        self.completion: Completion | None = None
        self._pieces: Iterator[str] = iter(())

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()


# ---------------------------------------------------------------- prompts from records

def record_to_messages(row: dict[str, Any], system_prompt: str | None = None) -> Messages:
    """One chat per input record, for batch inference. Accepts {"messages": [...]} (a trailing
    assistant turn is dropped: it is the reference answer), sharegpt {"conversations": [...]},
    {"prompt": str | messages}, {"question": str}, alpaca {"instruction", "input"}, {"text": str}."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    if "messages" in row or "conversations" in row:
        raw = row.get("messages") or row.get("conversations") or []
        msgs = [{"role": roles.get(m.get("role") or m.get("from"), m.get("role") or m.get("from")),
                 "content": m.get("content", m.get("value", ""))} for m in raw]
    elif isinstance(row.get("prompt"), list):
        msgs = [dict(m) for m in row["prompt"]]
    else:
        text = row.get("prompt") or row.get("question") or row.get("text")
        if text is None and "instruction" in row:
            text = "\n".join(x for x in (row["instruction"], row.get("input") or "") if x)
        if not isinstance(text, str) or not text.strip():
            raise ValueError("record has no prompt: expected messages, conversations, prompt, question, "
                             f"instruction or text (keys: {sorted(row)})")
        msgs = [{"role": "user", "content": text}]
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if not msgs:
        raise ValueError("record has no user turn")
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: invalid JSON: {e.msg}") from None
    return rows


def read_prompt_file(path: str) -> tuple[list[dict[str, Any]], bool]:
    """(rows, plain) of a batch-inference file. ``.jsonl`` / ``.json`` files, and any file whose first
    non-blank line is a JSON object, are JSON Lines; anything else is plain text with one question a
    line (MedicalGPT's demo/inference.py --data_file), read as ``{"question": line}`` rows with blank
    lines skipped (counted on stderr)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    first = next((x for x in lines if x.strip()), "")
    if path.endswith((".jsonl", ".json")) or first.lstrip().startswith("{"):
        return read_jsonl(path), False
    questions = [x.strip() for x in lines if x.strip()]
    if len(questions) < len(lines):
        print(f"{path}: skipped {len(lines) - len(questions)} blank line(s)", file=sys.stderr)
    return [{"question": q} for q in questions], True


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
