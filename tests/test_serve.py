"""The OpenAI-compatible server, live on loopback: tools/serve.py started as users start it, driven
with the official `openai` client (streaming and not) and with raw HTTP for bad requests, clients
that hang up, a full queue, a wedged generator and SIGTERM.

The model is the echo model of tests/echo_model.py: it answers "A <keyword>" for the keyword the
conversation names most, so every answer is checked against its own prompt; " pain" never ends its
turn (the long generations that clients walk away from).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from tests.echo_model import KEYWORDS, LOOP, expected_answer

ROOT = Path(__file__).resolve().parents[1]

KEY = "test-key-123"
CAP = 4000  # max_tokens cap: a LOOP answer this long takes seconds, long enough to walk away from
QUEUE = 3  # --max_queue: one generating + 3 waiting
WORDS = [k for k in KEYWORDS if k != LOOP]


def _need_http():
    """The client-side packages of the live tests (the unit tests below need none of them)."""
    for mod, pkg in (("openai", "openai"), ("httpx", "httpx"), ("fastapi", "fastapi uvicorn"), ("uvicorn", "uvicorn")):
        pytest.importorskip(mod, reason=f"{mod} not installed (pip install {pkg})")
    import httpx
    import openai

    return openai, httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(echo_model_dir, tmp_path_factory):
    """tools/serve.py on the echo model: .url, .proc, .log (its output, a file: a pipe nobody reads fills up)."""
    _, httpx = _need_http()
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEDGPT_API_KEY": KEY, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ROOT / "tools/serve.py"), "--model_name_or_path", str(echo_model_dir),
           "--port", str(port), "--served_model_name", "tiny", "--max_tokens_cap", str(CAP), "--max_body_bytes", "4096",
           "--max_queue", str(QUEUE), "--shutdown_timeout", "1", "--log_level", "info"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    srv = types.SimpleNamespace(url=f"http://127.0.0.1:{port}", proc=proc, log=log)
    try:
        for _ in range(600):  # up to ~120 s for imports on a loaded machine
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{srv.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("server did not answer /health")
        yield srv
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture()
def client(server):
    openai, _ = _need_http()
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def q(text: str = "What causes a fever?") -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a careful doctor."}, {"role": "user", "content": text}]


def health(server) -> dict:
    import httpx

    return httpx.get(f"{server.url}/health", timeout=30).json()


def idle(server) -> dict:
    """/health once no generation runs or waits (the cancelled ones have reached their next token)."""
    for _ in range(600):
        h = health(server)
        if not h["running"] and not h["waiting"] and not h["queue"]["active"]:
            return h
        time.sleep(0.1)
    pytest.fail(f"the server never went idle: {h}")


@pytest.mark.smoke
def test_health_and_models(server, client):
    h = health(server)
    assert (h["status"], h["model"], h["running"], h["waiting"]) == ("ok", "tiny", False, 0)
    assert h["queue"] == {"active": 0, "limit": 1 + QUEUE}
    assert [m.id for m in client.models.list().data] == ["tiny"]


@pytest.mark.smoke
def test_chat_completion(client):
    r = client.chat.completions.create(model="tiny", messages=q(), temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "A fever"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 3  # A, " fever", <|im_end|>
    assert r.usage.total_tokens == r.usage.prompt_tokens + 3 and r.usage.prompt_tokens > 10
    r = client.chat.completions.create(model="tiny", messages=q("a cough and a cough"), max_tokens=1)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("A", "length")
    r = client.chat.completions.create(model="tiny", messages=q("the lung"), stop=[" lung"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("A", "stop")
    # content as a list of text parts, multi-turn history: the answer comes from the first turn
    msgs = [{"role": "user", "content": [{"type": "text", "text": "my kidney and kidney"}]},
            {"role": "assistant", "content": "A kidney"}, {"role": "user", "content": "and now?"}]
    assert client.chat.completions.create(model="tiny", messages=msgs).choices[0].message.content == "A kidney"


@pytest.mark.smoke
def test_chat_completion_streaming(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=q("the blood test"), stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    texts = [d.content for d in deltas if d.content]
    assert "".join(texts) == "A blood" and len(texts) > 1  # streamed in pieces, not at once
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == 3
    # stop string while streaming: nothing past it is ever sent
    chunks = list(client.chat.completions.create(model="tiny", messages=q("a headache"), stream=True, stop="head"))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "A "


@pytest.mark.smoke
def test_sse_wire_format(server):
    import httpx

    body = {"model": "tiny", "messages": q(), "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def _post(server, body, key: str | None = KEY, **kw):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = f"{server.url}/v1/chat/completions"
    if isinstance(body, (bytes, str)):
        return httpx.post(url, content=body, headers={**headers, "Content-Type": "application/json"},
                          **{"timeout": 60, **kw})
    return httpx.post(url, json=body, headers=headers, **{"timeout": 60, **kw})


@pytest.mark.smoke
def test_bad_requests_get_clear_4xx_json(server, client):
    import httpx
    import openai

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
    e = err(_post(server, {"model": "tiny", "messages": q("fever " * 200), "max_tokens": CAP}), 400)
    assert e["code"] == "context_length_exceeded" and "4096" in e["message"]
    assert err(_post(server, {"model": "tiny", "messages": q(), "n": 2}), 400)["param"] == "n"
    assert err(_post(server, {"model": "tiny", "messages": q(), "temperature": "hot"}), 400)["param"] == "temperature"
    assert err(_post(server, {"model": "tiny", "messages": q("x" * 5000)}), 413)["code"] == "body_too_large"
    # the API key guards /v1 (not /health)
    assert err(_post(server, {"model": "tiny", "messages": q()}, key=None), 401)["type"] == "authentication_error"
    assert err(httpx.get(f"{server.url}/v1/models"), 401)["code"] == "invalid_api_key"
    assert err(httpx.get(f"{server.url}/nope"), 404)["message"]
    # the same errors through the official client
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=q())
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=q(), max_tokens=CAP + 1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    # and the server still answers afterwards
    assert client.chat.completions.create(model="tiny", messages=q()).choices[0].message.content == "A fever"


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
    """Generation is serialised inside the server; simultaneous clients each get their own whole answer."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(i: int) -> str:
        prompt = q(f"is it the {WORDS[i]} or the {WORDS[i]}?")
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(model="tiny", messages=prompt, stream=True) if c.choices)
        return client.chat.completions.create(model="tiny", messages=prompt).choices[0].message.content

    with ThreadPoolExecutor(1 + QUEUE) as pool:
        assert list(pool.map(ask, range(len(WORDS)))) == [f"A {w}" for w in WORDS]


def _long(client):
    """A streaming request for a LOOP answer of CAP tokens (seconds of work), its first chunk read."""
    s = client.chat.completions.create(model="tiny", messages=q(f"the {LOOP}"), max_tokens=CAP, stream=True)
    first = next(iter(s))
    assert first.choices[0].delta.role == "assistant"
    return s


@pytest.mark.smoke
def test_clients_that_hang_up_cancel_their_generation(server, client):
    """The deadlock of issue 11: a client reads one chunk of a long answer and closes. Ten times in a
    row, each followed by a request that must be answered; then a client that leaves while queued
    (before its first token) and a non-streaming client that times out. Every one of them is
    cancelled (the server's counts), none runs to its CAP tokens."""
    import httpx

    before = idle(server)
    for i in range(10):
        s = client.chat.completions.create(model="tiny", messages=q(f"the {LOOP}"), max_tokens=CAP, stream=True)
        chunks = iter(s)
        next(chunks)  # the role chunk
        assert next(chunks).choices[0].delta.content  # a piece of the answer: it is generating
        s.close()
        word = WORDS[i % len(WORDS)]
        r = client.chat.completions.create(model="tiny", messages=q(f"about the {word}"))
        assert r.choices[0].message.content == expected_answer(f"about the {word}")
    h = idle(server)
    assert h["cancelled"] - before["cancelled"] == 10 and h["completed"] - before["completed"] == 10
    assert h["failed"] == before["failed"] == 0

    # leaves while queued behind a long generation: never gets the model
    holder = _long(client)
    queued = client.chat.completions.create(model="tiny", messages=q(f"the {LOOP}"), max_tokens=CAP, stream=True)
    next(iter(queued))  # the role chunk comes at once, before the model is free
    assert health(server)["waiting"] == 1
    queued.close()
    for _ in range(600):
        if health(server)["waiting"] == 0:
            break
        time.sleep(0.1)
    assert health(server)["running"]  # the holder is still generating: the queued one left on its own
    holder.close()
    # a non-streaming client that gives up during a long generation
    with pytest.raises(httpx.ReadTimeout):
        _post(server, {"model": "tiny", "messages": q(f"the {LOOP}"), "max_tokens": CAP}, timeout=2)
    h2 = idle(server)
    assert h2["cancelled"] - h["cancelled"] == 3 and h2["completed"] == h["completed"]
    assert client.chat.completions.create(model="tiny", messages=q("the virus")).choices[0].message.content == "A virus"
    assert "client went away; generation cancelled after" in server.log.read_text()


@pytest.mark.smoke
def test_full_queue_answers_503(server, client):
    """One generating and QUEUE waiting: the next request gets 503 with Retry-After at once; once they
    are gone the server answers again."""
    import openai

    held = [_long(client) for _ in range(1 + QUEUE)]
    try:
        assert health(server)["queue"]["active"] == 1 + QUEUE
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="tiny", messages=q())
        assert e.value.status_code == 503 and e.value.response.json()["error"]["code"] == "queue_full"
        assert 1 <= int(e.value.response.headers["Retry-After"]) <= 60
    finally:
        for s in held:
            s.close()
    idle(server)
    assert client.chat.completions.create(model="tiny", messages=q("the lung")).choices[0].message.content == "A lung"


@pytest.mark.smoke
def test_health_reports_a_wedged_generator(echo_model_dir):
    """/health answers 503 with the reason while the running generation makes no token for
    --stall_timeout seconds, and 200 again once it moves (in-process app, a forward that blocks)."""
    _need_http()
    from fastapi.testclient import TestClient

    sys.path.insert(0, str(ROOT / "tools"))
    import serve

    from medgpt_ds.inference import ChatModel, GenerationConfig

    chat = ChatModel.load(str(echo_model_dir))
    forward, entered, release = chat.model.forward, threading.Event(), threading.Event()

    def wedged_forward(*a, **kw):
        entered.set()
        release.wait()
        return forward(*a, **kw)

    chat.model.forward = wedged_forward
    with TestClient(serve.create_app(chat, "tiny", stall_timeout=0.2)) as http:
        assert http.get("/health").status_code == 200
        stream = chat.stream(q(f"the {LOOP}"), GenerationConfig(max_new_tokens=50))
        assert entered.wait(60)
        for _ in range(600):
            r = http.get("/health")
            if r.status_code == 503:
                break
            time.sleep(0.05)
        body = r.json()
        assert r.status_code == 503 and body["status"] == "unhealthy" and body["running"]
        assert "wedged" in body["reason"] and body["seconds_without_progress"] > 0.2
        # a server stopping cannot wait for it (it exits without it: serve.create_app's lifespan) ...
        assert chat.cancel_all(timeout=0.2) is False
        chat.model.forward = forward
        release.set()
        # ... and once it moves, the cancellation ends it at its next token
        assert chat.cancel_all(timeout=60) and stream.done and stream.completion.finish_reason == "cancelled"
        r = http.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["cancelled"] == 1


@pytest.mark.smoke
def test_sigterm_stops_the_server_mid_generation(server, client):
    """Last test of the module (it stops the module's server): SIGTERM while one long generation
    streams to a client that stopped reading and another waits; both are cancelled after
    --shutdown_timeout and the server exits, not after CAP tokens or never."""
    held = [_long(client), _long(client)]
    server.proc.send_signal(signal.SIGTERM)
    try:
        rc = server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        pytest.fail(f"SIGTERM did not stop the server:\n{server.log.read_text()[-3000:]}")
    finally:
        for s in held:
            s.close()
    log = server.log.read_text()
    assert rc in (0, -signal.SIGTERM), log[-3000:]
    assert "Shutting down" in log and log.count("the server is stopping; generation cancelled after") == 2
    # every request ended on its own: uvicorn's cut-off (for a wedged generation only) never fired
    assert "timeout graceful shutdown exceeded" not in log and "Traceback" not in log
