"""Chat templates and label masking.

Every named template is a Jinja chat template (HF ``apply_chat_template`` syntax), so training,
inference and the exported tokenizer all render a conversation the same way. Assistant turns end
with an end-of-turn marker (``eos_token`` or the template's own, e.g. ``<|im_end|>``) that is
labelled, so the model learns to stop.

Label masking renders the conversation once, finds the character span of each assistant turn by
rendering prefixes (span = end of ``render(messages[:k], add_generation_prompt=True)`` to end of
``render(messages[:k+1])``) and maps spans to tokens through the tokenizer's offsets. This works
for any prefix-consistent template, including a tokenizer's own, without per-template code.

Tool calls (assistant ``tool_calls``, role ``tool``, a record's ``tools`` schemas) go through
chat_messages first: natively to a tools-aware template, or flattened into MedicalGPT's tool formats
(see the "tool calls" section); calls are assistant turns, so they are labelled, results are not.
"""
from __future__ import annotations

import json
import re

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
    the tokenizer has none. A template that is not prefix-consistent (Qwen3 and Qwen3.5 drop the
    <think> block of earlier turns, so a conversation does not render turn by turn and assistant
    tokens cannot be located) is replaced by TRL's training variant of it when TRL knows it
    (trl.chat_template_utils.get_training_chat_template: the same text for the last turn, earlier
    turns keep an empty think block). Unknown names raise UserError (a ValueError) with the list
    of known names.
    """
    names = ", ".join(TEMPLATES)
    if name in (None, "", "auto"):
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # tokenizers with several named templates
            template = template.get("default")
        if not template:
            raise UserError(f"the tokenizer has no chat_template; pass --template_name with one of: {names}")
        return template if _prefix_consistent(tokenizer, template) else _training_variant(tokenizer, template)
    if name not in TEMPLATES:
        raise UserError(f"unknown template_name {name!r}; known templates: {names} "
                        "(or 'auto' for the tokenizer's own)")
    return TEMPLATES[name]


def _prefix_consistent(tokenizer, chat_template: str) -> bool:
    """Whether a multi-turn conversation (and a tool-call exchange, when the template renders tools)
    renders turn by turn, as label masking needs (render_with_spans)."""
    probes = [[{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
               {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
               {"role": "assistant", "content": "a2"}]]
    if supports_tools(tokenizer, chat_template):
        probes.append([{"role": "user", "content": "q"},
                       {"role": "assistant", "content": "", "tool_calls": [
                           {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
                       {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}])
    try:
        for messages in probes:
            render_with_spans(tokenizer, chat_template, messages)
    except ValueError:
        return False
    except Exception:  # noqa: BLE001 - a template that rejects the probe roles: leave it to the real data
        return True
    return True


def _training_variant(tokenizer, chat_template: str) -> str:
    """TRL's prefix-preserving training variant of ``chat_template``, else ``chat_template`` itself
    (encoding then fails with the not-prefix-consistent error, which names the way out)."""
    try:
        from trl.chat_template_utils import get_training_chat_template
    except ImportError:
        return chat_template
    original = tokenizer.chat_template
    tokenizer.chat_template = chat_template
    try:
        return get_training_chat_template(tokenizer) or chat_template
    except ValueError:  # TRL has no variant of this template
        return chat_template
    finally:
        tokenizer.chat_template = original


# ---------------------------------------------------------------- tool calls
# Records carry tool calls as data (formats.py: assistant "tool_calls", role "tool", a "tools" schema
# list). chat_messages turns them into what a chat template renders, one of two ways:
#   native  OpenAI-style messages plus tools= for a chat template that renders tools itself
#           (Qwen2.5/Qwen3 and most current instruct templates);
#   <name>  MedicalGPT's tool formats (training/tool_utils.py: default, qwen, glm4, llama3, mistral):
#           the tool list appended to the system prompt, calls as assistant text, results as user
#           text, consecutive turns of one role joined by a newline, as MedicalGPT's loaders do.

TOOL_FORMATS = ("native", "default", "qwen", "glm4", "llama3", "mistral")
TOOL_FORMAT_ALIASES = {"qwen3": "qwen", "qwen3.5": "qwen"}  # MedicalGPT's names for the qwen format

_DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    "(e.g. ```{{\"input\": \"hello world\", \"num_beams\": 5}}```)\n```\n")
_GLM4_TOOL_PROMPT = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                     "你的任务是针对用户的问题和要求提供适当的答复和支持。# 可用工具{tool_text}")
# MedicalGPT puts today's date here; a fixed one (Llama 3.1's template default) keeps the rendering,
# and so the tokenized-data cache, reproducible.
_LLAMA3_TOOL_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function "
    "call. Respond in the format {{\"name\": function name, \"parameters\": dictionary of argument name and its "
    "value}}. Do not use variables.\n\n{tool_text}")
_QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}}\n</tool_call>")


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def format_tools(tools: list[dict], fmt: str) -> str:
    """The system-prompt text describing ``tools`` (function schemas) in MedicalGPT's format ``fmt``."""
    if fmt == "default":
        text, names = "", []
        for tool in tools:
            params = tool.get("parameters") or {}
            required = params.get("required") or []
            args = ""
            for name, p in (params.get("properties") or {}).items():
                p = p if isinstance(p, dict) else {}
                enum = ", should be one of [{}]".format(", ".join(map(str, p["enum"]))) if p.get("enum") else ""
                items = ", where each item should be {}".format(p["items"].get("type", "")) \
                    if isinstance(p.get("items"), dict) else ""
                args += "  - {} ({}{}): {}{}{}\n".format(name, p.get("type", ""), ", required" if name in required else "",
                                                         p.get("description", ""), enum, items)
            text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{args}\n"
            names.append(tool["name"])
        return _DEFAULT_TOOL_PROMPT.format(tool_text=text, tool_names=", ".join(names))
    if fmt == "glm4":
        text = "".join(f"\n\n## {t['name']}\n\n{json.dumps(t, indent=4, ensure_ascii=False)}\n"
                       "在调用上述函数时，请使用 Json 格式表示调用的参数。" for t in tools)
        return _GLM4_TOOL_PROMPT.format(tool_text=text)
    if fmt == "llama3":
        text = "".join(json.dumps({"type": "function", "function": t}, indent=4, ensure_ascii=False) + "\n\n"
                       for t in tools)
        return _LLAMA3_TOOL_PROMPT.format(tool_text=text)
    if fmt == "mistral":
        return "[AVAILABLE_TOOLS] " + _dumps([{"type": "function", "function": t} for t in tools]) + "[/AVAILABLE_TOOLS]"
    if fmt == "qwen":
        return _QWEN_TOOL_PROMPT.format(tool_text="".join("\n" + _dumps({"type": "function", "function": t})
                                                          for t in tools))
    raise ValueError(f"unknown tool format {fmt!r}; expected one of {', '.join(TOOL_FORMATS[1:])}")


def format_calls(calls: list[dict], fmt: str) -> str:
    """Assistant text of tool calls [{"name", "arguments"}] in MedicalGPT's format ``fmt``. glm4 and
    llama3 have no parallel calls (MedicalGPT refuses them): several are written one per line."""
    if fmt == "default":
        return "".join(f"Action: {c['name']}\nAction Input: {_dumps(c['arguments'])}\n" for c in calls)
    if fmt == "glm4":
        return "\n".join(f"{c['name']}\n{_dumps(c['arguments'])}" for c in calls)
    if fmt == "llama3":
        return "\n".join(f'{{"name": "{c["name"]}", "parameters": {_dumps(c["arguments"])}}}' for c in calls)
    if fmt == "mistral":
        return "[" + ", ".join(f'{{"name": "{c["name"]}", "arguments": {_dumps(c["arguments"])}}}' for c in calls) + "]"
    if fmt == "qwen":
        return "\n".join(f'<tool_call>\n{{"name": "{c["name"]}", "arguments": {_dumps(c["arguments"])}}}\n</tool_call>'
                         for c in calls)
    raise ValueError(f"unknown tool format {fmt!r}; expected one of {', '.join(TOOL_FORMATS[1:])}")


def format_observation(text: str, fmt: str) -> str:
    """A tool result as MedicalGPT writes it into the user turn that follows a call."""
    if fmt == "qwen":
        return f"<tool_response>\n{text}\n</tool_response>"
    if fmt == "glm4":
        return f"<|observation|>\n{text}"
    if fmt == "mistral":
        return f'[TOOL_RESULTS] {{"content": {text}}}[/TOOL_RESULTS]'
    return f"Observation: {text}"


_ACTION_RE = re.compile(r"Action:\s*([a-zA-Z0-9_.-]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", re.DOTALL)


def parse_default_calls(text: str) -> dict | None:
    """A reply written in MedicalGPT's default format ("Action: name\\nAction Input: {json}", as in
    its tool-call preference data) -> an assistant message with tool_calls (text before the first
    Action kept as content); None when ``text`` is not such a call."""
    matches = list(_ACTION_RE.finditer(text))
    if not matches:
        return None
    calls = []
    for m in matches:
        raw = m.group(2).strip().strip('"').strip("`")
        try:
            calls.append({"name": m.group(1), "arguments": json.loads(raw)})
        except json.JSONDecodeError:
            return None
    return {"role": "assistant", "content": text[:matches[0].start()].strip(), "tool_calls": calls}


def has_tool_content(messages: list[dict], tools=None) -> bool:
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def chat_messages(messages: list[dict], tools: list[dict] | None = None,
                  tool_format: str = "default") -> tuple[list[dict], list[dict] | None]:
    """Canonical messages (+ function schemas) -> (messages, tools=) for ``apply_chat_template``.

    Messages without tool content pass through unchanged. ``tool_format`` "native" gives OpenAI-style
    messages and tools for a tools-aware template; a MedicalGPT format name flattens everything into
    system/user/assistant text (tools= is then None). Assistant turns stay assistant turns, so label
    masking trains on the calls and never on the tool results.
    """
    if not has_tool_content(messages, tools):
        return messages, None
    if tool_format == "native":
        out = []
        for m in messages:
            if m.get("tool_calls"):
                calls = [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                         for c in m["tool_calls"]]
                out.append({"role": "assistant", "content": m["content"], "tool_calls": calls})
            else:
                out.append(m)
        return out, [{"type": "function", "function": t} for t in tools] if tools else None
    fmt = TOOL_FORMAT_ALIASES.get(tool_format, tool_format)
    out = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "tool":
            role, content = "user", format_observation(content, fmt)
        elif m.get("tool_calls"):
            calls = format_calls(m["tool_calls"], fmt)
            content = f"{content}\n{calls}" if content else calls
        if out and out[-1]["role"] == role and role != "system":
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n" + content}
        else:
            out.append({"role": role, "content": content})
    if tools:
        text = format_tools(tools, fmt)
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, None


def reply_message(reply, tools: list[dict] | None, tool_format: str) -> dict:
    """A preference reply (text, or an assistant message with tool_calls) as an assistant message.
    Text in MedicalGPT's default call format is read as a call when the record has tools and the
    rendering is not that format, so a call is written the way the prompt asks for calls."""
    if isinstance(reply, dict):
        return reply
    if tools and tool_format != "default":
        call = parse_default_calls(reply)
        if call is not None:
            return call
    return {"role": "assistant", "content": reply}


def supports_tools(tokenizer, chat_template: str) -> bool:
    """Whether ``chat_template`` renders tools= schemas, assistant tool_calls and tool results (each
    sentinel must appear in the output; the same probe as TRL's supports_tool_calling, plus tools=)."""
    probe = [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "probe_call_7f3a", "arguments": {"probe_key_2c9d": "probe_val_5e1b"}}}]},
             {"role": "tool", "content": "probe_result_9a4c"}]
    tools = [{"type": "function", "function": {"name": "probe_schema_4d8e", "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}]
    try:
        text = tokenizer.apply_chat_template(probe, tools=tools, chat_template=chat_template, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that rejects the roles (jinja raise_exception, TypeError)
        return False
    return all(s in text for s in ("probe_call_7f3a", "probe_key_2c9d", "probe_val_5e1b", "probe_result_9a4c",
                                   "probe_schema_4d8e"))


def resolve_tool_format(tokenizer, chat_template: str, template_name: str | None, tool_format: str | None) -> str:
    """"native" or a MedicalGPT tool format name for ``--tool_format`` (None/"auto": native when the
    tokenizer's own template renders tools, else MedicalGPT's default format)."""
    fmt = TOOL_FORMAT_ALIASES.get(tool_format or "auto", tool_format or "auto")
    own = template_name in (None, "", "auto")
    if fmt == "auto":
        return "native" if own and supports_tools(tokenizer, chat_template) else "default"
    if fmt == "native" and not supports_tools(tokenizer, chat_template):
        raise UserError("--tool_format native: the chat template does not render tools, tool calls and tool results "
                         f"itself; use one of MedicalGPT's formats ({', '.join(TOOL_FORMATS[1:])})")
    if fmt not in TOOL_FORMATS:
        raise UserError(f"--tool_format {tool_format!r}: expected auto or one of {', '.join(TOOL_FORMATS)}")
    return fmt


def _render(tokenizer, chat_template: str, messages: list[dict], generation: bool, tools=None) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=generation, **kwargs)


def render_with_spans(tokenizer, chat_template: str, messages: list[dict],
                      tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` (as chat_messages returns them, with its ``tools``) and return (text,
    [(start, end) character span of each assistant turn]). Raises ValueError when the template
    is not prefix-consistent."""
    text = _render(tokenizer, chat_template, messages, False, tools)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, chat_template, messages[:k], True, tools) if k else ""
        upto = _render(tokenizer, chat_template, messages[: k + 1], False, tools)
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
                        train_on_inputs: bool = False, *, tools: list[dict] | None = None,
                        tool_format: str = "default") -> dict | None:
    """Tokenize a conversation for sft: {"input_ids", "labels", "truncated"}.

    Labels are the input ids inside assistant turns (end-of-turn marker included; tool calls are
    assistant turns) and -100 elsewhere (system, user, tool results); with ``train_on_inputs``
    every token is labelled. ``tools`` and tool calls are rendered per ``tool_format`` (see
    chat_messages). Truncates from the right to ``max_length``; returns None when no label is
    left to predict after truncation.
    """
    messages, tools = chat_messages(messages, tools, tool_format)
    text, spans = render_with_spans(tokenizer, chat_template, messages, tools)
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


def encode_prompt(tokenizer, chat_template: str, messages: list[dict], *, tools: list[dict] | None = None,
                  tool_format: str = "default") -> list[int]:
    """Token ids of ``messages`` plus the generation prompt, for inference and rollouts."""
    messages, tools = chat_messages(messages, tools, tool_format)
    text = _render(tokenizer, chat_template, messages, True, tools)
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _split_reply(tokenizer, chat_template: str, prompt: list[dict], reply: dict, tools,
                 tool_format: str) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) cut from ONE tokenization of prompt + [assistant reply], so the
    pair concatenates to exactly what encode_conversation trains on."""
    messages, tools = chat_messages(prompt + [reply], tools, tool_format)
    text, spans = render_with_spans(tokenizer, chat_template, messages, tools)
    ids, offsets = _tokenize(tokenizer, text)
    flags = _in_spans(offsets, spans[-1:])
    first = flags.index(True) if True in flags else len(ids)
    last = len(flags) - flags[::-1].index(True) if True in flags else len(ids)
    return ids[:first], ids[first:last]


def encode_preference(tokenizer, chat_template: str, prompt: list[dict], chosen, rejected,
                      max_source_length: int, max_target_length: int, truncation: str = "truncate", *,
                      tools: list[dict] | None = None, tool_format: str = "default") -> dict | None:
    """Tokenize a preference pair: {"prompt_ids", "chosen_ids", "rejected_ids", "truncated"}.

    chosen/rejected are reply texts or assistant messages with tool_calls (reply_message);
    their ids are the assistant reply tokens with the end-of-turn marker;
    prompt_ids + chosen_ids equals encode_conversation(prompt + [chosen]) before truncation.
    The prompt is cut from the LEFT (keeping the latest context) to ``max_source_length`` and
    the replies from the right to ``max_target_length``; ``truncation="drop"`` returns None for
    an over-long pair instead.
    """
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    chosen = reply_message(chosen, tools, tool_format)
    rejected = reply_message(rejected, tools, tool_format)
    prompt_ids, chosen_ids = _split_reply(tokenizer, chat_template, prompt, chosen, tools, tool_format)
    rejected_prompt_ids, rejected_ids = _split_reply(tokenizer, chat_template, prompt, rejected, tools, tool_format)
    if rejected_prompt_ids != prompt_ids:
        # A token merged across the prompt/reply boundary (templates whose generation prompt
        # does not end on a token boundary): fall back to tokenizing the parts separately so
        # both replies share one prompt.
        prompt_ids = encode_prompt(tokenizer, chat_template, prompt, tools=tools, tool_format=tool_format)
        chosen_ids = _reply_only(tokenizer, chat_template, prompt, chosen, tools, tool_format)
        rejected_ids = _reply_only(tokenizer, chat_template, prompt, rejected, tools, tool_format)
    too_long = (len(prompt_ids) > max_source_length or len(chosen_ids) > max_target_length
                or len(rejected_ids) > max_target_length)
    if too_long and truncation == "drop":
        return None
    return {"prompt_ids": prompt_ids[-max_source_length:] if max_source_length > 0 else [],
            "chosen_ids": chosen_ids[:max_target_length],
            "rejected_ids": rejected_ids[:max_target_length],
            "truncated": too_long}


def _reply_only(tokenizer, chat_template: str, prompt: list[dict], reply: dict, tools, tool_format: str) -> list[int]:
    messages, tools = chat_messages(prompt + [reply], tools, tool_format)
    text, spans = render_with_spans(tokenizer, chat_template, messages, tools)
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
