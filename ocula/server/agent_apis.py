"""The OpenAI Responses API (`POST /v1/responses`) and the Anthropic Messages API (`POST /v1/messages`,
`/v1/messages/count_tokens`), each a translation onto the chat-completions path: the request becomes a chat
request (same template, images, tools, grammar, scheduler), and its answer or stream of chunks is rewritten in
the other API's shapes (ocula.server.responses_api, ocula.server.anthropic_api).
"""
from __future__ import annotations

import json
from typing import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ocula.server.errors import APIError, to_api_error

Chat = Callable[[Request, str, dict], Awaitable]


class ChatCall:
    """One chat completion run for another API: `answer` (non-streaming) or `chunks` (streaming)."""

    def __init__(self, chat: Chat, request: Request, endpoint: str):
        self.chat, self.request, self.endpoint = chat, request, endpoint
        self.handle = None
        self.prompt_tokens = self.cached_tokens = 0  # known once a stream has started

    async def answer(self, body: dict) -> dict:
        resp = await self.chat(self.request, self.endpoint, {**body, "stream": False})
        data = json.loads(resp.body)
        if resp.status_code != 200:
            err = data.get("error", {})
            raise APIError(resp.status_code, err.get("message", "request failed"), param=err.get("param"),
                           code=err.get("code"))
        return data

    async def chunks(self, body: dict) -> AsyncIterator[dict]:
        """The chat stream's chunks as dicts (an error chunk raises APIError). Call before the response starts
        (errors before the first token still raise here, as HTTP errors)."""
        resp = await self.chat(self.request, self.endpoint,
                               {**body, "stream": True, "stream_options": {"include_usage": True}})
        if not isinstance(resp, StreamingResponse):  # the client left before it started
            raise APIError(resp.status_code, "the request ended before it started", code="cancelled")
        self.handle = getattr(resp, "handle", None)
        started = getattr(resp, "started", None)
        if started is not None:
            self.prompt_tokens, self.cached_tokens = started.prompt_tokens, started.cached_tokens
        return self._read(resp.body_iterator)

    async def _read(self, lines) -> AsyncIterator[dict]:
        try:
            async for line in lines:
                if not line.startswith("data: ") or line.startswith("data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    err = chunk["error"]
                    raise APIError(500, err.get("message", "generation failed"), type=err.get("type", "server_error"),
                                   code=err.get("code"))
                yield chunk
        finally:
            await lines.aclose()

    def cancel(self) -> None:
        if self.handle is not None and not self.handle.done:
            self.handle.cancel()


class StopWordFormat:
    """A chat format that also names the stop string that ended the answer (`choices[0].stop_word`, on the
    whole answer and on the stream's last choice chunk): Anthropic reports it as stop_sequence."""

    def __init__(self, fmt, tokenizer, stops: list[str]):
        self.fmt, self.tokenizer, self.stops = fmt, tokenizer, stops

    def start(self):
        return self.fmt.start()

    def delta(self, ev):
        return self.fmt.delta(ev)

    def word(self, r) -> str | None:
        if r.finish_reason != "stop" or not self.stops:
            return None
        spelled = b"".join(self.tokenizer.token_to_bytes(t) for t in r.token_ids).decode("utf-8", errors="replace")
        # the answer's text ends where the stop string began; the tokens spell the stop string too
        return next((s for s in self.stops if s in spelled[max(0, len(r.text) - len(s)):]), None)

    def finish(self, first, ev, include_usage: bool):
        chunks = self.fmt.finish(first, ev, include_usage)
        word = self.word(ev.result)
        for c in chunks:
            for choice in c.get("choices") or []:
                if choice.get("finish_reason") and word:
                    choice["stop_word"] = word
        return chunks

    def full(self, first, deltas, ev):
        body = self.fmt.full(first, deltas, ev)
        word = self.word(ev.result)
        if word:
            body["choices"][0]["stop_word"] = word
        return body


class SSE(StreamingResponse):
    """`event: <type>` + `data: <json>` server-sent events; the generation is cancelled however it ends."""

    def __init__(self, events: AsyncIterator[dict], call: ChatCall):
        super().__init__(self._lines(events), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.call = call

    @staticmethod
    async def _lines(events: AsyncIterator[dict]):
        async for ev in events:
            yield f"event: {ev['type']}\ndata: {json.dumps(ev, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.call.cancel()


def register_agent_apis(app: FastAPI, routes) -> None:
    """The routes; `routes` is app.py's RouteContext (ocula.server.llama_routes)."""
    from ocula.server import anthropic_api, responses_api
    from ocula.server import protocol as P

    read_json, check_auth, model_id = routes.read_json, routes.check_auth, routes.model_id

    async def prepare(req, params, explicit, bias):
        greq, fmt = await routes.prepare_chat(req, params, explicit, bias)
        return greq, StopWordFormat(fmt, routes.model.tokenizer, params.stop)

    def chat(request: Request, endpoint: str, body: dict):
        return routes.generation_route(request, endpoint, P.ChatRequest, prepare, body)

    @app.post("/v1/responses")
    @app.post("/responses")
    async def responses(request: Request):
        body = await read_json_authed(request)
        return await responses_api.handle(body, ChatCall(chat, request, "responses"), model_id)

    @app.post("/v1/messages")
    async def messages(request: Request):
        try:
            body = await read_json_authed(request)
            return await anthropic_api.handle(body, ChatCall(chat, request, "messages"), model_id)
        except Exception as e:  # noqa: BLE001 - every failure in Anthropic's error shape
            return anthropic_error(to_api_error(e))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        try:
            body = await read_json_authed(request)
            return JSONResponse({"input_tokens": await count_prompt_tokens(routes, anthropic_api.to_chat(
                body, need_max_tokens=False))})
        except Exception as e:  # noqa: BLE001
            return anthropic_error(to_api_error(e))

    async def read_json_authed(request: Request) -> dict:
        check_auth(request)
        return await read_json(request)


ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error(e: APIError) -> JSONResponse:
    kind = ANTHROPIC_ERROR_TYPES.get(e.status, "invalid_request_error" if e.status < 500 else "api_error")
    return JSONResponse({"type": "error", "error": {"type": kind, "message": e.message}}, status_code=e.status,
                        headers=e.headers)


async def count_prompt_tokens(routes, chat: dict) -> int:
    """The prompt tokens a chat request would take, counted on the scheduler thread between steps without
    generating: the chat route's own preparation (template, tools, images, video), then the prompt built."""
    import asyncio

    from ocula.engine.generate import Timings
    from ocula.errors import OculaError
    from ocula.server import protocol as P

    req = P.parse(P.ChatRequest, chat)
    params, explicit = P.sampling_params(req, routes.config.default_max_tokens, routes.config.sampling_defaults)
    greq, _ = await routes.prepare_chat(req, params, explicit, None)
    try:
        return await asyncio.wrap_future(routes.sched.call(lambda: len(greq.build_prompt(Timings()))))
    except OculaError as e:
        raise to_api_error(e, "messages") from None
