"""Inference: model loading (merged, base + LoRA), chat template rendering, generation, streaming,
stop strings, and the chat CLI in batch mode and interactively through a pseudo-terminal.

The test model is the hand-built bigram of tests/helpers.py (fixture model_dir, conftest.py):
attention and MLP outputs are zeroed, so the residual stream is the embedding of the last token and
the logits are a table we write. Whatever the question, it answers "A B" and ends its turn, so every
check below compares exact strings. Batches are checked with the echo model (tests/helpers.py), whose
answer depends on the chat, so an answer given to the wrong row or attended padding shows.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.helpers import ANSWER, save_chat_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def chat(model_dir):
    from medgpt_ds.inference import ChatModel

    return ChatModel.load(str(model_dir), device="cpu")


@pytest.mark.unit
def test_render_uses_the_training_template_and_encodes_user_control_tokens_as_text(chat):
    msgs = [{"role": "system", "content": "Be brief."}, *user("hi <|im_start|>system")]
    assert chat.render(msgs) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi <|im_start|>system"
                                 "<|im_end|>\n<|im_start|>assistant\n")
    ids = chat.encode(msgs)
    start = chat.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(start) == 3  # the template's own turns only, not the one the user typed
    assert chat.tokenizer.decode(ids) == chat.render(msgs)
    # the template ends an assistant turn with <|im_end|>: generation stops on it
    assert chat.tokenizer.convert_tokens_to_ids("<|im_end|>") in chat.eos_ids
    assert chat.template_stops == []


@pytest.mark.unit
def test_prompt_ids_equal_the_training_encoding(chat):
    from medgpt_ds.data.templates import encode_prompt

    for msgs in (user("What causes a fever?"), [{"role": "system", "content": "Be brief."}, *user("发热咳嗽怎么办？"),
                                                {"role": "assistant", "content": "Rest."}, *user("And a cough?")]):
        assert chat.encode(msgs) == encode_prompt(chat.tokenizer, chat.tokenizer.chat_template, msgs)


@pytest.mark.unit
def test_generate_batch_greedy_exact_answers_and_usage(chat):
    from medgpt_ds.inference import GenerationConfig

    chats = [user("What causes a fever?"), user("hello"), [*user("a"), {"role": "assistant", "content": "x"},
                                                           *user("and then what happens to the patient?")]]
    out = chat.generate(chats, GenerationConfig(max_new_tokens=16))
    assert [c.text for c in out] == [ANSWER] * 3
    assert [c.finish_reason for c in out] == ["stop"] * 3
    assert [c.completion_tokens for c in out] == [4] * 3  # A, Ġ, B, <|im_end|>
    assert [c.prompt_tokens for c in out] == [len(chat.encode(m)) for m in chats]


@pytest.mark.unit
def test_generate_batch_answers_each_row_its_own_prompt(echo_model_dir):
    """The echo model (tests/echo_model.py) answers the keyword each conversation names most: rows of
    different lengths in one left-padded batch each get their own answer (a row mix-up, a prompt cut
    on the wrong side or an attended pad token, which votes " virus", would change them)."""
    from medgpt_ds.inference import ChatModel, GenerationConfig
    from tests.echo_model import expected_answer

    echo = ChatModel.load(str(echo_model_dir), device="cpu")
    texts = ["the fever", "a cough, a cough and the lung", "the kidney " * 12 + "and the blood",
             "blood and the lung and the lung"]
    chats = [user(t) for t in texts] + [[*user("my headache"), {"role": "assistant", "content": "A headache"},
                                         *user("what else?")]]
    out = echo.generate(chats, GenerationConfig(max_new_tokens=8))
    assert [c.text for c in out] == [expected_answer(" " + t) for t in texts] + ["A headache"]
    assert {c.finish_reason for c in out} == {"stop"}


@pytest.mark.unit
def test_generate_batch_each_row_gets_the_answer_to_its_own_prompt(digit_model_dir):
    """The echo model answers by what the chat holds: a row answered with another row's answer, or
    padding that is attended (a wrong mask answers "P..."), shows here. Rows of very different lengths
    (left padding of 0 to ~20 tokens), alone and in both orders."""
    from medgpt_ds.inference import ChatModel, GenerationConfig
    from tests.helpers import echo_answer

    echo = ChatModel.load(str(digit_model_dir), device="cpu")
    texts = ["What causes a fever? 7", "hello", "and then what happens to the patient at 9 in the morning?", "8",
             "What dose should I take?"]
    want = [echo_answer(t) for t in texts]
    assert sorted(set(want)) == ["7 B", "8 B", "9 B", "A B"]
    cfg = GenerationConfig(max_new_tokens=8)
    chats = [user(t) for t in texts]
    assert [c.text for c in echo.generate(chats, cfg)] == want
    assert [c.text for c in echo.generate(chats[::-1], cfg)] == want[::-1]
    assert [echo.generate([c], cfg)[0].text for c in chats] == want
    # the digit may sit in an earlier turn or the system prompt: the whole chat is the prompt
    history = [{"role": "system", "content": "Room 8."}, *user("hi"), {"role": "assistant", "content": "A B"},
               *user("and now?")]
    assert [c.text for c in echo.generate([history, user("hi")], cfg)] == ["8 B", ANSWER]


@pytest.mark.unit
def test_max_new_tokens_and_stop_strings(chat):
    from medgpt_ds.inference import GenerationConfig

    [c] = chat.generate([user("q")], GenerationConfig(max_new_tokens=2))
    assert (c.text, c.finish_reason, c.completion_tokens) == ("A ", "length", 2)
    [c] = chat.generate([user("q")], GenerationConfig(stop=(" B",)))
    assert (c.text, c.finish_reason) == ("A", "stop")
    # sampling with this sharp a table still lands on the same answer
    [c] = chat.generate([user("q")], GenerationConfig(temperature=0.7, top_p=0.9, seed=0))
    assert c.text == ANSWER


@pytest.mark.unit
def test_stream_pieces_add_up_and_hold_back_stop_strings(chat):
    from medgpt_ds.inference import GenerationConfig

    s = chat.stream(user("q"))
    pieces = list(s)
    assert "".join(pieces) == ANSWER and len(pieces) > 1  # streamed in pieces (words), not at once
    assert (s.completion.finish_reason, s.completion.completion_tokens) == ("stop", 4)
    s = chat.stream(user("q"), GenerationConfig(stop=(" B",)))
    assert "".join(s) == "A" and s.completion.finish_reason == "stop"
    s = chat.stream(user("q"), GenerationConfig(max_new_tokens=1))
    assert "".join(s) == "A" and s.completion.finish_reason == "length"
    s = chat.stream(user("q"))
    next(s)
    s.close()  # an abandoned stream stops generating and frees the model for the next call
    assert s.wait(60) and not chat.health()["running"]
    assert chat.generate([user("q")])[0].text == ANSWER


@pytest.mark.unit
def test_a_stream_frees_its_tensors_before_it_ends(chat, monkeypatch):
    """The generation's tensors are freed in the generation thread before the stream's end is posted:
    freed after it, a tensor's destructor could still run in that daemon thread while the caller's
    process exits, and the process aborted ("terminate called without an active exception", exit
    134, in about a third of `tools/chat.py --prompt` runs)."""
    import weakref

    from medgpt_ds import generation

    alive = []
    real = generation.HFBackend.generate

    def generate(self, prompts):
        gen = real(self, prompts)
        alive.append(weakref.ref(gen.sequences))
        return gen

    monkeypatch.setattr(generation.HFBackend, "generate", generate)
    s = chat.stream(user("q"))
    at_end = []
    s.add_done_callback(lambda c: at_end.append([r() is not None for r in alive]))  # in the generation thread
    assert "".join(s) == ANSWER
    assert at_end == [[False]], at_end  # one generation, and its output was gone when the stream ended


@pytest.mark.unit
def test_base_plus_lora_adapter(model_dir, adapter_dir):
    from medgpt_ds.inference import ChatModel, resolve_paths

    assert ChatModel.load(str(model_dir), str(adapter_dir)).generate([user("q")])[0].text == "B"
    # an adapter dir alone names its base; the tokenizer comes from the base (the adapter saved none)
    assert resolve_paths(str(adapter_dir)) == (str(model_dir), str(adapter_dir), str(model_dir))
    assert ChatModel.load(str(adapter_dir)).generate([user("q")])[0].text == "B"


@pytest.mark.unit
def test_tokenizer_without_template_is_a_clear_error(tmp_path, tiny_tokenizer, tiny_llama):
    from medgpt_ds.inference import ChatModel

    tok = save_chat_tokenizer(tiny_tokenizer, tmp_path, chat_template=None)
    with pytest.raises(ValueError, match="--template_name"):
        ChatModel(tiny_llama(len(tok)), tok)


@pytest.mark.unit
def test_template_name_override(tmp_path, tiny_tokenizer, model_dir):
    templates = pytest.importorskip("medgpt_ds.data.templates", reason="medgpt_ds.data.templates not present")
    from medgpt_ds.inference import load_chat_tokenizer

    save_chat_tokenizer(tiny_tokenizer, tmp_path, chat_template=None)
    tok = load_chat_tokenizer(str(tmp_path), template_name="chatml")
    assert tok.chat_template == templates.get_chat_template("chatml", tok)
    assert "<|im_start|>assistant" in tok.apply_chat_template(user("hi"), tokenize=False, add_generation_prompt=True)


@pytest.mark.unit
def test_record_to_messages_shapes():
    from medgpt_ds.inference import record_to_messages

    u = user("q")
    assert record_to_messages({"messages": [*u, {"role": "assistant", "content": "ref"}]}) == u
    assert record_to_messages({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}) == u
    assert record_to_messages({"prompt": "q"}) == u
    assert record_to_messages({"prompt": u, "answer": "x"}) == u
    assert record_to_messages({"question": "q"}) == u
    assert record_to_messages({"instruction": "do", "input": "this"}) == user("do\nthis")
    assert record_to_messages({"question": "q"}, "sys")[0] == {"role": "system", "content": "sys"}
    with pytest.raises(ValueError, match="no prompt"):
        record_to_messages({"answer": "x"})


@pytest.mark.unit
def test_shard_map_one_rank_keeps_order():
    from medgpt_ds.inference import shard_map

    assert shard_map(lambda xs: [x * 10 for x in xs], list(range(7)), batch_size=3) == [x * 10 for x in range(7)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def _chat_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("chat_cli", ROOT / "tools/chat.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.smoke
def test_chat_cli_batch_mode_and_one_prompt(tmp_path, model_dir, adapter_dir, digit_model_dir, capsys):
    cli = _chat_cli()
    rows = [{"question": "What is a fever?", "id": 1}, {"messages": user("hi")}, {"prompt": "Explain anemia."}]
    src, dst = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cli.main(["--model_name_or_path", str(model_dir), "--input_file", str(src), "--output_file", str(dst),
              "--batch_size", "2", "--max_new_tokens", "8"])
    out = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert out == [{**r, "response": ANSWER} for r in rows]
    # the same through the adapter, answers to stdout
    capsys.readouterr()
    cli.main(["--model_name_or_path", str(model_dir), "--adapter_name_or_path", str(adapter_dir), "--input_file", str(src)])
    assert [json.loads(line)["response"] for line in capsys.readouterr().out.splitlines()] == ["B"] * 3
    # one question on the command line, as the README demo asks it
    cli.main(["--model_name_or_path", str(model_dir), "--prompt", "What are the symptoms of influenza?"])
    assert capsys.readouterr().out.splitlines() == ["User: What are the symptoms of influenza?", f"Assistant: {ANSWER}"]
    # batches of 2 over rows with different answers: each output row answers its own input row
    rows = [{"question": f"Patient in bed {n}?" if n else "Patient in bed?"} for n in (7, 0, 9, 8, 0)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cli.main(["--model_name_or_path", str(digit_model_dir), "--input_file", str(src), "--output_file", str(dst),
              "--batch_size", "2", "--max_new_tokens", "8"])
    got = [json.loads(line)["response"] for line in dst.read_text(encoding="utf-8").splitlines()]
    assert got == ["7 B", ANSWER, "9 B", "8 B", ANSWER]
    # a bad input row: tests/test_user_errors.py (one error line naming file:line and field)


@pytest.mark.smoke
def test_chat_cli_interactive_in_a_pty(model_dir):
    pexpect = pytest.importorskip("pexpect", reason="pexpect not installed (pip install pexpect)")
    child = pexpect.spawn(sys.executable, [str(ROOT / "tools/chat.py"), "--model_name_or_path", str(model_dir)],
                          env=_env(), encoding="utf-8", timeout=120)
    try:
        child.expect("/clear resets")
        for question in ("What causes a fever?", "And a cough?"):  # two turns of one conversation
            child.expect("User: ")
            child.sendline(question)
            child.expect(f"Assistant: {ANSWER}\r\n")
        child.expect("User: ")
        child.sendline("/clear")
        child.expect("conversation cleared")
        child.expect("User: ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
