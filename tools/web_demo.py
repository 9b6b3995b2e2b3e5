"""A gradio web page for chatting with a trained model (answers stream in as they are generated).

    python tools/web_demo.py --model_name_or_path outputs/sft            # http://127.0.0.1:7860
    python tools/web_demo.py --model_name_or_path base --adapter_name_or_path outputs/sft_lora

    python tools/web_demo.py --base_model base --lora_model outputs/sft_lora --only_cpu   # MedicalGPT's flags

Type a question and press Enter or Send; Stop ends an answer early. Stop, closing the page or losing
the connection cancels the generation at its next token, so the next question never waits for an
answer nobody reads (each cancellation is logged). One answer is generated at a time; at most
--max_queue questions wait, more are refused with "queue is full". GET /health (no login) answers 503
"unhealthy" once the running generation has made no token for --stall_timeout seconds.

Binds 127.0.0.1 unless --host says otherwise. Before exposing it beyond this machine require a login:
MEDGPT_WEB_AUTH=user:password, or --auth_file FILE holding user:password (never on the command line,
where every user of the machine sees it in `ps`). --share (a public gradio.live link) is refused
without such a login; with one it opens the link, as gradio does.
"""
import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage pings from a medical demo
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medgpt_ds.errors import UserError, main_boundary
from medgpt_ds.inference import ChatModel, GenerationConfig, add_generation_args, add_model_args, generation_config
from medgpt_ds.model import check_inference_model

AUTH_ENV = "MEDGPT_WEB_AUTH"


def _text(content) -> str:
    """Gradio history content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    if isinstance(content, list):
        return "".join(_text(c) for c in content)
    return ""


def build_demo(chat: ChatModel, cfg: GenerationConfig, system_prompt: str | None = None, title: str | None = None):
    """The gradio app: a chat box with Send and Stop buttons, plus system prompt, max new tokens and
    temperature controls. Stop, a closed page or a lost connection cancel the generation at its
    next token (gradio cancels or closes the answer generator), so the model is free for the next
    question; each cancellation is logged with how far it got."""
    import gradio as gr

    def log_cancelled(c) -> None:  # in the generation thread, once it has ended
        if c is not None and c.finish_reason == "cancelled":
            print(f"generation cancelled after {c.completion_tokens} tokens (Stop, or the page went away)", flush=True)

    async def respond(message, history, system, max_new_tokens, temperature):
        msgs = [{"role": "system", "content": system}] if system and system.strip() else []
        msgs += [{"role": m["role"], "content": _text(m["content"])} for m in history if m.get("role") in ("user", "assistant")]
        msgs.append({"role": "user", "content": _text(message)})
        step = GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=cfg.top_p,
                                top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty, stop=cfg.stop, seed=cfg.seed)
        try:
            pieces = chat.stream(msgs, step)
        except UserError as e:  # the conversation no longer fits the context: say so in the page
            raise gr.Error(str(e)) from None
        pieces.add_done_callback(log_cancelled)
        answer = ""
        try:
            # async: waiting for a token holds no worker thread, and gradio's Stop (a task
            # cancellation) lands here at once instead of after the next token
            async for piece in pieces:
                answer += piece
                yield answer
        finally:
            pieces.close()  # no-op once finished

    return gr.ChatInterface(
        respond,
        title=title or f"medgpt-ds: {chat.name}",
        description="Answers come from a research model and are not medical advice.",
        textbox=gr.Textbox(placeholder="Ask a medical question...", elem_id="question", scale=7, submit_btn="Send",
                           stop_btn="Stop"),
        additional_inputs=[
            gr.Textbox(value=system_prompt or "", label="System prompt"),
            gr.Slider(1, max(1, chat.max_length - 1), value=min(cfg.max_new_tokens, chat.max_length - 1), step=1,
                      label="Max new tokens"),
            gr.Slider(0.0, 2.0, value=cfg.temperature, step=0.05, label="Temperature (0 = greedy)"),
        ],
        flagging_mode="never",
        analytics_enabled=False,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_generation_args(p)
    g = p.add_argument_group("web")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    g.add_argument("--port", type=int, default=7860)
    g.add_argument("--auth_file", default=None,
                   help=f"file holding user:password, required to open the page (or set ${AUTH_ENV})")
    g.add_argument("--auth", default=None, help=argparse.SUPPRESS)  # refused: argv is visible in ps
    g.add_argument("--title", default=None)
    g.add_argument("--max_queue", type=int, default=16,
                   help="questions that may wait while one is answered; more are refused with 'queue is full'")
    g.add_argument("--stall_timeout", type=float, default=120.0,
                   help="/health answers 503 once the running generation has made no token for this many seconds")
    g.add_argument("--share", action="store_true",
                   help="also publish a public gradio.live link (needs a login: --auth_file or $" + AUTH_ENV + ")")
    g.add_argument("--context_len", type=int, default=None,
                   help="cap on prompt + answer tokens (default: the model's own context length)")
    args = p.parse_args(argv)
    if args.context_len is not None and args.context_len < 2:
        p.error("--context_len must be at least 2")
    if args.model_name_or_path is None and args.adapter_name_or_path is None:
        p.error("pass --model_name_or_path (MedicalGPT: --base_model)")
    return args


def read_auth(args) -> tuple[str, str] | None:
    """(user, password) from --auth_file or $MEDGPT_WEB_AUTH; None when neither is set."""
    if args.auth is not None:
        raise UserError(f"--auth puts the password on the command line, where every user of this machine sees it "
                        f"(ps, shell history): set {AUTH_ENV}=user:password or pass --auth_file FILE")
    if args.auth_file:
        try:
            with open(args.auth_file, encoding="utf-8") as f:
                text, where = f.read().strip(), f"--auth_file {args.auth_file}"
        except OSError as e:
            raise UserError(f"--auth_file {args.auth_file}: {e.strerror}") from None
    else:
        text, where = os.environ.get(AUTH_ENV, "").strip(), AUTH_ENV
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not (sep and user and password):
        raise UserError(f"{where} must hold user:password")
    return user, password


def check_share(args, auth) -> None:
    """--share publishes the demo on a public URL: only behind a login."""
    if args.share and auth is None:
        raise UserError(f"--share would publish this medical demo on a public gradio.live URL without a login; it binds "
                        f"{args.host}:{args.port} on this machine (reach it from elsewhere with ssh -L "
                        f"{args.port}:127.0.0.1:{args.port}). To share it anyway set a login: {AUTH_ENV}=user:password "
                        "or --auth_file FILE")


@main_boundary
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    auth = read_auth(args)
    check_share(args, auth)
    check_inference_model(args)
    import gradio as gr

    from medgpt_ds.inference import load_from_args

    chat = load_from_args(args)
    demo = build_demo(chat, generation_config(args), args.system_prompt, args.title)
    # system fonts: the default theme links web fonts, which a closed network cannot fetch
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    # /health is one of the app's own routes from the start: added after launch() it answered 404
    # until the main thread got to it, while the page itself was already up (seen once in CI)
    demo.queue(default_concurrency_limit=1, max_size=args.max_queue).launch(
        server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False, theme=theme,
        auth=auth, footer_links=[], prevent_thread_lock=True,
        app_kwargs={"routes": [health_route(chat, args.stall_timeout)]})
    demo.block_thread()  # until Ctrl-C; SIGTERM ends the process at once (gradio sets no handler for it)
    return 0


def health_route(chat: ChatModel, stall_timeout: float):
    """GET /health on the demo's server (no login): 200 {"status": "ok", ...}, or 503 "unhealthy"
    with the reason once the running generation has made no token for ``stall_timeout`` seconds."""
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute

    async def health() -> JSONResponse:
        state = chat.health(stall_timeout)
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    return APIRoute("/health", health, methods=["GET"])


if __name__ == "__main__":
    sys.exit(main())
