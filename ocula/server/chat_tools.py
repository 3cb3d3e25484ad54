"""Chat completions with tools and reasoning: the request side (tools into the template, a forced call as a
grammar) and the response side (tool_calls / reasoning_content in messages and stream deltas).

A `ChatPlan` is made per chat request; `wrap(fmt)` turns the plain ChatFormat into one that runs the model's
text through `ocula.engine.tool_calls.OutputParser`, so the streamed deltas and the full message come from the
same parse.
"""
from __future__ import annotations

import copy
import dataclasses
from ocula.engine.request import Delta, Finished, Started
from ocula.engine.structured import available as structured_available
from ocula.engine.tool_calls import THINK_OPEN, ToolCall, ToolPlan
from ocula.engine.tool_parse import split_events
from ocula.errors import RequestError
from ocula.server.errors import APIError

REASONING_FORMATS = ("auto", "deepseek", "deepseek-legacy", "none", "parsed")  # llama-server's names


class ChatPlan:
    def __init__(self, req, template_source: str | None):
        try:
            self.tools = ToolPlan.create(req.tools, req.tool_choice, template_source, req.parallel_tool_calls)
        except RequestError as e:
            param = "tool_choice" if str(e).startswith("tool_choice") else "tools"
            raise APIError(400, str(e), param=param, code="invalid_value") from None
        kwargs = req.chat_template_kwargs or {}
        if not isinstance(kwargs, dict):
            raise APIError(400, "chat_template_kwargs must be an object", param="chat_template_kwargs",
                           code="invalid_type")
        reserved = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"} & set(kwargs)
        if reserved:
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(sorted(reserved))}",
                           param="chat_template_kwargs", code="invalid_value")
        fmt = req.reasoning_format or "auto"
        if fmt not in REASONING_FORMATS:
            raise APIError(400, f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}",
                           param="reasoning_format", code="invalid_value")
        self.reasoning = fmt != "none"
        self.template_kwargs = {**kwargs, **self.tools.template_kwargs()}
        for name in ("add_generation_prompt", "continue_final_message"):  # llama-server / vLLM top-level fields
            if getattr(req, name, None) is not None:
                self.template_kwargs[name] = getattr(req, name)
        self.thinks = THINK_OPEN in (template_source or "")
        self.in_reasoning = False

    @property
    def needs_parse(self) -> bool:
        return self.tools.active or (self.reasoning and self.thinks)

    def history(self, messages: list[dict]) -> list[dict]:
        try:
            return self.tools.history(messages)
        except RequestError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None

    def note_prompt(self, prompt_text: str) -> None:
        """A generation prompt that ends inside an open `<think>` (templates that start the model thinking)."""
        tail = prompt_text.rstrip()
        self.in_reasoning = tail.endswith(THINK_OPEN)

    def constraint(self, structured):
        grammar = self.tools.grammar(close_think=self.in_reasoning, tokenizer=structured.tokenizer)
        if grammar is None or (self.tools.mode == "auto" and not structured_available()):
            return None  # without llguidance, auto calls are only parsed
        return structured.for_lark(grammar, "the tool schema")

    def wrap(self, fmt):
        return ParsedChatFormat(fmt, self) if self.needs_parse else fmt


class ParsedChatFormat:
    """A ChatFormat whose text goes through the tool/reasoning parser."""

    def __init__(self, base, plan: ChatPlan):
        self.base, self.plan = base, plan
        self.parser = plan.tools.parser(plan.reasoning, plan.in_reasoning)
        self.n_calls = 0

    def __copy__(self) -> "ParsedChatFormat":
        """Another choice of the same response (n > 1): its own parser state."""
        return ParsedChatFormat(copy.copy(self.base), self.plan)

    def start(self) -> list[dict]:
        return self.base.start()

    def _chunks(self, events: list, logprobs=None) -> list[dict]:
        out = []
        for e in events:
            if isinstance(e, ToolCall) or e[0] == "call_begin":
                call = e if isinstance(e, ToolCall) else e[1]
                self.n_calls += 1
                out.append(self._call_chunk({"id": call.id, "type": "function",
                                             "function": {"name": call.name, "arguments": ""}}))
                if isinstance(e, ToolCall):
                    out.append(self._call_chunk({"function": {"arguments": e.arguments}}))
            elif e[0] == "call_args":
                out.append(self._call_chunk({"function": {"arguments": e[1]}}))
            elif e[0] in ("content", "reasoning"):
                key = "content" if e[0] == "content" else "reasoning_content"
                out.append(self.base._chunk({key: e[1]}))
        if logprobs:
            lp = self.base._lp(logprobs)
            if out:
                out[0]["choices"][0]["logprobs"] = lp
            else:
                out.append(self.base._chunk({}, None, lp))
        return out

    def _call_chunk(self, fields: dict) -> dict:
        return self.base._chunk({"tool_calls": [{"index": self.n_calls - 1, **fields}]})

    def delta(self, ev: Delta) -> list[dict]:
        return self._chunks(self.parser.feed(ev.text), ev.logprobs if self.base.logprobs else None)

    def finish(self, first: Started, ev: Finished, include_usage: bool) -> list[dict]:
        out = self._chunks(self.parser.feed(ev.tail) + self.parser.finish())
        done = _with_reason(ev, self.n_calls > 0)
        return out + self.base.finish(first, done, include_usage)

    def full(self, first: Started, deltas: list[Delta], ev: Finished) -> dict:
        parser = self.plan.tools.parser(self.plan.reasoning, self.plan.in_reasoning)
        content, reasoning, calls = split_events(parser.feed(ev.result.text) + parser.finish())
        body = self.base.full(first, deltas, _with_reason(ev, bool(calls)))
        message = body["choices"][0]["message"]
        message["content"] = content if (content or not calls) else None
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [c.as_openai() for c in calls]
        return body


def _with_reason(ev: Finished, called: bool) -> Finished:
    if not called or ev.result.finish_reason != "stop":
        return dataclasses.replace(ev, tail="")
    return dataclasses.replace(ev, tail="", result=dataclasses.replace(ev.result, finish_reason="tool_calls"))


