"""Tool-call formats without a model: format detection from templates, parsing each format's calls out of
text (whole and streamed character by character give the same events), reasoning split, history reshaping,
and the forced-call grammars (valid llguidance lark, and they accept the format's own call text)."""
import json
from pathlib import Path

import pytest

from ocula.engine.tool_calls import ToolCall, ToolPlan, check_tool_choice, check_tools, detect_format
from ocula.engine.tool_parse import OutputParser
from ocula.errors import RequestError

llguidance = pytest.importorskip("llguidance")

QWEN3 = (Path(__file__).parent / "data" / "templates" / "qwen3.jinja").read_text()
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}


def plan(fmt, choice="auto", parallel=True):
    p = ToolPlan.create([WEATHER, SEARCH], choice, None, parallel)
    p.format = fmt
    return p


def run(parser_factory, text):
    """Events of the whole text at once, and of the text fed one character at a time, merged by kind."""
    whole = parser_factory()
    a = whole.feed(text) + whole.finish()
    stream = parser_factory()
    b = []
    for ch in text:
        b += stream.feed(ch)
    b += stream.finish()
    return merge(a), merge(b)


def merge(events):
    """Events as (kind, text) runs and ("call", name, arguments); a streamed call's argument pieces must add
    up to its final arguments."""
    out = []
    pieces = None
    for e in events:
        if not isinstance(e, ToolCall) and e[0] == "call_begin":
            pieces = []
        elif not isinstance(e, ToolCall) and e[0] == "call_args":
            pieces.append(e[1])
        elif isinstance(e, ToolCall) or e[0] == "call_end":
            call = e if isinstance(e, ToolCall) else e[1]
            if not isinstance(e, ToolCall):
                assert "".join(pieces) == call.arguments
            out.append(("call", call.name, json.loads(call.arguments)))
        elif out and out[-1][0] == e[0]:
            out[-1] = (e[0], out[-1][1] + e[1])
        else:
            out.append(e)
    return out


def test_detect_format_from_template_syntax():
    assert detect_format(QWEN3) == "hermes"
    assert detect_format("{{ '<tool_call>\\n<function=' + name + '>\\n<parameter=' }}") == "qwen3_xml"
    assert detect_format("{{ '[AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_format("{% if tools %}<|start_header_id|>ipython{% endif %}") == "llama3"
    assert detect_format("{{ messages[0]['content'] }}") == "generic"
    assert detect_format(None) == "generic"


@pytest.mark.parametrize("fmt,text,expected", [
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     [("content", "Let me look."), ("call", "get_weather", {"city": "Paris"})]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>\n'
               '<tool_call>\n{"name": "search", "arguments": {"q": "fjords"}}\n</tool_call>',
     [("call", "get_weather", {"city": "Oslo", "days": 2}), ("call", "search", {"q": "fjords"})]),
    ("qwen3_xml", "<tool_call>\n<function=get_weather>\n<parameter=city>\n42 Street\n</parameter>\n<parameter=days>\n3\n"
                  "</parameter>\n</function>\n</tool_call>",
     [("call", "get_weather", {"city": "42 Street", "days": 3})]),
    ("llama3", '{"name": "search", "parameters": {"q": "llamas"}}', [("call", "search", {"q": "llamas"})]),
    ("llama3", '<|python_tag|>{"name": "search", "parameters": {"q": "x"}}', [("call", "search", {"q": "x"})]),
    ("mistral", '[TOOL_CALLS][{"name": "search", "arguments": {"q": "wind"}}]', [("call", "search", {"q": "wind"})]),
    ("mistral", '[TOOL_CALLS]search[ARGS]{"q": "sea"}', [("call", "search", {"q": "sea"})]),
    # [TOOL_CALLS] is a control token that the decoder drops: the call list alone
    ("mistral", '[{"name": "search", "arguments": {"q": "gale"}}]', [("call", "search", {"q": "gale"})]),
    ("mistral", "[1] is a footnote", [("content", "[1] is a footnote")]),
    ("generic", '{"tool_calls": [{"name": "search", "arguments": {"q": "owls"}}]}', [("call", "search", {"q": "owls"})]),
    ("generic", '{"response": "Hello!"}', [("content", "Hello!")]),
    # not a call: an unknown function name, broken JSON, plain JSON in a JSON-answer format
    ("hermes", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
     [("content", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>')]),
    ("hermes", '<tool_call>\n{"name": "search", "argu', [("content", '<tool_call>\n{"name": "search", "argu')]),
    ("llama3", '{"answer": 42}', [("content", '{"answer": 42}')]),
    ("hermes", "Just text with a < sign and <tool", [("content", "Just text with a < sign and <tool")]),
    # markers that are control tokens (dropped by the decoder): the call object alone
    ("hermes", '\n{"name": "search", "arguments": {"q": "bare"}}\n', [("call", "search", {"q": "bare"})]),
    ("hermes", '{"name": "Ada", "age": 36}', [("content", '{"name": "Ada", "age": 36}')]),
])
def test_parse_each_format_whole_and_streamed(fmt, text, expected):
    whole, streamed = run(lambda: plan(fmt).parser(), text)
    assert whole == expected
    assert streamed == expected


def test_reasoning_is_split_from_content_and_calls():
    text = '<think>\nThe user wants weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": ' \
           '{"city": "Rome"}}\n</tool_call>'
    whole, streamed = run(lambda: plan("hermes").parser(), text)
    assert whole == streamed == [("reasoning", "\nThe user wants weather.\n"), ("call", "get_weather", {"city": "Rome"})]
    # a prompt that opened <think> itself: the output starts inside the reasoning
    whole, streamed = run(lambda: OutputParser(None, True, True), "hmm</think>\n\nHi there")
    assert whole == streamed == [("reasoning", "hmm"), ("content", "Hi there")]
    # reasoning_format none: left in the content
    whole, _ = run(lambda: OutputParser(None, False), "<think>x</think>y")
    assert whole == [("content", "<think>x</think>y")]
    # plain text keeps its whitespace exactly
    whole, streamed = run(lambda: OutputParser(None, True), "  two  spaces \n")
    assert whole == streamed == [("content", "  two  spaces \n")]


def test_tool_and_choice_validation():
    assert check_tool_choice(None, []) == ("none", None)
    assert check_tool_choice(None, check_tools([WEATHER])) == ("auto", None)
    assert check_tool_choice({"type": "function", "function": {"name": "search"}}, check_tools([SEARCH])) == \
        ("required", "search")
    with pytest.raises(RequestError, match="not among the tools"):
        check_tool_choice({"type": "function", "function": {"name": "nope"}}, check_tools([SEARCH]))
    with pytest.raises(RequestError, match="needs tools"):
        check_tool_choice("required", [])
    with pytest.raises(RequestError, match="tool_choice must be"):
        check_tool_choice("sometimes", [])
    with pytest.raises(RequestError, match=r"tools\[0\].*'web_search'"):
        check_tools([{"type": "web_search"}])
    with pytest.raises(RequestError, match="used by two tools"):
        check_tools([SEARCH, SEARCH])
    with pytest.raises(RequestError, match="'properties' must be an object"):
        check_tools([{"type": "function", "function": {"name": "f", "parameters": {"properties": ["a"]}}}])
    with pytest.raises(RequestError, match=r"tools\[0\].function.name"):
        check_tools([{"type": "function", "function": {"name": "has space"}}])


def test_history_reshaped_for_templates():
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    hermes = plan("hermes").history(msgs)
    assert hermes[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Rome"}'  # the caller's copy is untouched
    generic = plan("generic").history(msgs)
    assert generic[0]["role"] == "system" and "get_weather" in generic[0]["content"]
    assert json.loads(generic[2]["content"]) == {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]}
    assert generic[3]["role"] == "user" and json.loads(generic[3]["content"])["tool_response"]["content"] == '{"temp": 21}'
    with pytest.raises(RequestError, match="tool_calls must be"):
        plan("hermes").history([{"role": "assistant", "tool_calls": ["get_weather"]}])


@pytest.fixture(scope="module")
def structured(tiny_llama):
    import ocula
    from ocula.engine.structured import structured_for

    model = ocula.load(tiny_llama)
    return model, structured_for(model)


FORCED_TEXT = {  # JSON spaced as the templates' tojson writes it
    "hermes": '<tool_call>\n{"name": "search", "arguments": {"q": "owls"}}\n</tool_call>',
    "qwen3_xml": "<tool_call>\n<function=search>\n<parameter=q>\nowls\n</parameter>\n</function>\n</tool_call>",
    "llama3": '{"name": "search", "parameters": {"q": "owls"}}',
    "mistral": '[TOOL_CALLS][{"name": "search", "arguments": {"q": "owls"}}]',
    "generic": '{"tool_calls": [{"name": "search", "arguments": {"q": "owls"}}]}',
}


@pytest.mark.parametrize("fmt", sorted(FORCED_TEXT))
@pytest.mark.parametrize("named", [False, True])
def test_forced_call_grammar_admits_the_formats_call_and_nothing_else(structured, fmt, named):
    model, so = structured
    choice = {"type": "function", "function": {"name": "search"}} if named else "required"
    p = plan(fmt, choice, parallel=False)
    text = FORCED_TEXT[fmt]
    c = so.for_lark(p.grammar())
    for t in model.tokenizer.encode_exact(text):
        c.accept(t)
    assert c.accepting
    parser = p.parser()
    events = parser.feed(text) + parser.finish()
    assert merge(events) == [("call", "search", {"q": "owls"})]
    # a call of an unknown tool, or arguments outside the schema, are refused token by token
    bad = so.for_lark(p.grammar())
    with pytest.raises(Exception, match="constrained decoding failed"):
        for t in model.tokenizer.encode_exact(text.replace('"q"', '"x"').replace("=q>", "=x>")):
            bad.accept(t)
    if named:
        assert "get_weather" not in p.grammar()
    assert plan(fmt, "none").grammar() is None
    assert (plan(fmt, "auto").grammar() is None) == (fmt not in ("hermes", "qwen3_xml"))
    compact = so.for_lark(p.grammar())  # JSON without the spaces the templates write is not what was taught
    if fmt != "qwen3_xml":
        with pytest.raises(Exception, match="constrained decoding failed"):
            for t in model.tokenizer.encode_exact(text.replace(": ", ":")):
                compact.accept(t)


def feed(so, model, grammar, text):
    c = so.for_lark(grammar)
    for t in model.tokenizer.encode_exact(text):
        c.accept(t)
    return c


@pytest.mark.parametrize("fmt", ["hermes", "qwen3_xml"])
def test_auto_grammar_is_free_text_until_a_call_opens(structured, fmt):
    model, so = structured
    for parallel in (True, False):
        g = plan(fmt, "auto", parallel).grammar()
        assert feed(so, model, g, "Just an answer, with <tags> and <tool talk.").accepting
        c = feed(so, model, g, "Let me look.\n" + FORCED_TEXT[fmt])
        assert c.accepting and c.finished != parallel
        with pytest.raises(Exception, match="constrained decoding failed"):  # an unknown tool, once opened
            feed(so, model, g, "Hm.\n" + FORCED_TEXT[fmt].replace("search", "rm_rf"))


def test_forced_call_after_an_open_think(structured):
    """A template whose prompt opens <think> (thinking models): the forced answer closes it, then calls."""
    model, so = structured
    p = plan("hermes", "required", parallel=False)
    text = "</think>\n\n" + FORCED_TEXT["hermes"]
    c = so.for_lark(p.grammar(close_think=True))
    for t in model.tokenizer.encode_exact(text):
        c.accept(t)
    assert c.accepting
    whole, streamed = run(lambda: p.parser(True, in_reasoning=True), text)
    assert whole == streamed == [("call", "search", {"q": "owls"})]
    with pytest.raises(Exception, match="constrained decoding failed"):
        c2 = so.for_lark(p.grammar(close_think=True))
        for t in model.tokenizer.encode_exact(FORCED_TEXT["hermes"]):
            c2.accept(t)


def test_hermes_arguments_stream_as_they_arrive():
    p = plan("hermes")
    parser = p.parser()
    text = 'Sure.\n<tool_call>\n{"name": "search", "arguments": {"q": "deep {nested} text", "n": {"a": 1}}}\n</tool_call>'
    head = text.index('{"q"')
    events = parser.feed(text[: head + 12])  # the name is known, the arguments have begun
    assert ("content", "Sure.") in events
    begin = [e for e in events if not isinstance(e, ToolCall) and e[0] == "call_begin"]
    assert len(begin) == 1 and begin[0][1].name == "search"
    sent = "".join(e[1] for e in events if not isinstance(e, ToolCall) and e[0] == "call_args")
    assert sent and '{"q": "deep {nested'.startswith(sent)
    rest = parser.feed(text[head + 12:]) + parser.finish()
    sent += "".join(e[1] for e in rest if not isinstance(e, ToolCall) and e[0] == "call_args")
    (end,) = [e for e in rest if not isinstance(e, ToolCall) and e[0] == "call_end"]
    assert sent == end[1].arguments == '{"q": "deep {nested} text", "n": {"a": 1}}'
    assert end[1].id == begin[0][1].id


def test_a_marker_that_is_a_control_token_is_forced_as_that_token():
    class Vocab:
        def token_id(self, text):
            return 5 if text == "[TOOL_CALLS]" else None

        def is_special(self, tid):
            return tid == 5

    assert plan("hermes", "auto").grammar(tokenizer=Vocab()) is not None

    class ThinkIsControl(Vocab):
        def token_id(self, text):
            return 6 if text == "</think>" else None

        def is_special(self, tid):
            return tid == 6

    assert plan("hermes", "auto").grammar(tokenizer=ThinkIsControl()) is None  # the model could not end its thinking

    class CallIsControl(Vocab):
        def token_id(self, text):
            return {"<tool_call>": 7, "</tool_call>": 8}.get(text)

        def is_special(self, tid):
            return tid in (7, 8)

    forced = plan("hermes", "required").grammar(tokenizer=CallIsControl())
    assert "<[7]> body" in forced and '"\\n" <[8]>' in forced
    assert llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", forced)) == ""
    assert "<[8]>" in plan("qwen3_xml", "required").grammar(tokenizer=CallIsControl())
    assert plan("hermes", "auto").grammar(tokenizer=CallIsControl()) is None
    assert plan("hermes", "required").grammar(tokenizer=ThinkIsControl()) is not None
    g = plan("mistral", "required").grammar(tokenizer=Vocab())
    assert g.startswith("start: <[5]> %json")
    assert llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", g)) == ""
    assert plan("mistral", "required").grammar().startswith('start: "[TOOL_CALLS]" %json')
