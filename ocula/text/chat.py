"""Chat templates: the GGUF's `tokenizer.chat_template` rendered with Jinja2 the way transformers does.

Messages are OpenAI style. Content may be a string or a list of parts (`text`, `image_url`,
`image`). Templates differ in what they accept, so content is reshaped to suit the template:
- typed templates (they read `['type']`) get lists of HF-style parts (`{"type": "image"}`,
  `{"type": "text", ...}`); plain strings are wrapped unless the template also checks `is string`;
- string-only templates get the text parts joined into one string.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ocula.errors import RequestError

# Used when a GGUF carries no template (and its architecture has no own format): ChatML, as llama.cpp.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma GGUFs (e.g. base models) often carry no template; Gemma's own turn format is the right default.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if loop.first %}{{ prefix }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}{% else %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
FALLBACK_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}
IMAGE_PART_TYPES = ("image", "image_url", "input_image")
VIDEO_PART_TYPES = ("video", "video_url", "input_video")  # taken out before templating (engine/video_prompt.py)
ROLES = ("system", "user", "assistant", "tool", "developer")


class TemplateError(RequestError):
    pass


def _raise_exception(message: str):
    raise TemplateError(f"chat template refused the conversation: {message}")


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False, separators=None):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys, separators=separators)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "", architecture: str = ""):
        self.source = source or FALLBACK_TEMPLATES.get(architecture, CHATML_TEMPLATE)
        self.is_fallback = source is None
        self.bos_token, self.eos_token = bos_token, eos_token
        # template variables every render gets unless the caller sets them (a callable: called at each render)
        self.default_kwargs: dict = {}
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"the chat template does not parse: {e}") from None

    @property
    def typed_content(self) -> bool:
        src = self.source
        return "['type']" in src or '["type"]' in src or ".type" in src or "'type'" in src

    @functools.cached_property
    def accepts_strings(self) -> bool:
        if not self.typed_content or "is string" in self.source:
            return True
        # "['type']" may be a tool call's type (DeepSeek-R1 templates), not a content part's: such a template
        # concatenates string contents, and a list would fail. A probe render tells the two apart.
        needle = "ocula-probe-7f3a"
        try:
            text = self._template.render(messages=[{"role": "user", "content": needle}], add_generation_prompt=True,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception:  # noqa: BLE001 - a template that fails on strings takes lists
            return False
        return needle in text

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        prefill = final_prefill(messages, add_generation_prompt, kwargs.pop("continue_final_message", None))
        if prefill is not None:  # the answer continues the last assistant message: no end of turn after it
            return self.render(messages[:-1], add_generation_prompt=True, **kwargs) + prefill
        msgs = shape_content(normalize_messages(messages), self.typed_content, self.accepts_strings)
        context = {k: v() if callable(v) else v for k, v in self.default_kwargs.items()}
        context.update(bos_token=self.bos_token, eos_token=self.eos_token, add_generation_prompt=add_generation_prompt)
        context.update(kwargs)
        try:
            return self._template.render(messages=msgs, **context)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template failed on these messages: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:  # the template's own operations
            raise TemplateError(f"the chat template failed on these messages ({type(e).__name__}: {e})") from None


def final_prefill(messages: list[dict], add_generation_prompt: bool, continue_final: bool | None) -> str | None:
    """The text the answer continues, when the conversation ends with an assistant message (llama-server's
    assistant prefill; continue_final_message as vLLM / transformers say it), else None."""
    if continue_final and add_generation_prompt:
        raise TemplateError("add_generation_prompt and continue_final_message cannot both be true: continuing the "
                            "last assistant message means no new assistant turn")
    if continue_final is False or (continue_final is None and not add_generation_prompt) or len(messages) < 2:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant" or last.get("tool_calls"):
        if continue_final:
            raise TemplateError("continue_final_message needs a conversation that ends with an assistant message")
        return None
    before = messages[-2]
    if isinstance(before, dict) and before.get("role") == "assistant" and not before.get("tool_calls"):
        raise TemplateError("the conversation ends with two assistant messages: the last one would be continued "
                            "after another answer; merge them or put a user turn between them")
    content = last.get("content")
    if isinstance(content, list):
        texts = [p.get("text") if isinstance(p, dict) else p for p in content]
        if not all(isinstance(t, str) for t in texts):
            return None
        content = "\n\n".join(texts)
    return content if isinstance(content, str) and (content or continue_final) else None


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Validate OpenAI-style messages and put their content in the shape templates expect."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise RequestError(f"messages[{i}] must be an object with a 'role'")
        if m["role"] not in ROLES:
            raise RequestError(f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None:
            if not (m["role"] == "assistant" and (m.get("tool_calls") or m.get("function_call"))):
                raise RequestError(f"messages[{i}] has no 'content' (only an assistant message with 'tool_calls' "
                                   "may leave it out); send \"content\": \"\" for an empty message")
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if isinstance(part, str):
                    part = {"type": "text", "text": part}
                if isinstance(part, dict) and part.get("type") in VIDEO_PART_TYPES:
                    parts.append({"type": "video"})
                    continue
                if not isinstance(part, dict) or part.get("type") not in ("text", *IMAGE_PART_TYPES):
                    raise RequestError(refused_part(part, f"messages[{i}].content[{j}]"))
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise RequestError(f"messages[{i}].content[{j}].text must be a string")
                parts.append({"type": "image"} if is_image_part(part) else {"type": "text", "text": part["text"]})
            content = parts
        elif not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of parts")
        msg = dict(m)
        msg["content"] = content
        out.append(msg)
    return out


def shape_content(messages: list[dict], typed: bool, accepts_strings: bool) -> list[dict]:
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list) and (not typed or (accepts_strings and all(p["type"] == "text" for p in content))):
            content = "".join(p["text"] for p in content if p["type"] == "text")
        elif isinstance(content, str) and not accepts_strings:
            content = [{"type": "text", "text": content}] if content else []
        out.append({**m, "content": content})
    return out


def image_parts(messages: list[dict]) -> list[dict]:
    """Every image part of the conversation, in order."""
    return [p for m in messages if isinstance(m.get("content"), list) for p in m["content"] if is_image_part(p)]


MEDIA_KINDS = {"input_audio": "audio", "audio": "audio", "audio_url": "audio", "video": "video",
               "video_url": "video", "input_video": "video", "file": "file", "input_file": "file",
               "document": "document"}


def refused_part(part: Any, where: str) -> str:
    """Why a content part is refused, naming it: media this model has no encoder for, or an unknown type."""
    if not isinstance(part, dict):
        return f"{where} must be a part object such as {{'type': 'text', 'text': ...}}, not {type(part).__name__}"
    kind = part.get("type")
    if kind in MEDIA_KINDS:
        return (f"{where} is a part of type {kind!r}, but this model cannot take {MEDIA_KINDS[kind]} input (it reads text "
                "and, with a vision projector, images and videos); send text, images or videos only")
    if kind is None:
        return f"{where} has no 'type'; send parts of type 'text', 'image_url', 'image' or 'video_url'"
    return f"{where} has the unknown part type {kind!r}; send parts of type 'text', 'image_url', 'image' or 'video_url'"
