"""MedicalGPT's demo/ and tools/ flags on our tools: demo/inference.py's on tools/chat.py (plain-text
--data_file in, --predictions_file out), demo/gradio_demo.py's on tools/web_demo.py, tools/
merge_peft_adapter.py's on tools/merge_lora.py, openai_api.py's bind flags on tools/serve.py.

The model is the bigram chat model of tests/helpers.py: it answers "A B", and "B" through the LoRA
adapter of conftest.py, so the answers show which weights were loaded."""
from __future__ import annotations

import importlib.util
import json

import pytest

from tests.helpers import ANSWER
from tests.launch_utils import ROOT

pytestmark = pytest.mark.medicalgpt


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", f"{ROOT}/tools/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_chat_runs_medicalgpt_inference_flags(tmp_path, model_dir, adapter_dir):
    """demo/inference.py's batch command line: one question a line in, jsonl predictions out."""
    questions = ["What causes a fever?", "乙肝和丙肝的区别？", "How should I take this tablet?"]
    src, dst = tmp_path / "questions.txt", tmp_path / "predictions.jsonl"
    src.write_text("\n".join(questions[:2]) + "\n\n" + questions[2] + "\n", encoding="utf-8")  # a blank line
    chat = tool("chat")
    rc = chat.main(["--base_model", str(model_dir), "--lora_model", str(adapter_dir), "--tokenizer_path", str(model_dir),
                    "--data_file", str(src), "--predictions_file", str(dst), "--eval_batch_size", "2",
                    "--system_prompt", "You are a doctor.", "--stop_str", "", "--max_new_tokens", "8",
                    "--repetition_penalty", "1.0", "--only_cpu"])
    assert rc == 0
    rows = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    # in input order, each with its question and the adapter's answer, as MedicalGPT's predictions file
    assert rows == [{"Input": q, "Output": "B"} for q in questions]
    # --lora_model "" (MedicalGPT's default) is the base model alone; --stop_str cuts the answer
    rc = chat.main(["--base_model", str(model_dir), "--lora_model", "", "--data_file", str(src), "--predictions_file",
                    str(dst), "--stop_str", " B", "--use_cpu"])
    assert rc == 0
    rows = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"Input": q, "Output": ANSWER.split()[0]} for q in questions]


def test_chat_single_tune_asks_each_question_alone(monkeypatch, capsys):
    """MedicalGPT's --single_tune: interactive chat that sends no history (multi-turn is the default)."""
    chat = tool("chat")

    class Recorder:
        name, sent = "fake", []

        def stream(self, history, cfg):
            self.sent.append([m["content"] for m in history])
            yield "ok"

    for single, expected in ((True, [["sys", "q1"], ["sys", "q2"]]), (False, [["sys", "q1"], ["sys", "q1", "ok", "q2"]])):
        typed = ["q1", "q2"]

        def user(_prompt):
            if not typed:
                raise EOFError  # Ctrl-D ends the chat
            return typed.pop(0)

        monkeypatch.setattr("builtins.input", user)
        rec = Recorder()
        rec.sent = []
        chat.interactive(rec, None, "sys", single_turn=single)
        assert rec.sent == expected
    assert chat.parse_args(["--base_model", "m", "--single_tune", "--interactive"]).single_turn


def test_chat_flag_conflicts_and_8bit(tmp_path, model_dir, capsys):
    chat = tool("chat")
    with pytest.raises(SystemExit):
        chat.parse_args(["--base_model", str(model_dir), "--interactive", "--data_file", str(tmp_path / "q.txt")])
    assert "--interactive excludes --input_file (--data_file)" in capsys.readouterr().err
    args = chat.parse_args(["--base_model", str(model_dir), "--interactive", "--load_in_8bit", "--resize_emb"])
    assert args.interactive and args.load_in_8bit and args.resize_emb and args.model_name_or_path == str(model_dir)
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    from medgpt_ds.inference import GenerationConfig, load_from_args

    loaded = load_from_args(args)  # 8-bit weights keep the bigram's wide margins: same answer
    assert type(loaded.model.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    assert loaded.generate([[{"role": "user", "content": "hi"}]], GenerationConfig(max_new_tokens=8))[0].text == ANSWER


def test_web_demo_takes_gradio_demo_flags_and_refuses_a_public_share(tmp_path, model_dir, adapter_dir, capsys,
                                                                     monkeypatch):
    web = tool("web_demo")
    argv = ["--base_model", str(model_dir), "--lora_model", str(adapter_dir), "--tokenizer_path", str(model_dir),
            "--template_name", "chatml", "--system_prompt", "", "--context_len", "64", "--max_new_tokens", "8",
            "--only_cpu", "--resize_emb", "--port", "8081"]
    args = web.parse_args(argv)
    assert (args.model_name_or_path, args.adapter_name_or_path, args.device, args.context_len) == (
        str(model_dir), str(adapter_dir), "cpu", 64)
    from medgpt_ds.inference import load_from_args

    assert load_from_args(args).max_length == 64  # --context_len caps the model's 512 positions
    monkeypatch.delenv(web.AUTH_ENV, raising=False)
    capsys.readouterr()
    assert web.main([*argv, "--share"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --share would publish") and "binds 127.0.0.1:8081" in err and len(err.splitlines()) == 1
    monkeypatch.setenv(web.AUTH_ENV, "doctor:secret")
    web.check_share(web.parse_args([*argv, "--share"]), web.read_auth(args))  # behind a login: allowed


def test_merge_lora_takes_merge_peft_adapter_flags(tmp_path, model_dir, adapter_dir, monkeypatch):
    merge = tool("merge_lora")
    monkeypatch.chdir(tmp_path)
    rc = merge.main(["--base_model", str(model_dir), "--lora_model", str(adapter_dir), "--tokenizer_path",
                     str(model_dir), "--resize_emb"])
    assert rc == 0
    from medgpt_ds.inference import ChatModel

    merged = ChatModel.load(str(tmp_path / "merged"))  # MedicalGPT's default --output_dir ./merged
    assert merged.generate([[{"role": "user", "content": "hi"}]])[0].text == "B"


def test_serve_takes_openai_api_bind_flags(model_dir):
    args = tool("serve").parse_args(["--base_model", str(model_dir), "--server_name", "127.0.0.2", "--server_port",
                                     "8001", "--cpu_only"])
    assert (args.model_name_or_path, args.host, args.port, args.device) == (str(model_dir), "127.0.0.2", 8001, "cpu")


def test_resize_emb_sizes_the_embeddings_to_a_larger_tokenizer(model_dir):
    """MedicalGPT's --resize_emb: a tokenizer extended after the base was saved gets embedding rows."""
    from transformers import AutoTokenizer

    from medgpt_ds.inference import load_causal_lm

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = load_causal_lm(str(model_dir), tokenizer=tok, device="cpu").get_input_embeddings().weight.shape[0]
    tok.add_tokens(["<drug_a>", "<drug_b>", "<drug_c>"])
    assert load_causal_lm(str(model_dir), tokenizer=tok, device="cpu").get_input_embeddings().weight.shape[0] == base
    resized = load_causal_lm(str(model_dir), tokenizer=tok, device="cpu", resize_emb=True)
    assert resized.get_input_embeddings().weight.shape[0] == len(tok) > base
