"""Tool calling: which call syntax a chat template teaches, the grammar that forces a call, and the parser that
splits a model's output into reasoning, text and tool calls (incrementally, for streaming).

    plan = ToolPlan.create(tools, tool_choice, template_source)    # OpenAI-style tools / tool_choice
    kwargs = plan.template_kwargs()                                # tools=... for the chat template
    messages = plan.history(messages)                              # tool_calls / role "tool" as templates want
    grammar = plan.grammar()                                       # lark text for llguidance, or None
    parser = plan.parser(reasoning=True, in_reasoning=False)
    for piece in text_pieces: events = parser.feed(piece)          # [("content"|"reasoning", str) | ToolCall]
    events = parser.finish()

Formats, chosen from the template's own tool syntax:
- hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Qwen2.5, Qwen2.5-VL, Qwen3, Qwen3-VL, Hermes)
- qwen3_xml: `<tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`
  (Qwen3-Coder, Qwen3.5)
- llama3: the whole answer is `{"name": ..., "parameters": {...}}` (Llama 3.1-3.3 JSON tool calling)
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}]` or `[TOOL_CALLS]NAME[ARGS]{...}`
- generic: templates that know nothing of tools get the tools described in a system message and answer with
  `{"tool_calls": [{"name": ..., "arguments": {...}}]}` (any other answer is text)
"""
from __future__ import annotations

import json
import random
import re
import string
import uuid
from dataclasses import dataclass, field
from typing import Any, Union

from ocula.errors import RequestError

FORMATS = ("hermes", "qwen3_xml", "llama3", "mistral", "generic")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_OPEN = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"
NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_TOOLS = 128
# JSON in forced calls is compact: a weak model cannot wander off into endless blanks
COMPACT = {"whitespace_flexible": False}
GENERIC_SYSTEM = (
    "You can call these tools (JSON schemas of their arguments):\n{tools}\n\n"
    "To call tools, answer with only this JSON object and nothing else:\n"
    '{{"tool_calls": [{{"name": "<tool name>", "arguments": {{<arguments>}}}}]}}\n'
    "Otherwise answer the user normally."
)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


Event = Union[tuple, ToolCall]  # ("content", text) | ("reasoning", text) | ToolCall


def detect_format(template_source: str | None) -> str:
    src = template_source or ""
    if "<function=" in src and "<parameter=" in src:
        return "qwen3_xml"
    if CALL_OPEN in src:
        return "hermes"
    if MISTRAL_OPEN in src:
        return "mistral"
    if "<|start_header_id|>" in src and "tools" in src:
        return "llama3"
    return "generic"


def check_tools(tools: Any) -> list[dict]:
    """OpenAI `tools` → [{"type": "function", "function": {"name", "description"?, "parameters"}}], validated."""
    if not isinstance(tools, list):
        raise RequestError("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects")
    if len(tools) > MAX_TOOLS:
        raise RequestError(f"tools: at most {MAX_TOOLS} tools are allowed, got {len(tools)}")
    out, seen = [], set()
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
            kind = t.get("type") if isinstance(t, dict) else type(t).__name__
            raise RequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}; "
                               f"tools of type {kind!r} are not supported")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise RequestError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '-', '.' or ':'")
        if name in seen:
            raise RequestError(f"tools[{i}].function.name {name!r} is used by two tools")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON schema object")
        clean = {"name": name, "parameters": params}
        if isinstance(fn.get("description"), str):
            clean = {"name": name, "description": fn["description"], "parameters": params}
        out.append({"type": "function", "function": clean})
    return out


def check_tool_choice(choice: Any, tools: list[dict]) -> tuple[str, str | None]:
    """OpenAI `tool_choice` → (mode, forced function name): mode is none, auto or required."""
    names = [t["function"]["name"] for t in tools]
    if choice is None:
        return ("auto" if tools else "none"), None
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise RequestError("tool_choice 'required' needs tools")
        return choice, None
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
        if isinstance(name, str):
            if name not in names:
                raise RequestError(f"tool_choice names function {name!r}, which is not among the tools "
                                   f"({', '.join(names) or 'none given'})")
            return "required", name
    raise RequestError("tool_choice must be 'none', 'auto', 'required' or "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}}")


@dataclass
class ToolPlan:
    format: str
    tools: list[dict]
    mode: str  # none | auto | required
    forced: str | None = None
    parallel: bool = True

    @classmethod
    def create(cls, tools: Any, tool_choice: Any = None, template_source: str | None = None,
               parallel: bool | None = None) -> "ToolPlan":
        checked = check_tools(tools) if tools is not None else []
        mode, forced = check_tool_choice(tool_choice, checked)
        return cls(detect_format(template_source), checked, mode, forced, True if parallel is None else bool(parallel))

    @property
    def active(self) -> bool:
        return self.mode != "none" and bool(self.tools)

    @property
    def offered(self) -> list[dict]:
        if self.forced:
            return [t for t in self.tools if t["function"]["name"] == self.forced]
        return self.tools

    def template_kwargs(self) -> dict:
        if not self.active or self.format == "generic":
            return {}
        return {"tools": self.offered}

    def new_id(self) -> str:
        if self.format == "mistral":  # Mistral's templates accept only 9-character alphanumeric ids
            return "".join(random.choices(string.ascii_letters + string.digits, k=9))
        return "call_" + uuid.uuid4().hex[:24]

    # ------------------------------------------------------------ history

    def history(self, messages: list[dict]) -> list[dict]:
        """Messages with assistant `tool_calls` arguments as objects (templates `tojson` them) and, for templates
        without tool support, calls and results as plain text turns and the tools in a system message."""
        out = []
        for m in messages:
            if not isinstance(m, dict):
                out.append(m)
                continue
            calls = m.get("tool_calls")
            if m.get("role") == "assistant" and isinstance(calls, list) and calls:
                calls = [_call_for_template(c) for c in calls]
                if self.format == "generic":
                    body = {"tool_calls": [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                                           for c in calls]}
                    m = {k: v for k, v in m.items() if k != "tool_calls"}
                    m["content"] = json.dumps(body, ensure_ascii=False)
                else:
                    m = {**m, "tool_calls": calls}
            elif m.get("role") == "tool" and self.format == "generic":
                content = m.get("content")
                if isinstance(content, list):
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                m = {"role": "user", "content": json.dumps({"tool_response": {
                    "tool_call_id": m.get("tool_call_id"), "content": content}}, ensure_ascii=False)}
            out.append(m)
        if self.active and self.format == "generic":
            described = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in self.offered)
            note = GENERIC_SYSTEM.format(tools=described)
            if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
                out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + note}
            else:
                out.insert(0, {"role": "system", "content": note})
        return out

    # ------------------------------------------------------------ forcing a call

    def grammar(self) -> str | None:
        """llguidance lark grammar that admits only calls of the offered tools (tool_choice required or named)."""
        if self.mode != "required" or not self.tools:
            return None
        tools = self.offered
        many = self.parallel and not self.forced
        if self.format == "hermes":
            call = f'"{CALL_OPEN}\\n" %json {_dump(_any_call(tools, "arguments"))} "\\n{CALL_CLOSE}"'
            return _repeat(call, '"\\n"', many)
        if self.format == "qwen3_xml":
            rules = [f"call_{i}: {_xml_call(t['function'])}" for i, t in enumerate(tools)]
            alts = " | ".join(f"call_{i}" for i in range(len(tools)))
            return _repeat(f"({alts})", '"\\n"', many) + "\n" + "\n".join(rules) + "\n"
        if self.format == "llama3":
            return f"start: %json {_dump(_any_call(tools, 'parameters'))}\n"
        if self.format == "mistral":
            arr = {"type": "array", "items": _any_call(tools, "arguments"), "minItems": 1,
                   "x-guidance": COMPACT}
            if not many:
                arr["maxItems"] = 1
            return f'start: "{MISTRAL_OPEN}" %json {_dump(arr)}\n'
        arr = {"type": "array", "items": _any_call(tools, "arguments"), "minItems": 1}
        if not many:
            arr["maxItems"] = 1
        body = {"type": "object", "properties": {"tool_calls": arr}, "required": ["tool_calls"],
                "additionalProperties": False, "x-guidance": COMPACT}
        return f"start: %json {_dump(body)}\n"

    def parser(self, reasoning: bool = True, in_reasoning: bool = False) -> "OutputParser":
        return OutputParser(self if self.active else None, reasoning, in_reasoning)


def _call_for_template(call: Any) -> dict:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise RequestError("an assistant message's tool_calls must be "
                           "[{\"id\": ..., \"type\": \"function\", \"function\": {\"name\": ..., \"arguments\": ...}}]")
    fn = dict(call["function"])
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args) if args.strip() else {}
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            fn["arguments"] = parsed
    elif args is None:
        fn["arguments"] = {}
    return {**call, "type": "function", "function": fn}


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _repeat(item: str, sep: str, many: bool) -> str:
    return f"start: {item} ({sep} {item})*\n" if many else f"start: {item}\n"


def _arguments_schema(params: dict) -> dict:
    schema = dict(params)
    # a model forced to call must not invent argument names: closed unless the schema says otherwise
    if schema.get("type", "object") == "object" and "properties" in schema:
        schema.setdefault("additionalProperties", False)
    return schema


def _any_call(tools: list[dict], args_key: str) -> dict:
    options = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                 args_key: _arguments_schema(t["function"]["parameters"])},
                "required": ["name", args_key], "additionalProperties": False} for t in tools]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": COMPACT}


def _xml_call(fn: dict) -> str:
    params = fn["parameters"] if isinstance(fn["parameters"], dict) else {}
    props = params.get("properties") or {}
    required = set(params.get("required") or [])
    parts = [f'"{CALL_OPEN}\\n<function={fn["name"]}>\\n"']
    for name, schema in props.items():
        if not isinstance(schema, dict):
            schema = {}
        if schema.get("type") == "string" and "enum" not in schema:
            # text up to the closing tag as ONE lexeme (a separate "\n</parameter>" lexeme after a free-text one
            # is ambiguous for the lexer); the text cannot contain '<'
            item = f'("<parameter={name}>\\n" /[^<]*\\n<\\/parameter>\\n/)'
        else:
            value = f"%json {_dump({**schema, 'x-guidance': COMPACT})}"
            item = f'("<parameter={name}>\\n" {value} "\\n</parameter>\\n")'
        parts.append(item if name in required else item + "?")
    parts.append(f'"</function>\\n{CALL_CLOSE}"')
    return " ".join(parts)


# ---------------------------------------------------------------- parsing output


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
        fmt = plan.format if plan else None
        self.json_whole = fmt in ("llama3", "generic")
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
        if self.json_whole and (head.startswith("{") or head.startswith(PYTHON_TAG)):
            self.mode = "whole"
            return
        if self.json_whole and PYTHON_TAG.startswith(head) and not final:
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
        if self.json_whole and (head.startswith("{") or head.startswith(PYTHON_TAG)):
            self.buf = head
            self.mode = "whole"
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
        if schema.get("type") == "string":
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
