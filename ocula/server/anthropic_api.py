"""`POST /v1/messages` and `/v1/messages/count_tokens` (Anthropic Messages API) as a chat completion (count_tokens:
the prompt built and counted without generating).

Request: `system` (string or text blocks), `messages` whose content is a string or blocks (`text`, `image` with a
base64 or URL source, `tool_use`, `tool_result`; an assistant's `thinking` blocks go to the template as its reasoning), `tools` (`input_schema`),
`tool_choice` (auto / any / tool / none, `disable_parallel_tool_use`), `max_tokens`, `stop_sequences`,
`temperature`, `top_p`, `top_k`, `thinking` (passed to the template as `enable_thinking`). The answer is a
`message` with `thinking`, `text` and `tool_use` blocks; streaming sends message_start, content_block_start /
_delta / _stop per block, message_delta and message_stop. Errors are `{"type": "error", "error": {...}}`.
"""
from __future__ import annotations

import json
import uuid
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse

from ocula.server.agent_apis import SSE, ChatCall
from ocula.server.errors import APIError

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


# ---------------------------------------------------------------- request


def to_chat(body: dict, need_max_tokens: bool = True) -> dict:
    messages: list[dict] = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _text_of(system, "system")})
    turns = body.get("messages")
    if not isinstance(turns, list):
        raise _bad("messages must be a list of {\"role\": ..., \"content\": ...}", "messages")
    if not turns:  # as llama-server: an empty conversation is one empty user turn
        turns = [{"role": "user", "content": ""}]
    for i, m in enumerate(turns):
        where = f"messages.{i}"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise _bad(f"{where}.role must be 'user' or 'assistant'", f"{where}.role")
        _add_turn(messages, m["role"], m.get("content"), where)
    chat: dict[str, Any] = {"messages": messages}
    max_tokens = body.get("max_tokens")
    if max_tokens is None and need_max_tokens:
        raise _bad("max_tokens: field required", "max_tokens")
    if max_tokens is not None:
        chat["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "top_k", "stream"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("stop_sequences") is not None:
        chat["stop"] = body["stop_sequences"]
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise _bad("tools must be a list", "tools")
        chat["tools"] = [_tool(t, i) for i, t in enumerate(tools)]
    choice = body.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
            raise _bad("tool_choice must be {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}", "tool_choice")
        kind = choice["type"]
        chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or \
            {"type": "function", "function": {"name": choice.get("name")}}
        if choice.get("disable_parallel_tool_use"):
            chat["parallel_tool_calls"] = False
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "disabled"):
        chat["chat_template_kwargs"] = {"enable_thinking": thinking["type"] == "enabled"}
    return chat


def _text_of(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in value):
        return "".join(b.get("text", "") for b in value)
    raise _bad(f"{where} must be a string or a list of text blocks", where)


def _add_turn(messages: list[dict], role: str, content: Any, where: str) -> None:
    if isinstance(content, str):
        messages.append({"role": role, "content": content})
        return
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or a list of content blocks", f"{where}.content")
    parts: list[dict] = []
    calls: list[dict] = []
    thought = ""
    for j, block in enumerate(content):
        bw = f"{where}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text")})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block.get("source"), bw)}})
        elif kind == "tool_use" and role == "assistant":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"), "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}})
        elif kind == "tool_result" and role == "user":
            if parts:  # text before a result stays before it
                messages.append({"role": "user", "content": parts})
                parts = []
            result = block.get("content", "")
            if isinstance(result, list):
                if any(isinstance(b, dict) and b.get("type") != "text" for b in result):
                    raise _bad(f"{bw}.content: only text is supported inside a tool_result", f"{bw}.content")
                result = "".join(b.get("text", "") for b in result)
            if not isinstance(result, str):
                raise _bad(f"{bw}.content must be a string or text blocks", f"{bw}.content")
            if block.get("is_error"):
                result = f"Error: {result}"
            messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": result})
        elif kind == "thinking" and role == "assistant":
            thought += block.get("thinking") or ""  # templates that keep reasoning render it
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise _bad(f"{bw} is a {kind!r} block, which this server does not take here; send text, image, "
                       "tool_use (assistant) or tool_result (user) blocks", bw)
    extra = {"reasoning_content": thought} if thought else {}
    if calls:
        messages.append({"role": "assistant", "content": parts or None, "tool_calls": calls, **extra})
    elif parts or extra:
        messages.append({"role": role, "content": parts, **extra})


def _image_url(source: Any, where: str) -> str:
    if isinstance(source, dict) and source.get("type") == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise _bad(f"{where}.source needs media_type and data strings", f"{where}.source")
        return f"data:{media};base64,{data}"
    if isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        return source["url"]
    raise _bad(f"{where}.source must be {{\"type\": \"base64\", \"media_type\", \"data\"}} or "
               "{\"type\": \"url\", \"url\"}", f"{where}.source")


def _tool(tool: Any, i: int) -> dict:
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or \
            tool.get("type") not in (None, "custom"):
        raise _bad(f"tools.{i} must be a client tool {{\"name\", \"description\", \"input_schema\"}} (server tools "
                   "are not supported)", f"tools.{i}")
    fn = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object", "properties": {}}}
    if isinstance(tool.get("description"), str):
        fn["description"] = tool["description"]
    return {"type": "function", "function": fn}


# ---------------------------------------------------------------- response


def _usage(u: dict | None) -> dict:
    u = u or {}
    cached = u.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    # Anthropic counts cache reads apart: input_tokens + cache_read_input_tokens is the whole prompt
    return {"input_tokens": u.get("prompt_tokens", 0) - cached, "output_tokens": u.get("completion_tokens", 0),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def _envelope(model_id: str, content: list, stop_reason: str | None, usage: dict) -> dict:
    return {"id": _new_id("msg"), "type": "message", "role": "assistant", "model": model_id, "content": content,
            "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}


def full(answer: dict, model_id: str) -> dict:
    choice = answer["choices"][0]
    msg = choice["message"]
    blocks = []
    if msg.get("reasoning_content"):
        blocks.append({"type": "thinking", "thinking": msg["reasoning_content"], "signature": ""})
    if msg.get("content"):
        blocks.append({"type": "text", "text": msg["content"]})
    for c in msg.get("tool_calls") or []:
        blocks.append({"type": "tool_use", "id": _tool_use_id(c["id"]), "name": c["function"]["name"],
                       "input": json.loads(c["function"]["arguments"] or "{}")})
    if not any(b["type"] != "thinking" for b in blocks):  # an empty answer is still one (empty) text block
        blocks.append({"type": "text", "text": ""})
    message = _envelope(model_id, blocks, STOP_REASONS.get(choice["finish_reason"], "end_turn"),
                        _usage(answer.get("usage")))
    if choice.get("stop_word"):
        message.update(stop_reason="stop_sequence", stop_sequence=choice["stop_word"])
    return message


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


async def handle(body: dict, call: ChatCall, model_id: str):
    chat = to_chat(body)
    if body.get("stream") is not None and not isinstance(body["stream"], bool):  # strict: "yes", 1 are not true
        raise _bad(f"stream must be true or false, got {body['stream']!r}", "stream")
    if not body.get("stream"):
        return JSONResponse(full(await call.answer(chat), model_id))
    chunks = await call.chunks(chat)
    started = {"prompt_tokens": call.prompt_tokens, "prompt_tokens_details": {"cached_tokens": call.cached_tokens}}
    return SSE(stream_events(chunks, model_id, started), call)


async def stream_events(chunks: AsyncIterator[dict], model_id: str, started: dict) -> AsyncIterator[dict]:
    start = _envelope(model_id, [], None, _usage(started))
    yield {"type": "message_start", "message": start}
    index, open_kind = -1, None
    usage, finish, word = None, None, None

    def close():
        if open_kind == "thinking":  # clients expect a signature before a thinking block ends (none here)
            yield {"type": "content_block_delta", "index": index, "delta": {"type": "signature_delta", "signature": ""}}
        yield {"type": "content_block_stop", "index": index}

    try:
        async for chunk in chunks:
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                finish = choice.get("finish_reason") or finish
                word = choice.get("stop_word") or word
                d = choice.get("delta") or {}
                for kind, piece in (("thinking", d.get("reasoning_content")), ("text", d.get("content"))):
                    if not piece:
                        continue
                    if open_kind != kind:
                        if open_kind is not None:
                            for e in close():
                                yield e
                        index, open_kind = index + 1, kind
                        block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" \
                            else {"type": "text", "text": ""}
                        yield {"type": "content_block_start", "index": index, "content_block": block}
                    delta = {"type": "thinking_delta", "thinking": piece} if kind == "thinking" \
                        else {"type": "text_delta", "text": piece}
                    yield {"type": "content_block_delta", "index": index, "delta": delta}
                for tc in d.get("tool_calls") or []:
                    fn = tc.get("function") or {}
                    if tc.get("id"):
                        if open_kind is not None:
                            for e in close():
                                yield e
                        index, open_kind = index + 1, "tool_use"
                        yield {"type": "content_block_start", "index": index, "content_block": {
                            "type": "tool_use", "id": _tool_use_id(tc["id"]), "name": fn.get("name"), "input": {}}}
                    if fn.get("arguments"):
                        yield {"type": "content_block_delta", "index": index,
                               "delta": {"type": "input_json_delta", "partial_json": fn["arguments"]}}
    except APIError as e:
        kind = "overloaded_error" if e.status == 503 else "api_error"
        yield {"type": "error", "error": {"type": kind, "message": e.message}}
        return
    if open_kind is None:  # an empty answer is still one (empty) text block
        index, open_kind = 0, "text"
        yield {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    for e in close():
        yield e
    u = _usage(usage)
    reason = "stop_sequence" if word else STOP_REASONS.get(finish, "end_turn")
    yield {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": word},
           "usage": {"output_tokens": u["output_tokens"], "input_tokens": u["input_tokens"],
                     "cache_read_input_tokens": u["cache_read_input_tokens"]}}
    yield {"type": "message_stop"}
