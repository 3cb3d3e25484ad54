"""Splitting a model's answer into reasoning, text and tool calls, incrementally (for streaming): the parser
behind ToolPlan.parser (ocula.engine.tool_calls), for every tool-call format there."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Union

from ocula.engine.tool_calls import (
    CALL_CLOSE, CALL_OPEN, MISTRAL_OPEN, PYTHON_TAG, THINK_CLOSE, THINK_OPEN, ToolCall, ToolPlan, is_text_param,
)


# ("content" | "reasoning", text) | a whole ToolCall | a streamed Hermes call: ("call_begin", ToolCall),
# ("call_args", text)..., ("call_end", ToolCall)
Event = Union[tuple, ToolCall]


@dataclass
class ParsedAnswer:
    """A chat answer split as the server splits it: text, reasoning and tool calls."""

    content: str
    reasoning: str
    tool_calls: list[ToolCall]


def parse_answer(text: str, plan: "ToolPlan | None", reasoning: bool = True, in_reasoning: bool = False) -> ParsedAnswer:
    parser = OutputParser(plan if plan is not None and plan.active else None, reasoning, in_reasoning)
    events = parser.feed(text) + parser.finish()
    return ParsedAnswer(*split_events(events))


def split_events(events: list) -> tuple[str, str, list[ToolCall]]:
    """(content, reasoning, tool calls) of a whole answer's parser events."""
    calls = [e if isinstance(e, ToolCall) else e[1] for e in events
             if isinstance(e, ToolCall) or e[0] == "call_end"]
    content = "".join(e[1] for e in events if not isinstance(e, ToolCall) and e[0] == "content")
    thought = "".join(e[1] for e in events if not isinstance(e, ToolCall) and e[0] == "reasoning")
    return content, thought, calls




def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper beginning of one of `markers`."""
    best = 0
    for mk in markers:
        for n in range(min(len(mk) - 1, len(text)), best, -1):
            if text.endswith(mk[:n]):
                best = n
                break
    return best


class OutputParser:
    """Splits generated text into reasoning, content and tool calls as it arrives. Text that may begin a
    marker is held back until it is clear; a call is emitted once it is complete."""

    def __init__(self, plan: ToolPlan | None, reasoning: bool = True, in_reasoning: bool = False):
        self.plan = plan
        self.reasoning = reasoning
        self.mode = "reasoning" if (reasoning and in_reasoning) else "start"
        self.buf = ""
        self.blank = ""  # whitespace held back: dropped if only calls follow
        self.calls: list[ToolCall] = []
        self.live: dict | None = None  # a Hermes call being streamed: its ToolCall, where its arguments start
        fmt = plan.format if plan else None
        # answers that are calls as a whole: JSON (Llama 3, generic); a Mistral call list whose [TOOL_CALLS]
        # control token the decoder dropped
        self.whole_starts: tuple[str, ...] = ("{", PYTHON_TAG) if fmt in ("llama3", "generic") else \
            ('[{"',) if fmt == "mistral" else ('{"name"',) if fmt == "hermes" else ()
        # (Hermes: a call whose <tool_call> markers are control tokens the decoder dropped)
        self.openers: tuple[str, ...] = ()
        if fmt in ("hermes", "qwen3_xml"):
            self.openers = (CALL_OPEN, "<function=") if fmt == "qwen3_xml" else (CALL_OPEN,)
        elif fmt == "mistral":
            self.openers = (MISTRAL_OPEN,)

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        return self._drain(False)

    def finish(self) -> list[Event]:
        out = self._drain(True)
        if self.blank and not self.calls:
            out.append(("content", self.blank))
        self.blank = ""
        return out

    # ------------------------------------------------------------ states

    def _drain(self, final: bool) -> list[Event]:
        out: list[Event] = []
        while True:
            before = (self.mode, len(self.buf))
            getattr(self, "_" + self.mode)(final, out)
            if (self.mode, len(self.buf)) == before:
                return out

    def _start(self, final: bool, out: list) -> None:
        head = self.buf.lstrip()
        if not head and not final:
            return
        if self.reasoning and head.startswith(THINK_OPEN):
            self.buf = head[len(THINK_OPEN):]
            self.mode = "reasoning"
            return
        if self.reasoning and THINK_OPEN.startswith(head) and head and not final:
            return
        if head.startswith(self.whole_starts):
            self.mode = "whole"
            return
        if not final and any(w.startswith(head) for w in self.whole_starts):
            return
        self.mode = "content"

    def _reasoning(self, final: bool, out: list) -> None:
        at = self.buf.find(THINK_CLOSE)
        if at != -1:
            if self.buf[:at]:
                out.append(("reasoning", self.buf[:at]))
            self.buf = self.buf[at + len(THINK_CLOSE):].lstrip("\n")
            self.mode = "after_think"
            return
        keep = 0 if final else _partial_suffix(self.buf, (THINK_CLOSE,))
        if len(self.buf) > keep:
            out.append(("reasoning", self.buf[: len(self.buf) - keep]))
            self.buf = self.buf[len(self.buf) - keep:]

    def _after_think(self, final: bool, out: list) -> None:
        head = self.buf.lstrip()
        if not head and not final:
            return
        if head.startswith(self.whole_starts):
            self.buf = head
            self.mode = "whole"
            return
        if not final and any(w.startswith(head) for w in self.whole_starts):
            return
        self.buf = head
        self.mode = "content"

    def _content(self, final: bool, out: list) -> None:
        starts = [(self.buf.find(o), o) for o in self.openers]
        starts = [s for s in starts if s[0] != -1]
        if starts:
            at, _ = min(starts)
            self._text(self.buf[:at], out)
            self.buf = self.buf[at:]
            self.mode = "call"
            return
        keep = 0 if final else _partial_suffix(self.buf, self.openers)
        if len(self.buf) > keep:
            self._text(self.buf[: len(self.buf) - keep], out)
            self.buf = self.buf[len(self.buf) - keep:]

    def _text(self, text: str, out: list) -> None:
        body = text.rstrip()
        if not body:
            self.blank += text
            return
        # trailing whitespace waits: before a call it is dropped, otherwise it goes out with what follows
        out.append(("content", self.blank + body))
        self.blank = text[len(body):]

    def _call(self, final: bool, out: list) -> None:
        buf = self.buf
        if buf.startswith(MISTRAL_OPEN):
            if final:
                self._emit_calls(_parse_mistral(buf[len(MISTRAL_OPEN):], self.plan), buf, out)
                self.buf = ""
                self.mode = "content"
            return
        close = CALL_CLOSE if buf.startswith(CALL_OPEN) else "</function>"
        at = buf.find(close)
        if self.live is None and close == CALL_CLOSE:
            head = _HERMES_HEAD.match(buf)
            if head and _known(self.plan, head.group(1)):
                call = ToolCall(head.group(1), "", self.plan.new_id())
                self.live = {"call": call, "at": head.end(), "sent": 0}
                out.append(("call_begin", call))
        if self.live is not None:
            self._stream_arguments(buf, at, final, out)
            return
        if at == -1:
            if final:
                self._emit_calls(_parse_block(buf, self.plan), buf, out)
                self.buf = ""
                self.mode = "content"
            return
        block = buf[: at + len(close)]
        self._emit_calls(_parse_block(block, self.plan), block, out)
        self.buf = buf[at + len(close):]
        self.mode = "content"

    def _stream_arguments(self, buf: str, close_at: int, final: bool, out: list) -> None:
        """A Hermes call whose name is known: its arguments go out as they arrive, all but a tail that may be
        the call's own end ('}', blanks, the start of '</tool_call>')."""
        live = self.live
        end = close_at if close_at != -1 else len(buf)
        args = buf[live["at"]:end]
        if close_at == -1 and not final:
            cut = len(args) - _partial_suffix(args, (CALL_CLOSE,))
            cut = len(args[:cut].rstrip())
            if cut and args[cut - 1] == "}":
                cut -= 1
            if cut > live["sent"]:
                out.append(("call_args", args[live["sent"]:cut]))
                live["sent"] = cut
            return
        args = args.rstrip()
        if args.endswith("}") and close_at != -1:
            args = args[:-1].rstrip()  # the call object's end
        if len(args) > live["sent"]:
            out.append(("call_args", args[live["sent"]:]))
        call = live["call"]
        call.arguments = args
        self.live = None
        self.calls.append(call)
        self.blank = ""
        out.append(("call_end", call))
        self.buf = buf[close_at + len(CALL_CLOSE):] if close_at != -1 else ""
        self.mode = "content"

    def _whole(self, final: bool, out: list) -> None:
        if not final:
            return
        text = self.buf
        self.buf = ""
        self.mode = "content"
        body = text.strip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):]
        calls = _parse_json_calls(body, self.plan)
        if calls is None and self.plan is not None and self.plan.format == "generic":
            try:
                value = json.loads(body)
            except ValueError:
                value = None
            if isinstance(value, dict) and isinstance(value.get("response"), str) and len(value) == 1:
                self._text(value["response"], out)
                return
        self._emit_calls(calls, text, out)

    def _emit_calls(self, calls: list[ToolCall] | None, raw: str, out: list) -> None:
        if not calls:
            self._text(raw, out)
            return
        self.blank = ""
        for c in calls:
            c.id = self.plan.new_id()
            self.calls.append(c)
            out.append(c)


def _known(plan: ToolPlan | None, name: Any) -> bool:
    return plan is not None and isinstance(name, str) and any(t["function"]["name"] == name for t in plan.tools)


def _make_call(plan, name: Any, args: Any) -> ToolCall | None:
    if not _known(plan, name):
        return None
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def _call_from_object(obj: Any, plan) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):
        obj = obj["function"]
    args = obj.get("arguments", obj.get("parameters"))
    return _make_call(plan, obj.get("name"), args)


def _parse_block(block: str, plan) -> list[ToolCall] | None:
    """One `<tool_call>...</tool_call>` (JSON or XML inside) or a bare `<function=...>...</function>`."""
    inner = block
    if inner.startswith(CALL_OPEN):
        inner = inner[len(CALL_OPEN):]
    if inner.endswith(CALL_CLOSE):
        inner = inner[: -len(CALL_CLOSE)]
    inner = inner.strip()
    if inner.startswith("<function="):
        call = _parse_xml_function(inner, plan)
        return [call] if call else None
    try:
        obj = json.loads(inner)
    except ValueError:
        return None
    call = _call_from_object(obj, plan)
    return [call] if call else None


# `<tool_call>` + `{"name": "NAME", "arguments": ` : from here a Hermes call's arguments can be streamed
_HERMES_HEAD = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"([^"\\]+)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_FUNCTION_RE = re.compile(r"^<function=([^>\n]+)>(.*?)(?:</function>\s*)?$", re.S)
_PARAM_RE = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)


def _parse_xml_function(text: str, plan) -> ToolCall | None:
    m = _FUNCTION_RE.match(text.strip())
    if not m or not _known(plan, m.group(1).strip()):
        return None
    name = m.group(1).strip()
    fn = next(t["function"] for t in plan.tools if t["function"]["name"] == name)
    props = (fn["parameters"].get("properties") or {}) if isinstance(fn["parameters"], dict) else {}
    args = {}
    for pname, raw in _PARAM_RE.findall(m.group(2)):
        pname = pname.strip()
        schema = props.get(pname) if isinstance(props.get(pname), dict) else {}
        if is_text_param(schema):
            args[pname] = raw
            continue
        try:
            args[pname] = json.loads(raw)
        except ValueError:
            args[pname] = raw
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def _parse_json_calls(body: str, plan) -> list[ToolCall] | None:
    """A whole answer that is a call: {"name", "parameters"|"arguments"}, a list of them, or
    {"tool_calls": [...]} / {"tool_call": {...}} (generic); several Llama calls may be joined by ';'."""
    try:
        value = json.loads(body)
    except ValueError:
        pieces = [p for p in body.split(";") if p.strip()]
        if len(pieces) < 2:
            return None
        try:
            value = [json.loads(p) for p in pieces]
        except ValueError:
            return None
    if isinstance(value, dict) and "tool_calls" in value:
        value = value["tool_calls"]
    elif isinstance(value, dict) and "tool_call" in value:
        value = [value["tool_call"]]
    items = value if isinstance(value, list) else [value]
    calls = [_call_from_object(v, plan) for v in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls


def _parse_mistral(body: str, plan) -> list[ToolCall] | None:
    body = body.strip()
    if body.startswith("["):
        return _parse_json_calls(body, plan)
    calls = []  # newer Mistral templates: NAME[ARGS]{...}, repeated with [TOOL_CALLS] between
    for piece in body.split(MISTRAL_OPEN):
        name, sep, args = piece.partition("[ARGS]")
        if not sep:
            return None
        call = _make_call(plan, name.strip(), args.strip())
        if call is None:
            return None
        calls.append(call)
    return calls or None
