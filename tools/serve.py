"""OpenAI-compatible HTTP server for a trained model (FastAPI + uvicorn).

    MEDGPT_API_KEY=secret python tools/serve.py --model_name_or_path outputs/sft --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "..."}], stream=True)

Endpoints: POST /v1/chat/completions (streaming SSE or not), GET /v1/models, GET /health (no key:
200 {"status": "ok", ...}, or 503 {"status": "unhealthy", "reason": ...} when the running generation
has made no token for --stall_timeout seconds: a wedged GPU or kernel, time to restart the server).
Binds 127.0.0.1 unless --host says otherwise; another address needs an API key (or
--allow_public_without_key). With --api_key (or MEDGPT_API_KEY) every /v1 request needs
`Authorization: Bearer <key>`. Bad requests get a 4xx with an OpenAI-style JSON error:
malformed JSON, a body over --max_body_bytes, unknown model, empty or malformed messages,
max_tokens over --max_tokens_cap, prompt + max_tokens over the context length.
One generation runs at a time, the others wait in arrival order; at most --max_queue wait, more get
503 with Retry-After. A client that disconnects (stream or not, queued or generating) cancels its
generation at the next token. SIGTERM stops the server within --shutdown_timeout seconds, whatever
the requests in flight are doing. For throughput on merged models use tools/vllm_serve.sh.
"""

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medgpt_ds.errors import UserError, main_boundary
from medgpt_ds.inference import (
    ChatModel,
    GenerationConfig,
    TextStream,
    add_model_args,
    load_from_args,
)
from medgpt_ds.model import check_inference_model

API_KEY_ENV = "MEDGPT_API_KEY"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SHUTDOWN_JOIN_S = 5.0  # at exit, how long cancelled generations get to reach their next token
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
log = logging.getLogger("uvicorn.error")  # printed by uvicorn's handler, at --log_level


class RequestError(Exception):
    """A client error, answered as {"error": {...}} with this status (and these headers)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


class Admission:
    """The bounded request queue: at most ``limit`` generations running or waiting for the model.
    A request leaves when its generation thread ends (finished or cancelled), not when its client
    goes away, so the count is the work the model really has. Thread-safe (generation threads
    call leave())."""

    def __init__(self, limit: int) -> None:
        self.limit, self.active = limit, 0
        self._lock = threading.Lock()
        self._seconds = 1.0  # moving average of a request's time in the server, for Retry-After

    def enter(self) -> bool:
        with self._lock:
            if self.active >= self.limit:
                return False
            self.active += 1
            return True

    def leave(self, seconds: float) -> None:
        with self._lock:
            self.active -= 1
            self._seconds = 0.8 * self._seconds + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds until a place is likely free: one request's average time in the server, 1 to 60."""
        return int(min(60, max(1, math.ceil(self._seconds))))


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse_messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(400, f"{where}: needs a 'role' of {', '.join(ROLES)}", where)
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(400, f"{where}.content: only text parts are supported", where)
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(400, f"{where}.content must be a string", where)
        out.append({"role": ROLES[m["role"]], "content": content})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise RequestError(400, "'messages' has no non-empty user message", "messages")
    return out


def _number(body: dict, key: str, kind: type, lo: float, hi: float, default: Any) -> Any:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise RequestError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}", key)
    if not lo <= v <= hi:
        raise RequestError(400, f"'{key}' must be between {lo} and {hi}", key)
    return kind(v)


async def _collect(pieces: TextStream, request) -> str | None:
    """The whole answer of a non-streaming request, or None once its client has gone away (checked
    every DISCONNECT_POLL_S with Starlette's request.is_disconnected())."""
    parts: list[str] = []

    async def consume() -> None:
        async for piece in pieces:
            parts.append(piece)

    task = asyncio.ensure_future(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                task.result()  # a generation error surfaces here
                return "".join(parts)
            if await request.is_disconnected():
                return None
    finally:
        task.cancel()


def create_app(chat: ChatModel, model_name: str, api_key: str | None = None, max_tokens_cap: int = 2048,
               default_max_tokens: int = 512, max_body_bytes: int = 1 << 20, max_queue: int = 16,
               stall_timeout: float = 120.0):
    """The FastAPI app around one loaded ChatModel (tests build it directly). ``max_queue`` requests
    may wait while one generates (more: 503 + Retry-After); /health answers 503 once the running
    generation has made no token for ``stall_timeout`` seconds."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        # Shutdown (after uvicorn cancelled the requests still open): cancel what is left and let the
        # generation threads end, as an interpreter exiting under a running torch thread aborts; a
        # wedged one never looks at its cancellation, so exit without it rather than hang.
        if not await asyncio.to_thread(chat.cancel_all, SHUTDOWN_JOIN_S):
            log.error("a generation made no token in %g s after it was cancelled (wedged); exiting without it",
                      SHUTDOWN_JOIN_S)
            os._exit(1)

    app = FastAPI(title="medgpt-ds", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.stopping = False  # set on SIGTERM (main's server): requests in flight are being wound down
    admission = Admission(1 + max_queue)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:  # 404 / 405 in the same shape
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), api_key.encode()):
            raise RequestError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                               code="invalid_api_key", kind="authentication_error")

    async def read_json(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise RequestError(413, f"request body over {max_body_bytes} bytes", code="body_too_large")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body_bytes:
                raise RequestError(413, f"request body over {max_body_bytes} bytes", code="body_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object", code="invalid_json")
        return body

    @app.get("/health")
    async def health() -> JSONResponse:
        state = chat.health(stall_timeout)
        body = {**state, "model": model_name, "queue": {"active": admission.active, "limit": admission.limit}}
        return JSONResponse(body, status_code=200 if state["status"] == "ok" else 503)

    def start(messages: list[dict[str, str]], cfg: GenerationConfig, cid: str) -> TextStream:
        """Admit the request (503 when the queue is full) and start its generation."""
        if not admission.enter():
            raise RequestError(503, f"the server is busy: {admission.limit} requests are already running or queued "
                               "(--max_queue); retry later", code="queue_full", kind="server_error",
                               headers={"Retry-After": str(admission.retry_after())})
        began = time.monotonic()
        try:
            pieces = chat.stream(messages, cfg)
        except BaseException:
            admission.leave(time.monotonic() - began)
            raise

        def ended(c) -> None:  # in the generation thread, once it is over
            admission.leave(time.monotonic() - began)
            if c is not None and c.finish_reason == "cancelled":
                why = "the server is stopping" if app.state.stopping else "client went away"
                log.info("%s: %s; generation cancelled after %d tokens", cid, why, c.completion_tokens)

        pieces.add_done_callback(ended)
        return pieces

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "medgpt-ds"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await read_json(request)
        if body.get("model") != model_name:
            raise RequestError(404, f"model {body.get('model')!r} not found; this server serves {model_name!r}",
                               "model", "model_not_found")
        messages = parse_messages(body.get("messages"))
        if _number(body, "n", int, 1, 1, 1) != 1:
            raise RequestError(400, "only n=1 is supported", "n")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, "'stream' must be a boolean", "stream")
        try:
            prompt_tokens = len(chat.encode(messages))
        except Exception as e:  # noqa: BLE001 - a template may reject a role order (jinja raise_exception)
            raise RequestError(400, f"cannot render messages with the chat template: {e}", "messages") from None
        room = chat.max_length - prompt_tokens
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, key, int, 1, 1 << 31, None)
        if max_tokens is not None and max_tokens > max_tokens_cap:
            raise RequestError(400, f"'{key}' is {max_tokens}, over this server's limit of {max_tokens_cap}",
                               key, "max_tokens_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max_tokens, max_tokens_cap, room)
        if room <= 0 or prompt_tokens + max_tokens > chat.max_length:
            raise RequestError(400, f"this model's context length is {chat.max_length} tokens; the messages take "
                               f"{prompt_tokens} and {max_tokens} more were requested", "messages",
                               "context_length_exceeded")
        cfg = GenerationConfig(max_new_tokens=max_tokens, temperature=_number(body, "temperature", float, 0, 2, 1.0),
                               top_p=_number(body, "top_p", float, 0, 1, 1.0), stop=tuple(stop),
                               seed=_number(body, "seed", int, -(1 << 63), (1 << 63) - 1, None))
        if cfg.top_p == 0:
            cfg.top_p = 1e-9
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "created": created, "model": model_name}

        if not stream:
            pieces = start(messages, cfg, cid)
            try:
                text = await _collect(pieces, request)
            finally:
                pieces.close()  # no-op once finished; cancels when the client left or the server stops
            if text is None:
                return Response(status_code=499)  # nobody is listening any more
            c = pieces.completion
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                 "finish_reason": c.finish_reason, "logprobs": None}],
                    "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                              "total_tokens": c.prompt_tokens + c.completion_tokens}}

        opts = body.get("stream_options") or {}
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            data = {**head, "object": "chat.completion.chunk",
                    "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if usage:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        pieces = start(messages, cfg, cid)

        async def events():
            # A client that disconnects cancels this body (Starlette watches for http.disconnect while
            # streaming), and so does the end of uvicorn's graceful shutdown: either way the await below
            # raises CancelledError and the finally cancels the generation. Nothing here blocks.
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for piece in pieces:
                    yield chunk({"content": piece})
                c = pieces.completion
                yield chunk({}, c.finish_reason)
                if include_usage:
                    yield chunk({}, usage={"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                                           "total_tokens": c.prompt_tokens + c.completion_tokens})
                yield "data: [DONE]\n\n"
            finally:
                pieces.close()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", "--server_name", dest="host", default="127.0.0.1",
                   help="bind address (default loopback only); --server_name is MedicalGPT's openai_api.py name")
    g.add_argument("--port", "--server_port", dest="port", type=int, default=8000)
    g.add_argument("--served_model_name", help="the 'model' clients send (default: the model dir's name)")
    g.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                   help=f"require this bearer key (default: ${API_KEY_ENV}; prefer the env var, argv is visible in ps)")
    g.add_argument("--allow_public_without_key", action="store_true",
                   help="serve a non-loopback --host without an API key (anyone who reaches the port can use it)")
    g.add_argument("--max_tokens_cap", type=int, default=2048, help="largest max_tokens a request may ask for")
    g.add_argument("--default_max_tokens", type=int, default=512, help="max_tokens when a request gives none")
    g.add_argument("--max_body_bytes", type=int, default=1 << 20, help="largest request body (413 above)")
    g.add_argument("--max_queue", type=int, default=16,
                   help="requests that may wait while one generates; more are refused with 503 and Retry-After")
    g.add_argument("--stall_timeout", type=float, default=120.0,
                   help="/health answers 503 once the running generation has made no token for this many seconds")
    g.add_argument("--shutdown_timeout", type=float, default=5.0,
                   help="on SIGTERM / Ctrl-C, seconds in-flight requests get to finish before they are cancelled")
    g.add_argument("--log_level", default="info")
    args = p.parse_args(argv)
    if args.model_name_or_path is None and args.adapter_name_or_path is None:
        p.error("pass --model_name_or_path (MedicalGPT: --base_model)")
    if args.max_queue < 0 or args.stall_timeout <= 0 or args.shutdown_timeout < 0:
        p.error("--max_queue and --shutdown_timeout must be >= 0, --stall_timeout > 0")
    return args


@main_boundary
def main(argv: list[str] | None = None) -> int:
    import uvicorn  # noqa: F401 - missing, it fails here, before the model loads

    args = parse_args(argv)
    if not _is_loopback(args.host) and not args.api_key:
        if not args.allow_public_without_key:
            raise UserError(f"--host {args.host} is reachable from other machines and no API key is set: anyone who "
                            f"can reach port {args.port} could use the model. Set {API_KEY_ENV} (clients send it as "
                            "a bearer key), or pass --allow_public_without_key")
        print(f"WARNING: serving on {args.host} without an API key (--allow_public_without_key): anyone who can "
              "reach this port can use the model.", file=sys.stderr)
    check_inference_model(args)
    chat = load_from_args(args)
    name = args.served_model_name or chat.name
    app = create_app(chat, name, args.api_key, args.max_tokens_cap, args.default_max_tokens, args.max_body_bytes,
                     args.max_queue, args.stall_timeout)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (context {chat.max_length} tokens)", flush=True)
    run_server(app, chat, args.host, args.port, args.log_level, args.shutdown_timeout)
    return 0


def run_server(app, chat: ChatModel, host: str, port: int, log_level: str, grace: float) -> None:
    """uvicorn until SIGTERM / Ctrl-C. Then the requests in flight get ``grace`` seconds, after which
    their generations are cancelled: each ends at its next token and its response ends normally
    (finish_reason "cancelled"). Plain uvicorn waits for every open stream however long it runs, and
    its own cut-off (timeout_graceful_shutdown, kept here for a wedged generation only) kills the
    requests with a traceback each."""
    import uvicorn

    class Server(uvicorn.Server):
        timer: threading.Timer | None = None

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            if self.timer is None:
                app.state.stopping = True
                self.timer = threading.Timer(grace, chat.cancel_all, args=(0.0,))
                self.timer.daemon = True
                self.timer.start()

    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=grace + SHUTDOWN_JOIN_S)).run()


if __name__ == "__main__":
    sys.exit(main())
