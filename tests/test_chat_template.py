import pytest

from ocula.text.chat import ChatTemplate, TemplateError, image_parts, normalize_messages
from ocula.errors import RequestError

QWEN_STYLE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TYPED_ONLY = "{% for m in messages %}{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}|{% endfor %}{% endfor %}"
STRING_ONLY = "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}"


def test_string_and_parts():
    t = ChatTemplate(QWEN_STYLE)
    assert t.render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    parts = [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "what?"}]
    assert "<IMG>what?" in t.render([{"role": "user", "content": parts}])
    assert t.render([{"role": "user", "content": "hi"}], add_generation_prompt=False).endswith("<|im_end|>\n")


def test_string_content_wrapped_for_typed_only_templates():
    t = ChatTemplate(TYPED_ONLY)
    assert t.render([{"role": "user", "content": "hello"}]) == "hello|"


def test_text_parts_joined_for_string_templates():
    t = ChatTemplate(STRING_ONLY, bos_token="<s>")
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert t.render(msgs) == "<s>user: ab "


def test_fallback_is_chatml():
    t = ChatTemplate(None)
    assert t.is_fallback
    assert t.render([{"role": "user", "content": "x"}]).startswith("<|im_start|>user\nx<|im_end|>")


def test_raise_exception_and_syntax_error():
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        t.render([{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError, match="does not parse"):
        ChatTemplate("{% for %}")


def test_tojson_and_strftime():
    t = ChatTemplate("{{ {'a': 'é'} | tojson }} {{ strftime_now('%Y') | length }}")
    assert t.render([{"role": "user", "content": "x"}]) == '{"a": "é"} 4'


@pytest.mark.parametrize("messages, msg", [
    ([], "non-empty list"),
    ([{"content": "x"}], "role"),
    ([{"role": "wizard", "content": "x"}], "wizard"),
    ([{"role": "user", "content": 5}], "string or a list"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "part of type"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "text must be a string"),
])
def test_bad_messages(messages, msg):
    with pytest.raises(RequestError, match=msg):
        normalize_messages(messages)


def test_image_parts_in_order():
    msgs = [
        {"role": "user", "content": [{"type": "image", "image": "a"}, {"type": "text", "text": "x"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "b"}}]},
    ]
    assert [p.get("image") or p["image_url"]["url"] for p in image_parts(msgs)] == ["a", "b"]
