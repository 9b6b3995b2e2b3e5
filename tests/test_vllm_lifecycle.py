"""The vLLM server's life: start-up errors with the log's tail, health timeout, close(), connect() to
a server started elsewhere, and no orphans when the trainer is SIGKILLed.

The mechanics run against a fake "vLLM" (a stdlib HTTP server started through a fake interpreter)
that behaves like the real one where it matters: it forks a grandchild into the same process group
(vLLM's EngineCore), maps a /dev/shm segment (vLLM's message queues) and can ignore SIGTERM (so the
guard must escalate to SIGKILL). The last test does the same with the real vLLM server.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from medgpt_ds import vllm_server as vs
from medgpt_ds.errors import UserError
from tests.launch_utils import ROOT

FAKE_SERVER = textwrap.dedent("""
    import http.server, mmap, os, signal, sys, time
    port = int(sys.argv[sys.argv.index("--port") + 1])
    mode = os.environ["FAKE_MODE"]
    print("fake vllm: loading model", sys.argv[sys.argv.index("--model") + 1], flush=True)
    if mode == "crash":
        print("fake vllm: ValueError: unsupported head size 8", flush=True)
        sys.exit(3)
    if os.fork() == 0:  # the engine core: same process group, ignores SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(1000)
        os._exit(0)
    shm = os.environ["FAKE_SHM"]
    with open(shm, "wb") as f:
        f.write(b"0" * 4096)
    mapped = mmap.mmap(os.open(shm, os.O_RDWR), 4096)
    if os.environ.get("FAKE_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "hang":
        time.sleep(1000)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


@pytest.fixture
def fake(tmp_path):
    """A fake interpreter: `fake_python -m vllm... --port P` runs FAKE_SERVER."""
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    python = tmp_path / "fake_python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    python.chmod(0o755)
    shm = f"/dev/shm/medgpt-test-{uuid.uuid4().hex[:8]}"
    yield python, shm
    if os.path.exists(shm):
        os.unlink(shm)


def config(tmp_path, python, **kw) -> vs.ServerConfig:
    return vs.ServerConfig(model="/models/tiny", python=str(python), log_path=str(tmp_path / "logs" / "vllm.log"),
                           shutdown_grace_s=1.0, **kw)


def wait_gone(pgid: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := vs._group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.smoke
def test_crash_at_start_reports_the_log_tail(tmp_path, fake, monkeypatch):
    python, shm = fake
    monkeypatch.setenv("FAKE_MODE", "crash")
    monkeypatch.setenv("FAKE_SHM", shm)
    with pytest.raises(vs.VLLMServerError) as e:
        vs.start_server(config(tmp_path, python))
    msg = str(e.value)
    assert "exited (code 3) during start-up" in msg and "unsupported head size 8" in msg
    assert str(tmp_path / "logs" / "vllm.log") in msg


@pytest.mark.smoke
def test_health_timeout_kills_the_whole_group(tmp_path, fake, monkeypatch):
    python, shm = fake
    monkeypatch.setenv("FAKE_MODE", "hang")
    monkeypatch.setenv("FAKE_SHM", shm)
    monkeypatch.setenv("FAKE_IGNORE_TERM", "1")
    with pytest.raises(vs.VLLMServerError, match="did not answer /health within 4 s") as e:
        vs.start_server(config(tmp_path, python, startup_timeout_s=4))
    assert "fake vllm: loading model /models/tiny" in str(e.value)
    script = str(tmp_path / "fake_server.py")
    assert not [p for p in _all_pids() if script in _cmdline(p)], "a fake vLLM process survived"
    assert not os.path.exists(shm), "the guard must unlink the shared memory the group had mapped"


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.smoke
def test_close_stops_everything_and_connect_never_kills(tmp_path, fake, monkeypatch):
    python, shm = fake
    monkeypatch.setenv("FAKE_MODE", "serve")
    monkeypatch.setenv("FAKE_SHM", shm)
    monkeypatch.setenv("FAKE_IGNORE_TERM", "1")  # SIGTERM ignored everywhere: the guard must escalate
    server = vs.start_server(config(tmp_path, python))
    assert server.url.startswith("http://127.0.0.1:") and server.client.healthy()
    members = vs._group_members(server.pgid)
    assert len(members) == 3, members  # guard, server, its forked "engine core"
    other = vs.connect(server.url)
    assert not other.owned
    other.close()  # a connected server is someone else's: still up
    assert server.client.healthy()
    pgid = server.pgid
    server.close()
    assert wait_gone(pgid) == []
    assert not os.path.exists(shm)
    assert "vLLM stopped" in (tmp_path / "logs" / "vllm.log").read_text()
    with pytest.raises(vs.VLLMServerError, match="no answer on /health"):
        vs.connect(server.url, timeout_s=1)


PARENT = """
import json, sys, time
sys.path.insert(0, {root!r})
from medgpt_ds import vllm_server as vs
cfg = vs.ServerConfig(**json.loads(sys.argv[1]))
server = vs.start_server(cfg)
members = vs._group_members(server.pgid)
print(json.dumps({{"pgid": server.pgid, "members": members, "shm": sorted(vs._mapped_shm(members))}}), flush=True)
time.sleep(1000)
"""


def kill_parent_and_check(tmp_path, cfg: vs.ServerConfig, env: dict, min_members: int, timeout: float) -> dict:
    """Start ``cfg`` from a trainer-like parent, SIGKILL the parent, and check the group and its /dev/shm
    segments are gone."""
    fields = {k: getattr(cfg, k) for k in ("model", "python", "log_path", "dtype", "max_model_len",
                                           "shutdown_grace_s", "startup_timeout_s")}
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(root=ROOT), json.dumps(fields)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = parent.stdout.readline()
        info = json.loads(line)
    except ValueError:
        parent.kill()
        raise AssertionError(f"parent failed: {line}{parent.stdout.read()[-3000:]}")
    assert len(info["members"]) >= min_members, info
    info["cmdlines"] = [_cmdline(p) for p in info["members"]]
    parent.kill()  # SIGKILL: no atexit, no handlers in the trainer
    parent.wait()
    assert wait_gone(info["pgid"], timeout) == [], "vLLM processes outlived the killed trainer"
    left = [p for p in info["shm"] if os.path.exists(p)]
    assert left == [], f"shared memory left behind: {left}"
    return info


@pytest.mark.smoke
def test_sigkilled_parent_leaves_no_process(tmp_path, fake):
    python, shm = fake
    env = dict(os.environ, FAKE_MODE="serve", FAKE_SHM=shm, FAKE_IGNORE_TERM="1")
    info = kill_parent_and_check(tmp_path, config(tmp_path, python), env, min_members=3, timeout=30)
    assert shm in info["shm"]


@pytest.mark.unit
def test_resolve_vllm_python_errors(tmp_path):
    with pytest.raises(UserError, match="no such executable"):
        vs.resolve_vllm_python(str(tmp_path / "nope" / "python"))
    no_vllm = tmp_path / "python_without_vllm"
    no_vllm.write_text("#!/bin/sh\nexit 1\n")
    no_vllm.chmod(0o755)
    with pytest.raises(UserError, match="cannot import vllm"):
        vs.resolve_vllm_python(str(no_vllm))


@pytest.mark.unit
def test_server_command_and_env():
    cfg = vs.ServerConfig(model="/m", python="/py", log_path="/tmp/x.log", dtype="bfloat16", enable_lora=True,
                          max_lora_rank=12, max_model_len=1024, devices="2,3")
    cmd = vs.server_command(cfg, 8123)
    assert cmd[:3] == ["/py", "-m", vs.ENTRYPOINT]
    joined = " ".join(cmd)
    for part in ("--model /m", "--host 127.0.0.1", "--port 8123", "--dtype bfloat16", "--enforce-eager",
                 "--enable-lora", "--max-lora-rank 16", "--max-model-len 1024",
                 "--logprobs-mode processed_logprobs", "--generation-config vllm"):
        assert part in joined, part
    os.environ["RANK"] = "1"
    try:
        env = vs.server_env(cfg)
    finally:
        del os.environ["RANK"]
    assert "RANK" not in env and env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == ROOT
    with pytest.raises(UserError, match="above vLLM's maximum"):
        vs.server_command(vs.ServerConfig(model="/m", python="/py", log_path="/x", enable_lora=True,
                                          max_lora_rank=1024), 1)
    assert "chunked" not in joined  # GPU servers keep vLLM's chunked prefill
    # the CPU server: no chunked prefill (seeded requests), and a step budget that fits the longest prompt
    cpu = " ".join(vs.server_command(vs.ServerConfig(model="/m", python="/py", log_path="/x", max_model_len=4096,
                                                     chunked_prefill=False), 1))
    assert "--no-enable-chunked-prefill --max-num-batched-tokens 4096" in cpu


@pytest.mark.vllm
def test_sigkilled_trainer_leaves_no_vllm_process(tmp_path, tiny_llama, demo_tokenizer_dir):
    from transformers import AutoTokenizer

    try:
        python = vs.resolve_vllm_python()
    except UserError as e:
        pytest.skip(f"no vLLM interpreter ({e}): run `make rollout-env`")
    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    model = tiny_llama(len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    model.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    cfg = vs.ServerConfig(model=str(tmp_path / "policy"), python=python, log_path=str(tmp_path / "logs" / "vllm.log"),
                          dtype="float32", max_model_len=128)
    info = kill_parent_and_check(tmp_path, cfg, dict(os.environ), min_members=4, timeout=60)
    assert any(vs.ENTRYPOINT in c for c in info["cmdlines"])  # the real server was among the processes that are now gone
    assert "parent gone" in (tmp_path / "logs" / "vllm.log").read_text()
