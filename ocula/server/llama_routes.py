"""llama-server's own routes and conventions, so that clients built for llama-server (its web UI, llama-swap,
chat front ends) work against `ocula serve`:

- `GET /props`, `POST /tokenize`, `/detokenize`, `/apply-template` in llama-server's shapes;
- the OpenAI routes also without the `/v1` prefix (`/chat/completions`, `/models`), and `/v1/health`;
- the native `/completion` (ocula.server.native_completion), embeddings (ocula.server.embeddings) and
  `n` > 1 (ocula.server.choices) are registered from here too.

Native routes answer errors in llama-server's shape, `{"error": {"code": <status>, "message", "type"}}`;
the OpenAI routes keep OpenAI's.
"""
from __future__ import annotations

import asyncio
import functools
import re
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ocula.errors import OculaError
from ocula.server.errors import APIError, to_api_error


@dataclass
class RouteContext:
    """What the routes defined outside `create_app` need from it."""

    model: Any
    model_id: str
    config: Any  # ServerConfig
    sched: Any  # Scheduler
    metrics: Any
    policy: Any  # MediaPolicy
    check_auth: Callable
    read_json: Callable
    run: Callable  # run(request, greq, fmt, stream, include_usage, endpoint, t0)
    generation_route: Callable
    prepare_chat: Callable
    prepare_completion: Callable
    prepare_images: Callable
    make_constraint: Callable
    model_card: Callable
    chat_completions: Callable
    completions: Callable
    models: Callable
    health: Callable
    media: Any  # MediaLoader: image sources → PIL images, URLs on their own bounded fetch pool


def native_error(e: APIError) -> JSONResponse:
    return JSONResponse(native_error_body(e), status_code=e.status, headers=e.headers)


def native_error_body(e: APIError) -> dict:
    """An error in llama-server's shape: the HTTP status as `code`, plus OpenAI's `param` when known."""
    body = {"code": e.status, "message": e.message, "type": e.type}
    if e.param:
        body["param"] = e.param
    if e.status == 401:
        body["type"] = "authentication_error"
    if e.code == "context_length_exceeded":  # llama-server's type, and the numbers its clients read
        body["type"] = "exceed_context_size_error"
        m = re.search(r"has (\d+) (?:characters, at least (\d+) )?tokens", e.message)
        if m:
            body["n_prompt_tokens"] = int(m.group(2) or m.group(1))
        m = re.search(r"context holds (\d+)", e.message)
        if m:
            body["n_ctx"] = int(m.group(1))
    return {"error": body}


def native(handler):
    """Route decorator: APIErrors (and engine errors) leave as llama-server-shaped errors."""

    @functools.wraps(handler)
    async def wrapped(request: Request):
        try:
            return await handler(request)
        except APIError as e:
            return native_error(e)
        except OculaError as e:
            return native_error(to_api_error(e))

    return wrapped


def field(body: dict, name: str, kind, default=None, *, where: str | None = None):
    """body[name] checked against `kind` (a type or tuple of types); a clear 400 when it is something else.
    bool is not accepted where a number is asked for."""
    if name not in body or body[name] is None:
        return default
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise APIError(400, f"{where or name} must be {names}, not {type(value).__name__}", param=name,
                       code="invalid_type")
    return value


def register_llama_routes(app: FastAPI, ctx: RouteContext) -> None:
    model, tok = ctx.model, ctx.model.tokenizer

    # ------------------------------------------------------------ OpenAI routes without /v1

    app.add_api_route("/chat/completions", ctx.chat_completions, methods=["POST"])
    app.add_api_route("/models", ctx.models, methods=["GET"])
    app.add_api_route("/v1/health", ctx.health, methods=["GET"])

    # ------------------------------------------------------------ info

    @app.get("/props")
    @native
    async def props(request: Request):
        ctx.check_auth(request)
        return JSONResponse(props_body(ctx))

    @app.post("/props")
    @native
    async def set_props(request: Request):
        ctx.check_auth(request)
        raise APIError(501, "this server does not change its settings at run time: restart it with other flags",
                       type="not_supported_error", code="not_supported")

    @app.get("/slots")
    @native
    async def slots(request: Request):
        """The decoding lanes (--parallel): which are busy. ocula has no per-slot state to save or restore."""
        ctx.check_auth(request)
        busy = ctx.sched.active
        return JSONResponse([{"id": i, "id_task": -1, "n_ctx": ctx.sched.n_ctx, "speculative": False,
                              "is_processing": i < busy} for i in range(ctx.sched.max_batch)])

    # ------------------------------------------------------------ tokens and templates

    @app.post("/tokenize")
    @native
    async def tokenize(request: Request):
        ctx.check_auth(request)
        body = await ctx.read_json(request)
        content = field(body, "content", str, "")
        add_special = field(body, "add_special", bool, False)
        parse_special = field(body, "parse_special", bool, True)
        with_pieces = field(body, "with_pieces", bool, False)
        ids = tok.encode(content, add_special=add_special, parse_special=parse_special)
        if not with_pieces:
            return JSONResponse({"tokens": ids})
        return JSONResponse({"tokens": [{"id": i, "piece": piece_of(tok, i)} for i in ids]})

    @app.post("/detokenize")
    @native
    async def detokenize(request: Request):
        ctx.check_auth(request)
        body = await ctx.read_json(request)
        ids = field(body, "tokens", list, [])
        check_token_ids(ids, model.text.cfg.n_vocab, "tokens")
        return JSONResponse({"content": tok.decode(ids)})

    from ocula.server import embeddings, infill, native_completion

    native_completion.register(app, ctx)
    embeddings.register(app, ctx)
    infill.register(app, ctx)

    async def input_tokens(request: Request):
        """How many tokens a chat request's prompt takes (template, images expanded), without generating."""
        from ocula.engine.generate import Timings
        from ocula.server import protocol as P

        ctx.check_auth(request)
        req = P.parse(P.ChatRequest, await ctx.read_json(request))
        params, explicit = P.sampling_params(req, ctx.config.default_max_tokens, ctx.config.sampling_defaults)
        # the chat route's own preparation (template, tools, images, video), so the count is that prompt's
        greq, _ = await ctx.prepare_chat(req, params, explicit, None)

        def count() -> int:
            return len(greq.build_prompt(Timings()))

        try:
            n = await asyncio.wrap_future(ctx.sched.images.call(count))  # encodes: not on the scheduler thread
        except OculaError as e:
            raise to_api_error(e, "messages") from None
        return JSONResponse({"object": "chat.completion.input_tokens", "input_tokens": n})

    for path in ("/v1/chat/completions/input_tokens", "/chat/completions/input_tokens"):
        app.add_api_route(path, input_tokens, methods=["POST"])

    @app.post("/apply-template")
    @native
    async def apply_template(request: Request):
        ctx.check_auth(request)
        body = await ctx.read_json(request)
        return JSONResponse({"prompt": render_template(model, body)})


def props_body(ctx: RouteContext) -> dict:
    """GET /props as llama-server shapes it (the fields its web UI and proxies read)."""
    from ocula import __version__

    model, sched = ctx.model, ctx.sched
    tok = model.tokenizer
    params = default_params(ctx)
    return {
        "default_generation_settings": {
            "id": 0, "id_task": -1, "n_ctx": sched.n_ctx, "speculative": False, "is_processing": False,
            "params": params, "prompt": "",
        },
        "total_slots": sched.max_batch,
        "model_alias": ctx.model_id,
        "model_path": str(model.gguf.path),
        "modalities": {"vision": bool(model.supports_images), "audio": False, "video": bool(model.supports_video)},
        "chat_template": model.template.source,
        "chat_template_caps": {},
        "bos_token": tok.token_to_piece(tok.bos_id) if tok.bos_id is not None else "",
        "eos_token": tok.token_to_piece(tok.eos_id) if tok.eos_id is not None else "",
        "build_info": build_info(__version__),
        "n_ctx": sched.n_ctx,
        "endpoint_slots": False,
        "endpoint_props": False,
        "endpoint_metrics": True,
        "webui": False,
        "is_sleeping": False,
    }


def listed_model(model, model_id: str) -> dict:
    """The model as llama-server's (Ollama-style) `models` list in GET /models shows it."""
    caps = ["completion"] + (["multimodal"] if model.supports_images else [])
    return {
        "name": model_id, "model": model_id, "modified_at": "", "size": str(model.gguf.file_size), "digest": "",
        "type": "model", "description": "", "tags": [], "capabilities": caps, "parameters": "",
        "details": {"parent_model": "", "format": "gguf", "family": model.architecture,
                    "families": [model.architecture], "parameter_size": "", "quantization_level": ""},
    }


def build_info(version: str) -> str:
    """llama-server reports 'b<build>-<commit>'; ocula reports its version in that form."""
    return f"b{version}-ocula"


def default_params(ctx: RouteContext) -> dict:
    """The sampling settings a request gets when it sets none, under llama-server's names."""
    from ocula.engine.sampling import SamplingParams

    d = SamplingParams(**ctx.config.sampling_defaults)
    mt = ctx.config.default_max_tokens
    return {
        "n_predict": -1 if mt is None else mt, "seed": -1 if d.seed is None else d.seed,
        "temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p, "min_p": d.min_p,
        "repeat_penalty": d.repetition_penalty, "repeat_last_n": d.penalty_last_n,
        "presence_penalty": d.presence_penalty, "frequency_penalty": d.frequency_penalty,
        "stop": [], "ignore_eos": False, "stream": False, "n_probs": 0,
        "samplers": ["penalties", "top_k", "top_p", "min_p", "temperature"],
    }


def piece_of(tok, tid: int):
    """A token's text for /tokenize with_pieces: a string when its bytes are whole UTF-8, else the byte list
    (as llama-server does)."""
    b = tok.token_to_bytes(tid)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return list(b)


def check_token_ids(ids: list, n_vocab: int, where: str) -> None:
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            raise APIError(400, f"{where}[{i}] must be a token id (an integer), not {type(t).__name__}",
                           param=where, code="invalid_type")
        if not 0 <= t < n_vocab:
            raise APIError(400, f"{where}[{i}]: token id {t} is outside the vocabulary (0..{n_vocab - 1})",
                           param=where, code="invalid_value")


def render_template(model, body: dict) -> str:
    """The prompt text the chat template makes of a chat request: its messages (tool calls and results as the
    chat route renders them), `tools`, `chat_template_kwargs`, `add_generation_prompt` (default true)."""
    from ocula.text.chat import normalize_messages
    from ocula.server import protocol as P
    from ocula.server.chat_tools import ChatPlan

    add_generation_prompt = field(body, "add_generation_prompt", bool, True)
    req = P.parse(P.ChatRequest, body)
    try:
        normalize_messages(req.messages)
    except OculaError as e:
        raise to_api_error(e, "messages") from None
    plan = ChatPlan(req, model.template.source)
    try:
        # the chat plan carries add_generation_prompt too when the body gives it (the chat route's field)
        kwargs = {"add_generation_prompt": add_generation_prompt, **plan.template_kwargs}
        return model.apply_chat_template(plan.history(req.messages), **kwargs)
    except OculaError as e:
        raise to_api_error(e, "messages") from None
