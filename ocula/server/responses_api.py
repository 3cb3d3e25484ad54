"""`POST /v1/responses` (OpenAI Responses API, stateless) as a chat completion.

Request: `input` (a string, or items: messages with input_text / input_image / output_text parts,
`function_call` and `function_call_output` items), `instructions`, function `tools`, `tool_choice`,
`parallel_tool_calls`, `text.format` (json_schema / json_object / text), `max_output_tokens`, sampling fields.
`previous_response_id` is refused (nothing is stored). The answer is a `response` object whose `output` holds a
reasoning item (when the model thinks), a message with `output_text`, and `function_call` items; streaming sends
the Responses event sequence (response.created ... response.completed).
"""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse

from ocula.server.agent_apis import SSE, ChatCall
from ocula.server.errors import APIError

SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
            "repeat_penalty", "repetition_penalty", "stop", "logit_bias", "chat_template_kwargs", "reasoning_format")
UNSUPPORTED_TOOLS = "only function tools are supported (no built-in tools such as web or file search)"


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---------------------------------------------------------------- request


def to_chat(body: dict) -> dict:
    if body.get("previous_response_id"):
        raise _bad("previous_response_id is not supported: this server keeps no responses; send the whole "
                   "conversation in input", "previous_response_id")
    messages: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("instructions must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list) and items:
        for i, item in enumerate(items):
            _add_item(messages, item, f"input[{i}]")
    else:
        raise _bad("input must be a string or a non-empty list of items", "input")
    chat: dict[str, Any] = {"messages": messages}
    for name in SAMPLING:
        if name in body:
            chat[name] = body[name]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("tools"):
        chat["tools"] = [_tool(t, i) for i, t in enumerate(body["tools"])] if isinstance(body["tools"], list) \
            else body["tools"]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise _bad("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}",
                       "tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        chat["tool_choice"] = choice
    if body.get("parallel_tool_calls") is not None:
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if fmt is not None:
        chat["response_format"] = _response_format(fmt)
    return chat


def _add_item(messages: list[dict], item: Any, where: str) -> None:
    if isinstance(item, str):
        messages.append({"role": "user", "content": item})
        return
    if not isinstance(item, dict):
        raise _bad(f"{where} must be an object (a message or a function_call / function_call_output item)", where)
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise _bad(f"{where}.role must be user, assistant, system or developer", f"{where}.role")
        # developer instructions are the system turn for chat templates (few know a developer role)
        role = "system" if role == "developer" else role
        messages.append({"role": role, "content": _content(item.get("content"), f"{where}.content")})
    elif kind == "function_call":
        call = {"id": item.get("call_id") or item.get("id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
        if not isinstance(call["function"]["name"], str):
            raise _bad(f"{where}.name must be the function's name", f"{where}.name")
        last = messages[-1] if messages else None
        if last and last["role"] == "assistant" and last.get("tool_calls") is not None:
            last["tool_calls"].append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        if isinstance(output, list):
            output = "".join(p.get("text", "") for p in output if isinstance(p, dict))
        if not isinstance(output, str):
            raise _bad(f"{where}.output must be a string", f"{where}.output")
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
    elif kind == "reasoning":
        return  # earlier reasoning is not re-sent to the model
    else:
        raise _bad(f"{where} has the unsupported item type {kind!r}; send messages, function_call and "
                   "function_call_output items", f"{where}.type")


def _content(content: Any, where: str) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or a list of parts", where)
    parts = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": p.get("text")})
        elif kind == "input_image":
            url = p.get("image_url")
            if isinstance(url, dict):
                url = url.get("url")
            if not isinstance(url, str):
                raise _bad(f"{where}[{j}].image_url must be a URL or data URI string (file_id is not supported)",
                           f"{where}[{j}].image_url")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            parts.append(p)  # refused by the chat path, naming the part (audio, file, unknown)
    return parts


def _tool(tool: Any, i: int) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
        raise _bad(f"tools[{i}] has type {kind!r}: {UNSUPPORTED_TOOLS}", f"tools[{i}]")
    fn = {"name": tool.get("name"), "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
    if isinstance(tool.get("description"), str):
        fn["description"] = tool["description"]
    return {"type": "function", "function": fn}


def _response_format(fmt: Any) -> dict:
    if not isinstance(fmt, dict):
        raise _bad("text.format must be an object such as {\"type\": \"json_schema\", ...}", "text.format")
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("text.format.schema: a json_schema format needs a JSON schema object", "text.format.schema")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "output"),
                                                       "schema": fmt.get("schema", {}), "strict": fmt.get("strict")}}
    return fmt


# ---------------------------------------------------------------- response


class ResponseBuilder:
    def __init__(self, body: dict, chat: dict, model_id: str):
        self.id = _new_id("resp")
        self.created = int(time.time())
        self.body, self.chat, self.model = body, chat, model_id

    def envelope(self, status: str, output: list, usage: dict | None, incomplete: str | None = None,
                 error: dict | None = None) -> dict:
        b = self.body
        fmt = (b.get("text") or {}).get("format") if isinstance(b.get("text"), dict) else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
            "output": output, "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": b.get("instructions"), "metadata": b.get("metadata") or {},
            "max_output_tokens": b.get("max_output_tokens"), "parallel_tool_calls": b.get("parallel_tool_calls", True),
            "previous_response_id": None, "reasoning": None, "store": False,
            "temperature": b.get("temperature"), "top_p": b.get("top_p"),
            "text": {"format": fmt or {"type": "text"}}, "tool_choice": b.get("tool_choice", "auto"),
            "tools": b.get("tools") or [], "truncation": "disabled", "usage": usage, "user": b.get("user"),
        }

    @staticmethod
    def usage(u: dict | None) -> dict | None:
        if not u:
            return None
        return {"input_tokens": u["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": u.get("prompt_tokens_details", {}).get("cached_tokens", 0)},
                "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u["total_tokens"]}

    def full(self, answer: dict) -> dict:
        choice = answer["choices"][0]
        msg = choice["message"]
        output = []
        if msg.get("reasoning_content"):
            output.append(reasoning_item(_new_id("rs"), msg["reasoning_content"]))
        if msg.get("content") or not msg.get("tool_calls"):
            output.append(message_item(_new_id("msg"), msg.get("content") or "", "completed"))
        for c in msg.get("tool_calls") or []:
            output.append(call_item(_new_id("fc"), c["id"], c["function"]["name"], c["function"]["arguments"],
                                    "completed"))
        incomplete = "max_output_tokens" if choice["finish_reason"] == "length" else None
        return self.envelope("incomplete" if incomplete else "completed", output, self.usage(answer.get("usage")),
                             incomplete)


def reasoning_item(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def message_item(item_id: str, text: str | None, status: str) -> dict:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


async def handle(body: dict, call: ChatCall, model_id: str):
    chat = to_chat(body)
    builder = ResponseBuilder(body, chat, model_id)
    if body.get("stream") is not None and not isinstance(body["stream"], bool):  # strict: "yes", 1 are not true
        raise _bad(f"stream must be true or false, got {body['stream']!r}", "stream")
    if not body.get("stream"):
        return JSONResponse(builder.full(await call.answer(chat)))
    chunks = await call.chunks(chat)
    return SSE(StreamEvents(builder).events(chunks), call)


class StreamEvents:
    """Chat chunks → the Responses event sequence. Items open as their first piece arrives: a reasoning item,
    a message (one output_text part), a function_call per tool call; each is closed before the next opens."""

    def __init__(self, builder: ResponseBuilder):
        self.b = builder
        self.seq = 0
        self.output: list[dict] = []
        self.open: dict | None = None  # the item being written
        self.text = ""

    def ev(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    async def events(self, chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
        yield self.ev("response.created", response=self.b.envelope("in_progress", [], None))
        yield self.ev("response.in_progress", response=self.b.envelope("in_progress", [], None))
        usage, finish = None, None
        try:
            async for chunk in chunks:
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                    for e in self.delta(choice.get("delta") or {}):
                        yield e
        except APIError as e:
            for x in self.close():
                yield x
            err = {"code": e.code or "server_error", "message": e.message}
            yield self.ev("response.failed", response=self.b.envelope("failed", self.output, None, error=err))
            return
        for x in self.close():
            yield x
        if not self.output:  # an empty answer is still one (empty) message
            for x in self.start("message", message_item(_new_id("msg"), None, "in_progress")):
                yield x
            for x in self.close():
                yield x
        incomplete = "max_output_tokens" if finish == "length" else None
        final = self.b.envelope("incomplete" if incomplete else "completed", self.output, self.b.usage(usage),
                                incomplete)
        # response.completed also when cut short (status "incomplete"): the SDK's stream helper waits for it
        yield self.ev("response.completed", response=final)

    def start(self, kind: str, item: dict) -> list[dict]:
        out = self.close()
        self.open, self.text = item, ""
        idx = len(self.output)
        out.append(self.ev("response.output_item.added", output_index=idx, item=dict(item)))
        if kind == "message":
            out.append(self.ev("response.content_part.added", item_id=item["id"], output_index=idx, content_index=0,
                               part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
        elif kind == "reasoning":
            out.append(self.ev("response.content_part.added", item_id=item["id"], output_index=idx, content_index=0,
                               part={"type": "reasoning_text", "text": ""}))
        return out

    def delta(self, d: dict) -> list[dict]:
        out: list[dict] = []
        idx = len(self.output)
        if d.get("reasoning_content"):
            if not self.open or self.open["type"] != "reasoning":
                out += self.start("reasoning", {"type": "reasoning", "id": _new_id("rs"), "summary": [],
                                                "content": []})
                idx = len(self.output)
            self.text += d["reasoning_content"]
            out.append(self.ev("response.reasoning_text.delta", item_id=self.open["id"], output_index=idx,
                               content_index=0, delta=d["reasoning_content"]))
        if d.get("content"):
            if not self.open or self.open["type"] != "message":
                out += self.start("message", message_item(_new_id("msg"), None, "in_progress"))
                idx = len(self.output)
            self.text += d["content"]
            out.append(self.ev("response.output_text.delta", item_id=self.open["id"], output_index=idx,
                               content_index=0, delta=d["content"], logprobs=[]))
        for tc in d.get("tool_calls") or []:
            fn = tc.get("function") or {}
            if tc.get("id"):
                out += self.start("function_call", call_item(_new_id("fc"), tc["id"], fn.get("name", ""), "",
                                                             "in_progress"))
                idx = len(self.output)
            if fn.get("arguments"):
                self.text += fn["arguments"]
                out.append(self.ev("response.function_call_arguments.delta", item_id=self.open["id"],
                                   output_index=idx, delta=fn["arguments"]))
        return out

    def close(self) -> list[dict]:
        item = self.open
        if item is None:
            return []
        self.open = None
        idx = len(self.output)
        out = []
        if item["type"] == "message":
            part = {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}
            out.append(self.ev("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                               text=self.text, logprobs=[]))
            out.append(self.ev("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                               part=part))
            item = message_item(item["id"], self.text, "completed")
        elif item["type"] == "reasoning":
            out.append(self.ev("response.reasoning_text.done", item_id=item["id"], output_index=idx, content_index=0,
                               text=self.text))
            out.append(self.ev("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                               part={"type": "reasoning_text", "text": self.text}))
            item = reasoning_item(item["id"], self.text)
        else:
            out.append(self.ev("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                               name=item["name"], arguments=self.text))
            item = call_item(item["id"], item["call_id"], item["name"], self.text, "completed")
        out.append(self.ev("response.output_item.done", output_index=idx, item=item))
        self.output.append(item)
        return out
