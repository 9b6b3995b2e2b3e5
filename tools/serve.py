"""OpenAI-compatible HTTP server for a trained model (FastAPI + uvicorn).

    MEDGPT_API_KEY=secret python tools/serve.py --model_name_or_path outputs/sft --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "..."}], stream=True)

Endpoints: POST /v1/chat/completions (streaming SSE or not), GET /v1/models, GET /health (no key).
Binds 127.0.0.1 unless --host says otherwise; another address needs an API key (or
--allow_public_without_key). With --api_key (or MEDGPT_API_KEY) every /v1 request needs
`Authorization: Bearer <key>`. Bad requests get a 4xx with an OpenAI-style JSON error:
malformed JSON, a body over --max_body_bytes, unknown model, empty or malformed messages,
max_tokens over --max_tokens_cap, prompt + max_tokens over the context length.
One generation runs at a time; for throughput on merged models use tools/vllm_serve.sh.
"""

import argparse
import hmac
import ipaddress
import json
import os
import sys
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medgpt_ds.errors import UserError, main_boundary
from medgpt_ds.inference import (
    ChatModel,
    GenerationConfig,
    add_model_args,
    load_from_args,
)
from medgpt_ds.model import check_inference_model

API_KEY_ENV = "MEDGPT_API_KEY"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(Exception):
    """A client error, answered as {"error": {...}} with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


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


def create_app(chat: ChatModel, model_name: str, api_key: str | None = None, max_tokens_cap: int = 2048,
               default_max_tokens: int = 512, max_body_bytes: int = 1 << 20):
    """The FastAPI app around one loaded ChatModel (tests build it directly)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="medgpt-ds", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)

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
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": model_name}

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
            c = (await run_in_threadpool(chat.generate, [messages], cfg))[0]
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

        async def events():
            pieces = chat.stream(messages, cfg)
            done = object()
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (piece := await run_in_threadpool(next, pieces, done)) is not done:
                    yield chunk({"content": piece})
                c = pieces.completion
                yield chunk({}, c.finish_reason)
                if include_usage:
                    yield chunk({}, usage={"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                                           "total_tokens": c.prompt_tokens + c.completion_tokens})
                yield "data: [DONE]\n\n"
            finally:  # client went away: stop generating and free the model
                await run_in_threadpool(pieces.close)

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
    g.add_argument("--log_level", default="info")
    args = p.parse_args(argv)
    if args.model_name_or_path is None and args.adapter_name_or_path is None:
        p.error("pass --model_name_or_path (MedicalGPT: --base_model)")
    return args


@main_boundary
def main(argv: list[str] | None = None) -> int:
    import uvicorn

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
    app = create_app(chat, name, args.api_key, args.max_tokens_cap, args.default_max_tokens, args.max_body_bytes)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (context {chat.max_length} tokens)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
