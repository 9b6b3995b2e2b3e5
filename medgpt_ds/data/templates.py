"""Chat templates and label masking.

Every named template is a Jinja chat template (HF ``apply_chat_template`` syntax), so training,
inference and the exported tokenizer all render a conversation the same way. Assistant turns end
with an end-of-turn marker (``eos_token`` or the template's own, e.g. ``<|im_end|>``) that is
labelled, so the model learns to stop.

Label masking renders the conversation once, finds the character span of each assistant turn by
rendering prefixes (span = end of ``render(messages[:k], add_generation_prompt=True)`` to end of
``render(messages[:k+1])``) and maps spans to tokens through the tokenizer's offsets. This works
for any prefix-consistent template, including a tokenizer's own, without per-template code.
"""
from __future__ import annotations

from medgpt_ds.errors import UserError
from medgpt_ds.logprobs import IGNORE_INDEX

_SENTINEL = "\u2063MEDGPT_SENTINEL\u2063"  # reply text no tokenizer merges with its neighbours
_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's "
                  "questions.")
_ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                  "Write a response that appropriately completes the request.")

# Split a leading system message off `messages` (or use a default): sets `system` and `turns`.
_SPLIT_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = DEFAULT %}{% set turns = messages %}{% endif %}"
)


def _split_system(default: str) -> str:
    return _SPLIT_SYSTEM.replace("DEFAULT", repr(default))


_CHATML_TURNS = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TEMPLATES: dict[str, str] = {
    # Plain text for base models: system, user and assistant text back to back, replies end
    # with eos (MedicalGPT `base`).
    "base": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ message['content'] }}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # ChatML without a default system prompt.
    "chatml": _CHATML_TURNS,
    # Qwen(1.5/2/2.5): ChatML with "You are a helpful assistant." when no system is given.
    "qwen": (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        + _CHATML_TURNS
    ),
    # Meta Llama 3 / 3.1 instruct (the HF template, without the tool and date preamble).
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Vicuna v1.1 (FastChat layout) with MedicalGPT's vicuna system prompt:
    # "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."
    "vicuna": (
        _split_system(_VICUNA_SYSTEM)
        + "{% if system %}{{ system + ' ' }}{% endif %}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ASSISTANT:' }}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # Alpaca (MedicalGPT / LLaMA-Factory): turns separated by a blank line.
    "alpaca": (
        _split_system(_ALPACA_SYSTEM)
        + "{% if system %}{{ system + '\n\n' }}{% endif %}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}"
        "{% if not loop.first %}{{ '\n\n' }}{% endif %}"
        "{{ '### Instruction:\n' + message['content'] + '\n\n### Response:\n' }}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # ChatGLM3. The original ends a reply by emitting the next role token; as in MedicalGPT's
    # training, each reply here ends with eos so that generation stops on eos.
    "chatglm3": (
        "{{ '[gMASK]sop' }}"
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n ' + message['content'] }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    ),
    # DeepSeek LLM chat (the HF template of deepseek-llm-7b-chat).
    "deepseek": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ 'Assistant: ' + message['content'] + eos_token }}"
        "{% else %}{{ message['content'] + '\n\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
    # Mistral instruct v0.1; a system prompt goes into the first [INST] block.
    "mistral": (
        _split_system("")
        + "{{ bos_token }}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system %}"
        "{{ '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # Llama 2 chat (the HF template): <<SYS>> inside the first [INST], bos before every query.
    "llama2": (
        _split_system("")
        + "{% for message in turns %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system %}"
        "{% set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{{ bos_token }}{{ '[INST] ' + content | trim + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}


def get_chat_template(name: str | None, tokenizer) -> str:
    """The Jinja chat template to train with: a named one, or the tokenizer's own.

    ``name`` None or "auto" takes ``tokenizer.chat_template`` and fails, listing the names, when
    the tokenizer has none. Unknown names raise UserError with the list of known names.
    """
    names = ", ".join(TEMPLATES)
    if name in (None, "", "auto"):
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # tokenizers with several named templates
            template = template.get("default")
        if not template:
            raise UserError(f"the tokenizer has no chat_template; pass --template_name with one of: {names}")
        return template
    if name not in TEMPLATES:
        raise UserError(f"unknown template_name {name!r}; known templates: {names} "
                        "(or 'auto' for the tokenizer's own)")
    return TEMPLATES[name]


def _render(tokenizer, chat_template: str, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=generation)


def render_with_spans(tokenizer, chat_template: str,
                      messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return (text, [(start, end) character span of each assistant
    turn]). Raises ValueError when the template is not prefix-consistent."""
    text = _render(tokenizer, chat_template, messages, False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, chat_template, messages[:k], True) if k else ""
        upto = _render(tokenizer, chat_template, messages[: k + 1], False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError(
                f"chat template is not prefix-consistent at message {k}: rendering the first "
                f"{k} messages (with the generation prompt) and then {k + 1} messages does not "
                "extend the text turn by turn, so assistant tokens cannot be located. Choose a "
                f"--template_name ({', '.join(TEMPLATES)}) or fix the template.")
        spans.append((len(before), len(upto)))
    return text, spans


def _tokenize(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("label masking needs a fast tokenizer (offset mappings); load the "
                         "tokenizer with use_fast=True")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return enc["input_ids"], enc["offset_mapping"]


def _in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Token i is an assistant token when it starts inside a span. A token straddling the span
    start also holds prompt text: it stays unlabelled so no prompt character is trained on."""
    flags, j = [], 0
    for start, _ in offsets:
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        flags.append(j < len(spans) and spans[j][0] <= start)
    return flags


def encode_conversation(tokenizer, chat_template: str, messages: list[dict], max_length: int,
                        train_on_inputs: bool = False) -> dict | None:
    """Tokenize a conversation for sft: {"input_ids", "labels", "truncated"}.

    Labels are the input ids inside assistant turns (end-of-turn marker included) and -100
    elsewhere; with ``train_on_inputs`` every token is labelled. Truncates from the right to
    ``max_length``; returns None when no label is left to predict after truncation.
    """
    text, spans = render_with_spans(tokenizer, chat_template, messages)
    ids, offsets = _tokenize(tokenizer, text)
    if train_on_inputs:
        labels = list(ids)
    else:
        labels = [t if inside else IGNORE_INDEX for t, inside in zip(ids, _in_spans(offsets, spans))]
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    # The first label is never predicted (nothing precedes it), so it does not count.
    if all(x == IGNORE_INDEX for x in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def encode_prompt(tokenizer, chat_template: str, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` plus the generation prompt, for inference and rollouts."""
    text = _render(tokenizer, chat_template, messages, True)
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _split_reply(tokenizer, chat_template: str, prompt: list[dict],
                 reply: str) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) cut from ONE tokenization of prompt + [assistant reply], so the
    pair concatenates to exactly what encode_conversation trains on."""
    text, spans = render_with_spans(tokenizer, chat_template,
                                    prompt + [{"role": "assistant", "content": reply}])
    ids, offsets = _tokenize(tokenizer, text)
    flags = _in_spans(offsets, spans[-1:])
    first = flags.index(True) if True in flags else len(ids)
    last = len(flags) - flags[::-1].index(True) if True in flags else len(ids)
    return ids[:first], ids[first:last]


def encode_preference(tokenizer, chat_template: str, prompt: list[dict], chosen: str,
                      rejected: str, max_source_length: int, max_target_length: int,
                      truncation: str = "truncate") -> dict | None:
    """Tokenize a preference pair: {"prompt_ids", "chosen_ids", "rejected_ids", "truncated"}.

    chosen/rejected ids are the assistant reply tokens with the end-of-turn marker;
    prompt_ids + chosen_ids equals encode_conversation(prompt + [chosen]) before truncation.
    The prompt is cut from the LEFT (keeping the latest context) to ``max_source_length`` and
    the replies from the right to ``max_target_length``; ``truncation="drop"`` returns None for
    an over-long pair instead.
    """
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    prompt_ids, chosen_ids = _split_reply(tokenizer, chat_template, prompt, chosen)
    rejected_prompt_ids, rejected_ids = _split_reply(tokenizer, chat_template, prompt, rejected)
    if rejected_prompt_ids != prompt_ids:
        # A token merged across the prompt/reply boundary (templates whose generation prompt
        # does not end on a token boundary): fall back to tokenizing the parts separately so
        # both replies share one prompt.
        prompt_ids = encode_prompt(tokenizer, chat_template, prompt)
        chosen_ids = _reply_only(tokenizer, chat_template, prompt, chosen)
        rejected_ids = _reply_only(tokenizer, chat_template, prompt, rejected)
    too_long = (len(prompt_ids) > max_source_length or len(chosen_ids) > max_target_length
                or len(rejected_ids) > max_target_length)
    if too_long and truncation == "drop":
        return None
    return {"prompt_ids": prompt_ids[-max_source_length:] if max_source_length > 0 else [],
            "chosen_ids": chosen_ids[:max_target_length],
            "rejected_ids": rejected_ids[:max_target_length],
            "truncated": too_long}


def _reply_only(tokenizer, chat_template: str, prompt: list[dict], reply: str) -> list[int]:
    text, spans = render_with_spans(tokenizer, chat_template,
                                    prompt + [{"role": "assistant", "content": reply}])
    start, end = spans[-1]
    return tokenizer(text[start:end], add_special_tokens=False, verbose=False)["input_ids"]


def end_of_turn(tokenizer, chat_template: str | None = None) -> str:
    """The text a template (default: the tokenizer's own) puts right after an assistant reply, e.g.
    "<|im_end|>\\n" or "</s>": a reply rendered as a sentinel, and what follows it."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}],
                                         chat_template=chat_template, tokenize=False)
    return text.split(_SENTINEL, 1)[1] if _SENTINEL in text else ""


def turn_terminators(tokenizer, chat_template: str | None = None,
                     eos_token_id: int | list[int] | None = None) -> tuple[list[int], list[str]]:
    """What ends a generated assistant turn: (stop token ids, stop strings).

    The ids are the tokenizer's eos, ``eos_token_id`` (e.g. a generation config's own) and the
    template's end-of-turn marker when it is one special or added token (``<|im_end|>``,
    ``<|eot_id|>``, ``</s>``); a marker that is plain text (several tokens, e.g. ``### Human:``) is a
    stop string instead. The marker is what the template (``chat_template``, default the
    tokenizer's own) renders right after an assistant reply. Every generation uses this: rollouts,
    chat and serving, and the exported generation_config.json.
    """
    ids: list[int] = []
    for group in (tokenizer.eos_token_id, eos_token_id):
        for i in group if isinstance(group, (list, tuple)) else [group]:
            if i is not None and i not in ids:
                ids.append(i)
    marker = end_of_turn(tokenizer, chat_template).strip()
    if not marker:
        return ids, []
    enc = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if len(enc) == 1 and marker in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()):
        return ids + [t for t in enc if t not in ids], []
    return ids, [marker]
