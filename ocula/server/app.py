"""FastAPI application: OpenAI routes, SSE streaming, auth, errors, metrics.

The event loop never runs the model: requests become `GenerationRequest`s for the scheduler thread, whose
events come back through `loop.call_soon_threadsafe`. Images are fetched/decoded (under the media policy) off
the event loop before a request is queued (URLs on a pool of their own: `media_loader`), so a slow URL never
stalls the scheduler or another request's images; encoding happens on the scheduler's image workers
(through the model's image-embedding cache) while the other sequences keep decoding.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ocula.text.chat import IMAGE_PART_TYPES, normalize_messages
from ocula.server.video import prepare_videos
from ocula.engine.scheduler import (
    Delta, Failed, Finished, GenerationRequest, QueueFullError, Scheduler, SchedulerStoppedError, Started,
)
from ocula import __version__
from ocula.errors import MediaError, OculaError
from ocula.engine.structured import structured_for
from ocula.server import protocol as P
from ocula.server.agent_apis import register_agent_apis
from ocula.server.chat_tools import ChatPlan
from ocula.server.choices import MAX_CHOICES, run_choices
from ocula.server.config import ServerConfig
from ocula.server.errors import APIError, to_api_error
from ocula.server.formats import ChatFormat, CompletionFormat
from ocula.server.image_budget import has_media, image_max_tokens, image_token_limit
from ocula.server.llama_routes import listed_model
from ocula.server.media_loader import MediaLoader
from ocula.server.metrics import Metrics
from ocula.server.verbose import add_verbose, capture_prompt
from ocula.server.web import add_web_routes
from ocula.server.native_completion import extension_constraint

log = logging.getLogger("ocula.server")
DISCONNECT_POLL = 0.25  # seconds between client-disconnect checks of a non-streaming request
STREAMING = -1  # handler bookkeeping: the response is a stream, which records its own outcome


def create_app(model, config: ServerConfig | None = None, scheduler: Scheduler | None = None) -> FastAPI:
    config = config or ServerConfig()
    model_id = config.model_id or model.gguf.path.name
    own_scheduler = scheduler is None
    sched = scheduler or Scheduler(model, max_batch=config.max_batch, max_queue=config.max_queue,
                                   prefill_chunk=config.prefill_chunk, prefix_cache_bytes=config.prefix_cache_bytes,
                                   image_threads=config.image_threads, image_workers=config.image_workers)
    metrics = Metrics()
    policy = config.media_policy()
    media = MediaLoader(policy, config.max_media_fetches)
    created = int(time.time())
    model.tokenizer.max_token_bytes  # noqa: B018 - computed now (0.2 s for 152k tokens), not in a request

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sched.start()
        try:
            yield
        finally:
            media.close()
            if own_scheduler:
                await run_in_threadpool(sched.stop)

    app = FastAPI(title="ocula", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.model = sched, metrics, model
    if config.cors_origins:
        from ocula.server.cors import add_cors

        add_cors(app, config.cors_origins)

    if config.web_ui:
        add_web_routes(app)

    # ------------------------------------------------------------ errors

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            err = APIError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif e.status_code == 405:
            err = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                           code="method_not_allowed")
        else:
            err = APIError(e.status_code, str(e.detail), code="http_error")
        return error_response(err)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return error_response(to_api_error(e))

    def check_auth(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":  # Anthropic clients send the key as x-api-key
            token = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key')",
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        limit = config.body_limit(sched.n_ctx * model.tokenizer.max_token_bytes)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"the request body has {length} bytes, more than the {limit} allowed{BODY_HINT}",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body is larger than the {limit} bytes allowed{BODY_HINT}",
                               code="request_too_large")
        if not body:
            raise APIError(400, "the request body is empty: send a JSON object", code="invalid_json")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}",
                           code="invalid_json")
        return data

    # ------------------------------------------------------------ info routes

    @app.get("/health")
    async def health():
        ok = sched.alive
        body = {"status": "ok" if ok else "error", "model": model_id, "active": sched.active,
                "queue_depth": sched.queue_depth}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus(request: Request):
        check_auth(request)
        return PlainTextResponse(metrics.render(sched, model), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {
            "id": model_id, "object": "model", "created": created, "owned_by": "ocula",
            "context_length": sched.n_ctx, "max_model_len": sched.n_ctx,
            "capabilities": {"vision": model.supports_images, "completion": True, "chat": True},
            "modalities": {"vision": model.supports_images, "audio": False, "video": model.supports_video},
            "architecture": model.architecture, "aliases": config.model_aliases or [model_id], "tags": config.model_tags,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()], "models": [listed_model(model, model_id)]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request):
        check_auth(request)
        if name != model_id and name not in config.model_aliases:
            raise APIError(404, f"model {name!r} is not served here; this server serves {model_id!r}",
                           param="model", code="model_not_found")
        return model_card()

    # ------------------------------------------------------------ generation routes

    async def generation_route(request: Request, endpoint: str, schema, prepare, body: dict | None = None):
        """What the generation routes share: auth, parsing, sampling parameters, the run and its metrics.
        `prepare(req, params, explicit, bias)` returns the route's GenerationRequest and response format.
        `body`: a request already read and translated (the Responses and Messages APIs)."""
        t0 = time.perf_counter()
        status = 500
        try:
            check_auth(request)
            req = P.parse(schema, body if body is not None else await read_json(request))
            P.check_unsupported(req)
            refuse_text_beyond_context(req)
            params, explicit = P.sampling_params(req, config.default_max_tokens, config.sampling_defaults)
            bias = P.logit_bias(req, model.text.cfg.n_vocab)
            greq, fmt = await prepare(req, params, explicit, bias)
            prompt_seen = capture_prompt(greq) if req.verbose or config.verbose else None
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            if isinstance(greq, list) or (req.n or 1) > 1:
                resp = await run_choices(sched, metrics, request, greq, fmt, req.n or 1, req.stream, include_usage,
                                         endpoint, t0)
            else:
                resp = await run(request, greq, fmt, req.stream, include_usage, endpoint, t0)
                if prompt_seen is not None:
                    resp = add_verbose(resp, prompt_seen, model.tokenizer)
            status = STREAMING if isinstance(resp, EventStream) else resp.status_code
            return resp
        except APIError as e:
            status = e.status
            raise
        finally:
            if status != STREAMING:  # a stream counts itself when it ends
                metrics.request_done(endpoint, status, time.perf_counter() - t0)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generation_route(request, "chat", P.ChatRequest, prepare_chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generation_route(request, "completions", P.CompletionRequest, prepare_completion)

    def refuse_text_beyond_context(req) -> None:
        """A prompt whose text alone needs more tokens than the context holds, counted without tokenizing
        (characters / the vocabulary's longest token), is refused at once: tokenizing a 50 MB prompt to find
        that out took 75 s on the scheduler thread, with every other request waiting."""
        chars = _text_chars(getattr(req, "messages", None)) + _text_chars(getattr(req, "prompt", None))
        at_least = chars // model.tokenizer.max_token_bytes
        if at_least > sched.n_ctx:
            raise APIError(400, f"the prompt's text has {chars} characters, at least {at_least} tokens (no token of "
                                f"this vocabulary spells more than {model.tokenizer.max_token_bytes} bytes), but "
                                f"the context holds {sched.n_ctx}; shorten the prompt",
                           param="messages" if hasattr(req, "messages") else "prompt",
                           code="context_length_exceeded")

    async def prepare_chat(req: P.ChatRequest, params, explicit: bool, bias):
        messages = req.messages
        try:
            normalize_messages(messages)
        except OculaError as e:
            raise to_api_error(e, None) from None
        plan = ChatPlan(req, model.template.source)
        messages = await prepare_images(plan.history(messages))
        messages, video_options = await prepare_videos(model, config, policy, messages, req.video_options, sched.n_ctx,
                                                       media)
        if plan.needs_parse and plan.thinks:
            plan.note_prompt(await run_in_threadpool(model.apply_chat_template, messages, **plan.template_kwargs))
        constraint = await make_constraint(req.response_format, req)
        if constraint is None and plan.tools.grammar() is not None:
            try:
                constraint = await run_in_threadpool(plan.constraint, structured_for(model))
            except OculaError as e:
                raise to_api_error(e, "tools") from None
        img_min = req.image_min_tokens if req.image_min_tokens is not None else config.image_min_tokens
        img_max = image_max_tokens(model, config.image_max_tokens, req.image_max_tokens)
        limit = image_token_limit(config.max_image_tokens_per_request, sched.n_ctx)

        def build(timings, messages=messages):
            return model.build_prompt(messages, timings, img_min, img_max, media_policy=policy,
                                      max_images=config.max_images, video_options=video_options,
                                      image_limit=limit, **plan.template_kwargs)

        logprobs = None
        if req.logprobs:
            logprobs = req.top_logprobs or 0
        elif req.top_logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        greq = GenerationRequest(build, params, explicit, constraint, logprobs, bias, has_images=has_media(messages))
        return greq, plan.wrap(ChatFormat(model_id, model.tokenizer, logprobs is not None))

    async def prepare_completion(req: P.CompletionRequest, params, explicit: bool, bias):
        """One prompt: (request, format); several (a list of texts or of id lists): lists of both, whose
        choices run_choices numbers prompt by prompt (OpenAI's order)."""
        prompts = req.prompt
        if not (isinstance(prompts, list) and prompts and isinstance(prompts[0], (str, list))):
            return await prepare_one_completion(req, prompts, params, explicit, bias)
        if len(prompts) > MAX_CHOICES:
            raise APIError(400, f"prompt: at most {MAX_CHOICES} prompts per request, got {len(prompts)}",
                           param="prompt", code="invalid_value")
        prepared = [await prepare_one_completion(req, p, params, explicit, bias) for p in prompts]
        return [g for g, _ in prepared], [f for _, f in prepared]

    async def prepare_one_completion(req: P.CompletionRequest, prompt, params, explicit: bool, bias):
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < model.text.cfg.n_vocab]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary "
                                    f"(0..{model.text.cfg.n_vocab - 1})", param="prompt", code="invalid_value")
        constraint = await make_constraint(req.response_format, req)

        def build(timings, prompt=prompt):
            return model._as_prompt(prompt)

        echo = ""
        if req.echo:
            echo = prompt if isinstance(prompt, str) else model.detokenize(prompt)
        greq = GenerationRequest(build, params, explicit, constraint, req.logprobs, bias)
        return greq, CompletionFormat(model_id, model.tokenizer, req.logprobs is not None, echo)

    # ------------------------------------------------------------ helpers

    async def prepare_images(messages: list[dict]) -> list[dict]:
        """Fetch and decode every image part under the media policy; return messages with PIL images."""
        found = [(i, j) for i, m in enumerate(messages) if isinstance(m, dict) and isinstance(m.get("content"), list)
                 for j, p in enumerate(m["content"]) if isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES]
        if not found:
            return messages
        if not model.supports_images:
            i, j = found[0]
            raise APIError(400, f"model {model_id!r} does not take images (the server was started without "
                                "--mmproj); send text only", param=f"messages[{i}].content[{j}]",
                           code="image_input_not_supported")
        if len(found) > config.max_images:
            raise APIError(400, f"{len(found)} images sent but at most {config.max_images} are allowed per request",
                           param="messages", code="too_many_images")

        async def load_one(i: int, j: int):
            where = f"messages[{i}].content[{j}]"
            try:
                return await media.load(_image_source(messages[i]["content"][j], where))
            except MediaError as e:
                raise APIError(400, f"invalid image at {where}: {e}", param=where, code="invalid_image") from None

        images = await asyncio.gather(*(load_one(i, j) for i, j in found))
        out = [dict(m) for m in messages]
        for (i, j), image in zip(found, images):
            content = out[i]["content"] = list(out[i]["content"])
            content[j] = {"type": "image", "image": image}
        return out

    async def make_constraint(response_format: Any, req=None):
        if req is not None and (req.grammar or req.json_schema is not None):  # llama-server's fields
            return await extension_constraint(model, req, response_format)
        if response_format is None:
            return None
        try:
            return await run_in_threadpool(model.response_constraint, response_format)
        except OculaError as e:
            raise to_api_error(e, "response_format") from None

    def disconnected() -> JSONResponse:
        metrics.disconnects += 1
        return JSONResponse(APIError(499, "client disconnected", code="cancelled").body(), status_code=499)

    async def run(request: Request, greq: GenerationRequest, fmt, stream: bool, include_usage: bool,
                  endpoint: str, t0: float):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event):
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            handle = sched.submit(greq, sink)
        except (QueueFullError, SchedulerStoppedError) as e:
            raise to_api_error(e) from None
        handed_off = False
        watch = ClientWatch(events, request, handle)
        try:
            first = await watch.next()
            if first is None:
                return disconnected()
            if isinstance(first, Failed):
                raise to_api_error(first.error, "prompt" if endpoint == "completions" else None)
            assert isinstance(first, Started)
            if stream:
                handed_off = True
                return EventStream(sse(first, events, fmt, include_usage, endpoint, t0), handle, first)
            deltas: list[Delta] = []
            while True:
                ev = await watch.next()
                if ev is None:
                    return disconnected()
                if isinstance(ev, Delta):
                    deltas.append(ev)
                elif isinstance(ev, Failed):
                    raise to_api_error(ev.error)
                elif isinstance(ev, Finished):
                    r = ev.result
                    metrics.tokens(r.prompt_tokens, r.completion_tokens, first.cached_tokens)
                    return JSONResponse(fmt.full(first, deltas, ev))
        finally:
            if not handed_off and not handle.done:
                handle.cancel()

    async def sse(first: Started, events: asyncio.Queue, fmt, include_usage: bool, endpoint: str,
                  t0: float) -> AsyncIterator[str]:
        status = 200
        try:
            for chunk in fmt.start():
                yield _data(chunk)
            while True:
                ev = await events.get()
                if isinstance(ev, Delta):
                    chunk = fmt.delta(ev)
                    for c in chunk if isinstance(chunk, list) else [chunk] if chunk is not None else []:
                        yield _data(c)
                elif isinstance(ev, Finished):
                    r = ev.result
                    metrics.tokens(r.prompt_tokens, r.completion_tokens, first.cached_tokens)
                    for chunk in fmt.finish(first, ev, include_usage):
                        yield _data(chunk)
                    break
                elif isinstance(ev, Failed):
                    err = to_api_error(ev.error)
                    status = err.status
                    yield _data(fmt.error_body(err) if hasattr(fmt, "error_body") else err.body())
                    break
            if getattr(fmt, "done_marker", True):  # llama-server's native stream ends without one
                yield "data: [DONE]\n\n"
        except BaseException:
            status = 499
            metrics.disconnects += 1
            raise
        finally:
            metrics.request_done(endpoint, status, time.perf_counter() - t0)

    from ocula.server.llama_routes import RouteContext, register_llama_routes

    routes = RouteContext(
        model, model_id, config, sched, metrics, policy, check_auth, read_json, run, generation_route, prepare_chat,
        prepare_completion, prepare_images, make_constraint, model_card, chat_completions, completions, models, health,
        media)
    register_llama_routes(app, routes)
    register_agent_apis(app, routes)
    return app


BODY_HINT = (" (room for the context's text and --max-request-media-bytes of inline images and videos; send media "
             "as URLs, or raise --max-request-bytes)")


def _text_chars(value) -> int:
    """Characters of a request's prompt text: string prompts, message contents and their text parts (image
    data is not text)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value if isinstance(v, (str, dict, list)))
    if isinstance(value, dict):
        if "content" in value:
            return _text_chars(value["content"])
        text = value.get("text")
        return len(text) if isinstance(text, str) else 0
    return 0


class ClientWatch:
    """The scheduler events of one request, checking every DISCONNECT_POLL seconds whether its client is
    still there, also while tokens keep arriving (a check only when none came for a while never ran
    during a long generation); when the client has gone, the request is cancelled and `next` gives None."""

    def __init__(self, events: asyncio.Queue, request: Request, handle):
        self.events, self.request, self.handle = events, request, handle
        self.next_check = time.monotonic() + DISCONNECT_POLL

    async def next(self):
        while True:
            wait = self.next_check - time.monotonic()
            if wait > 0:
                try:
                    return await asyncio.wait_for(self.events.get(), wait)
                except asyncio.TimeoutError:
                    pass
            self.next_check = time.monotonic() + DISCONNECT_POLL
            if await self.request.is_disconnected():
                self.handle.cancel()
                return None


class EventStream(StreamingResponse):
    """text/event-stream whose generation is cancelled however the response ends (done, error, disconnect)."""

    def __init__(self, content, handle, started: Started | None = None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.handle, self.started = handle, started

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.handle.done:
                self.handle.cancel()


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _image_source(part: dict, where: str):
    if part.get("type") in ("image_url", "input_image"):
        value = part.get("image_url")
        if isinstance(value, dict):
            value = value.get("url")
        if not isinstance(value, str):
            raise APIError(400, f"{where}.image_url must be {{\"url\": \"...\"}} with a string URL",
                           param=f"{where}.image_url", code="invalid_type")
        return value
    value = part.get("image")
    if not isinstance(value, str):
        raise APIError(400, f"{where}.image must be a string (URL, data URI or base64)", param=f"{where}.image",
                       code="invalid_type")
    return value

