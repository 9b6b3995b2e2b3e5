"""The OpenAI-compatible server, live on loopback: tools/serve.py started as users start it, driven
with the official `openai` client (streaming and not) and with raw HTTP for bad requests.

The model is the hand-built echo model of tests/helpers.py: "A B" to every chat without the digits
7, 8 or 9 (all but the concurrency test), "<digit> B" to a chat holding one, so concurrent clients
show whether each got the answer to its own question.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ANSWER, echo_answer

ROOT = Path(__file__).resolve().parents[1]

# only the live-server tests need these (they all go through the `server` fixture, which skips without
# them); the unit tests below run without any
try:
    import httpx
    import openai
except ImportError:
    httpx = openai = None

KEY = "test-key-123"
CAP = 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(echo_model_dir):
    pytest.importorskip("openai", reason="openai not installed (pip install openai)")
    pytest.importorskip("httpx", reason="httpx not installed")
    pytest.importorskip("fastapi", reason="fastapi not installed (pip install fastapi uvicorn)")
    pytest.importorskip("uvicorn", reason="uvicorn not installed (pip install uvicorn)")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEDGPT_API_KEY": KEY, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ROOT / "tools/serve.py"), "--model_name_or_path", str(echo_model_dir), "--port", str(port),
           "--served_model_name", "tiny", "--max_tokens_cap", str(CAP), "--max_body_bytes", "4096",
           "--log_level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to ~120 s for imports on a loaded machine
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("server did not answer /health")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def q(text: str = "What causes a fever?") -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a careful doctor."}, {"role": "user", "content": text}]


@pytest.mark.smoke
def test_health_and_models(server, client):
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "model": "tiny"}
    assert [m.id for m in client.models.list().data] == ["tiny"]


@pytest.mark.smoke
def test_chat_completion(client):
    r = client.chat.completions.create(model="tiny", messages=q(), temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ANSWER
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 4  # A, space, B, <|im_end|>
    assert r.usage.total_tokens == r.usage.prompt_tokens + 4 and r.usage.prompt_tokens > 10
    r = client.chat.completions.create(model="tiny", messages=q(), max_tokens=2)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("A ", "length")
    r = client.chat.completions.create(model="tiny", messages=q(), stop=[" B"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("A", "stop")
    # content as a list of text parts, multi-turn history
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "A B"}, {"role": "user", "content": "again?"}]
    assert client.chat.completions.create(model="tiny", messages=msgs).choices[0].message.content == ANSWER


@pytest.mark.smoke
def test_chat_completion_streaming(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=q(), stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    texts = [d.content for d in deltas if d.content]
    assert "".join(texts) == ANSWER and len(texts) > 1  # streamed in pieces (cut where the streamer cuts), not at once
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == 4
    # stop string while streaming: nothing past it is ever sent
    chunks = list(client.chat.completions.create(model="tiny", messages=q(), stream=True, stop="B"))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "A "


@pytest.mark.smoke
def test_sse_wire_format(server):
    body = {"model": "tiny", "messages": q(), "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def _post(server, body, key: str | None = KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{server}/v1/chat/completions", content=body,
                          headers={**headers, "Content-Type": "application/json"}, timeout=60, **kw)
    return httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers, timeout=60, **kw)


@pytest.mark.smoke
def test_bad_requests_get_clear_4xx_json(server, client):
    def err(resp, status: int) -> dict:
        assert resp.status_code == status, resp.text
        return resp.json()["error"]

    assert err(_post(server, b'{"model": "tiny", "messages": [}'), 400)["code"] == "invalid_json"
    assert err(_post(server, b"[1, 2]"), 400)["code"] == "invalid_json"
    e = err(_post(server, {"model": "gpt-4", "messages": q()}), 404)
    assert e["code"] == "model_not_found" and "tiny" in e["message"]
    assert err(_post(server, {"model": "tiny", "messages": []}), 400)["param"] == "messages"
    assert err(_post(server, {"model": "tiny", "messages": [{"role": "user", "content": " "}]}), 400)["param"] == "messages"
    assert err(_post(server, {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}), 400)
    e = err(_post(server, {"model": "tiny", "messages": q(), "max_tokens": CAP + 1}), 400)
    assert e["code"] == "max_tokens_exceeded" and str(CAP) in e["message"]
    e = err(_post(server, {"model": "tiny", "messages": q("fever " * 470), "max_tokens": CAP}), 400)
    assert e["code"] == "context_length_exceeded" and "512" in e["message"]
    assert err(_post(server, {"model": "tiny", "messages": q(), "n": 2}), 400)["param"] == "n"
    assert err(_post(server, {"model": "tiny", "messages": q(), "temperature": "hot"}), 400)["param"] == "temperature"
    assert err(_post(server, {"model": "tiny", "messages": q("x" * 5000)}), 413)["code"] == "body_too_large"
    # the API key guards /v1 (not /health)
    assert err(_post(server, {"model": "tiny", "messages": q()}, key=None), 401)["type"] == "authentication_error"
    assert err(httpx.get(f"{server}/v1/models"), 401)["code"] == "invalid_api_key"
    assert err(httpx.get(f"{server}/nope"), 404)["message"]
    # the same errors through the official client
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=q())
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=q(), max_tokens=CAP + 1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    # and the server still answers afterwards
    assert client.chat.completions.create(model="tiny", messages=q()).choices[0].message.content == ANSWER


@pytest.mark.unit
def test_secure_defaults(monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    import serve

    monkeypatch.delenv("MEDGPT_API_KEY", raising=False)
    args = serve.parse_args(["--model_name_or_path", "m"])
    assert args.host == "127.0.0.1" and args.trust_remote_code is False and args.api_key is None
    assert serve._is_loopback("127.0.0.1") and serve._is_loopback("::1") and serve._is_loopback("localhost")
    assert not serve._is_loopback("0.0.0.0")


@pytest.mark.unit
def test_vllm_script_dry_run(model_dir, tmp_path):
    """tools/vllm_serve.sh without vLLM: the command it would run, and the stop ids it hands vLLM."""
    import json

    script = ROOT / "tools/vllm_serve.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "TMPDIR": str(tmp_path), "PORT": "8123",
           "MEDGPT_API_KEY": "k"}
    res = subprocess.run(["bash", str(script), str(model_dir), "--max-num-seqs", "4"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    cmd = res.stdout.split()
    assert cmd[:3] == ["vllm", "serve", str(model_dir)]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[-2:] == ["--max-num-seqs", "4"] and "k" not in cmd  # the key travels in VLLM_API_KEY
    gen = json.loads((Path(cmd[cmd.index("--generation-config") + 1]) / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    res = subprocess.run(["bash", str(script), str(tmp_path)], env=env, capture_output=True, text=True)
    assert res.returncode == 1 and "no config.json" in res.stderr


@pytest.mark.smoke
def test_concurrent_requests_are_all_answered(client):
    """Generation is serialised inside the server; simultaneous clients (streaming and not) all get
    whole answers, each the answer to its own question."""
    from concurrent.futures import ThreadPoolExecutor

    questions = [f"Is bed {n} free?" if n else "Is the bed free?" for n in (7, 8, 0, 9, 7, 0, 8, 9)]

    def ask(i: int) -> str:
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="tiny", messages=q(questions[i]), stream=True) if c.choices)
        return client.chat.completions.create(model="tiny", messages=q(questions[i])).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, range(len(questions))))
    assert got == [echo_answer(t) for t in questions] and len(set(got)) == 4
