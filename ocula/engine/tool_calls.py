"""Tool calling: which call syntax a chat template teaches, the tools and calls in the history as templates want
them, and the grammar that forces a call. The parser that splits a model's output into reasoning, text and
tool calls (incrementally, for streaming) is ocula.engine.tool_parse.

    plan = ToolPlan.create(tools, tool_choice, template_source)    # OpenAI-style tools / tool_choice
    kwargs = plan.template_kwargs()                                # tools=... for the chat template
    messages = plan.history(messages)                              # tool_calls / role "tool" as templates want
    grammar = plan.grammar()                                       # lark text for llguidance, or None
    parser = plan.parser(reasoning=True, in_reasoning=False)
    for piece in text_pieces: events = parser.feed(piece)          # see ocula.engine.tool_parse.Event
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
from typing import Any

from ocula.errors import RequestError

FORMATS = ("hermes", "qwen3_xml", "llama3", "mistral", "generic")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_OPEN = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"
NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_TOOLS = 128
# JSON in forced calls is spaced as json.dumps (and the templates' tojson) writes it, `{"a": 1, "b": 2}`, and
# has no other whitespace: what models are trained on, and a weak model cannot wander off into endless blanks
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
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
        if not isinstance(params.get("properties", {}), dict) or not isinstance(params.get("required", []), list):
            raise RequestError(f"tools[{i}].function.parameters: 'properties' must be an object and 'required' a "
                               "list of names")
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

    def grammar(self, close_think: bool = False, tokenizer=None) -> str | None:
        """llguidance lark grammar for the answer: with tool_choice required or named, only calls of the offered
        tools; with auto (Hermes and XML formats), any text, but once the model opens `<tool_call>` the rest
        must be a valid call. close_think: the prompt left a `<think>` open, so a forced answer first closes it
        (no thinking). tokenizer: to write a marker that is one control token as that token (`<[id]>`)."""
        if not self.active or (self.mode == "auto" and self.format not in ("hermes", "qwen3_xml")):
            return None
        if self.mode == "auto" and any(_marker(m, tokenizer).startswith("<[") for m in (THINK_OPEN, THINK_CLOSE,
                                                                                          CALL_OPEN)):
            return None  # free text cannot hold control tokens: with think or call markers that are ones, the
            # model could not end its reasoning or open a call
        tools = self.offered
        many = self.parallel and not self.forced
        closing = f'{_marker(THINK_CLOSE, tokenizer)} "\\n\\n" '
        start = "start: " + closing if close_think and self.mode == "required" else "start: "
        if self.format in ("hermes", "qwen3_xml"):
            if self.format == "hermes":
                close = _marker(CALL_CLOSE, tokenizer)
                rules = [f'body: "\\n" %json {_dump(_any_call(tools, "arguments"))} "\\n" {close}']
            else:
                rules = [f"body_{i}: {_xml_call(t['function'], tokenizer)}" for i, t in enumerate(tools)]
                rules.append("body: " + " | ".join(f"body_{i}" for i in range(len(tools))))
            call = f"{_marker(CALL_OPEN, tokenizer)} body"
            if self.mode == "auto":
                # free text without `<tool_call>`, or text up to the first `<tool_call>` (a lazy lexeme ends
                # there) and then calls: the model decides whether to call, the grammar how
                more = f' ("\\n" {call})*' if many else ""
                rules += ["FREE: /(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/", "opened[lazy]: /(?s:.*)<tool_call>/"]
                return f"start: FREE | opened body{more}\n" + "\n".join(rules) + "\n"
            return start + _repeat(call, '"\\n"', many) + "\n".join(rules) + "\n"
        if self.format == "llama3":
            return f"{start}%json {_dump(_any_call(tools, 'parameters'))}\n"
        if self.format == "mistral":
            arr = {"type": "array", "items": _any_call(tools, "arguments"), "minItems": 1,
                   "x-guidance": COMPACT}
            if not many:
                arr["maxItems"] = 1
            return f'{start}{_marker(MISTRAL_OPEN, tokenizer)} %json {_dump(arr)}\n'
        arr = {"type": "array", "items": _any_call(tools, "arguments"), "minItems": 1}
        if not many:
            arr["maxItems"] = 1
        body = {"type": "object", "properties": {"tool_calls": arr}, "required": ["tool_calls"],
                "additionalProperties": False, "x-guidance": COMPACT}
        return f"{start}%json {_dump(body)}\n"

    def parser(self, reasoning: bool = True, in_reasoning: bool = False):
        """An ocula.engine.tool_parse.OutputParser for this request's answer."""
        from ocula.engine.tool_parse import OutputParser

        return OutputParser(self if self.active else None, reasoning, in_reasoning)


def _marker(text: str, tokenizer) -> str:
    """A grammar literal for a format's marker: its control token when the vocabulary has one (the model was
    trained to write that token, which llguidance never produces from a quoted string), else the text."""
    tid = tokenizer.token_id(text) if tokenizer is not None else None
    if tid is not None and tokenizer.is_special(tid):
        return f"<[{tid}]>"
    return json.dumps(text)


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
    return f"{item} ({sep} {item})*\n" if many else f"{item}\n"


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


def _lit(text: str) -> str:
    """A lark string literal for any text (quotes, backslashes, newlines escaped)."""
    return json.dumps(text, ensure_ascii=False)


def is_text_param(schema: dict) -> bool:
    """An XML-format parameter whose value is written as bare text: a string, or an enum of strings."""
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return all(isinstance(v, str) for v in enum)
    return schema.get("type") == "string"


def _xml_call(fn: dict, tokenizer=None) -> str:
    """A Qwen3-Coder / Qwen3.5 call after its `<tool_call>`: `<function=NAME>`, one `<parameter=P>` per property
    (required ones mandatory, in schema order), `</function>`, `</tool_call>`."""
    params = fn["parameters"] if isinstance(fn["parameters"], dict) else {}
    props = params.get("properties") or {}
    required = set(params.get("required") or [])
    parts = [f'"\\n<function={fn["name"]}>\\n"']  # what follows `<tool_call>`
    for name, schema in props.items():
        if not isinstance(schema, dict):
            schema = {}
        enum = schema.get("enum")
        tag = _lit(f"<parameter={name}>\n")
        if is_text_param(schema) and isinstance(enum, list) and enum:
            # templates write string values bare (`args_value | string`), not as JSON
            item = f'({tag} ({" | ".join(_lit(v) for v in enum)}) "\\n</parameter>\\n")'
        elif is_text_param(schema):
            # text up to the closing tag as ONE lexeme (a separate "\n</parameter>" lexeme after a free-text one
            # is ambiguous for the lexer); the text cannot contain '<'
            item = f'({tag} /[^<]*\\n<\\/parameter>\\n/)'
        else:
            value = f"%json {_dump({**schema, 'x-guidance': COMPACT})}"
            item = f'({tag} {value} "\\n</parameter>\\n")'
        parts.append(item if name in required else item + "?")
    parts.append(f'"</function>\\n" {_marker(CALL_CLOSE, tokenizer)}')
    return " ".join(parts)
