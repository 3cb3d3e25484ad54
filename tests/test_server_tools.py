"""Tool calling and reasoning on /v1/chat/completions, against a real `ocula serve` driven by the official
`openai` client. The model is the `qwen3vl` fixture's text GGUF (real Qwen vocabulary, random weights) rewritten
with Qwen3's own chat template (tool syntax `<tool_call>{json}</tool_call>`, `<think>` reasoning).

Random weights never write a call by themselves, so: forced calls (`required`, named) show the grammar makes
any model's output a valid call; a scripted sampler (in-process app, the model's text given token by token)
shows `auto` parses what a model writes.
"""
import json
from pathlib import Path

import pytest
from tiny import FIXTURES

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("llguidance")
pytest.importorskip("fastapi")

import ocula  # noqa: E402
from ocula.server.testing import ServerProcess  # noqa: E402

SOURCE = FIXTURES / "models" / "qwen3vl" / "qwen3vl-f16.gguf"
QWEN3_TEMPLATE = (Path(__file__).parent / "data" / "templates" / "qwen3.jinja").read_text()
pytestmark = [pytest.mark.skipif(not SOURCE.exists(), reason=f"fixture {SOURCE} not found"),
              pytest.mark.usefixtures("one_torch_thread")]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "metric": {"type": "boolean"}}, "required": ["city", "days", "metric"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def valid_weather(args: dict) -> bool:
    return (set(args) == {"city", "days", "metric"} and args["city"] in ("Paris", "Rome", "Oslo")
            and isinstance(args["days"], int) and 1 <= args["days"] <= 7 and isinstance(args["metric"], bool))


@pytest.fixture(scope="module")
def tools_gguf(tmp_path_factory):
    from gguf import GGUFValueType
    from gguf_edit import rewrite_gguf

    dst = tmp_path_factory.mktemp("tools") / "qwen3-tools.gguf"
    return rewrite_gguf(SOURCE, dst, metadata={"tokenizer.chat_template": (QWEN3_TEMPLATE, GGUFValueType.STRING)})


@pytest.fixture(scope="module")
def server(tools_gguf):
    with ServerProcess(["-m", str(tools_gguf), "--ctx-size", "2048", "--parallel", "2"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def lib(tools_gguf):
    return ocula.load(tools_gguf, n_ctx=2048)


def test_required_call_parses_and_matches_schema(client):
    for seed in (1, 2, 3):
        r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=80, temperature=1.0, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert valid_weather(args)
        else:
            assert call.function.name == "get_time" and args in ({"zone": "UTC"}, {"zone": "CET"})


def test_named_call_is_that_function(client):
    r = client.chat.completions.create(model="m", messages=ASK, tools=[TIME, WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       max_tokens=80, temperature=0.8, seed=5)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and valid_weather(json.loads(call.function.arguments))


def test_parallel_calls_are_each_valid(client):
    r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=200, temperature=1.0, seed=11)
    calls = r.choices[0].message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    for c in calls:
        args = json.loads(c.function.arguments)
        assert valid_weather(args) if c.function.name == "get_weather" else args["zone"] in ("UTC", "CET")


def test_streamed_deltas_assemble_to_the_same_call(client):
    kw = dict(model="m", messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
              max_tokens=80, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    finish = None
    first_chunks = []
    for chunk in client.chat.completions.create(**kw, stream=True):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        assert not d.content
        for tc in d.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                first_chunks.append(tc)
                slot["id"] = tc.id
                assert tc.type == "function" and tc.function.name
            slot["name"] += tc.function.name or "" if tc.function else ""
            slot["arguments"] += tc.function.arguments or "" if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0] and len(first_chunks) == 1
    assert calls[0]["name"] == full.function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(full.function.arguments)


def test_several_choices_each_call(client):
    kw = dict(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
              max_tokens=80, temperature=1.0, seed=9, n=3)
    full = client.chat.completions.create(**kw)
    assert [c.index for c in full.choices] == [0, 1, 2]
    for c in full.choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    streamed: dict[int, dict] = {}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                slot = streamed.setdefault(c.index, {"name": "", "arguments": ""})
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
    assert sorted(streamed) == [0, 1, 2]
    for i, c in enumerate(full.choices):  # the same seeds: the same calls, streamed or not
        call = c.message.tool_calls[0]
        assert streamed[i]["name"] == call.function.name
        assert json.loads(streamed[i]["arguments"]) == json.loads(call.function.arguments)


def test_tool_result_renders_into_the_next_prompt(client, lib):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_7", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "days": 1, "metric": true}'}}]},
        {"role": "tool", "tool_call_id": "call_7", "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    expected = lib.apply_chat_template(
        ASK + [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris", "days": 1, "metric": True}}}]},
               {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}'}], tools=[WEATHER])
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1, "metric": true}}\n'
            '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{"temperature": 21, "sky": "clear"}\n'
            '</tool_response><|im_end|>\n<|im_start|>assistant\n') in expected
    assert '"name": "get_weather"' in expected.split("<|im_start|>user")[0]  # the tool list in the system turn
    r = client.chat.completions.create(model="m", messages=history, tools=[WEATHER], max_tokens=1)
    assert r.usage.prompt_tokens == len(lib.tokenize(expected, add_special=False))
    # llama-server's routes see the same prompt
    server = client.base_url.scheme + "://" + client.base_url.host + ":" + str(client.base_url.port)
    rendered = httpx.post(server + "/apply-template", json={"messages": history, "tools": [WEATHER]}).json()
    assert rendered["prompt"] == expected
    counted = httpx.post(server + "/v1/chat/completions/input_tokens", json={"messages": history, "tools": [WEATHER]})
    assert counted.json()["input_tokens"] == r.usage.prompt_tokens


def test_tool_choice_none_and_template_kwargs(client, lib):
    plain = client.chat.completions.create(model="m", messages=ASK, max_tokens=1).usage.prompt_tokens
    none = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="none",
                                          max_tokens=1).usage.prompt_tokens
    auto = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], max_tokens=1).usage.prompt_tokens
    assert none == plain == len(lib.tokenize(lib.apply_chat_template(ASK), add_special=False))
    assert auto == len(lib.tokenize(lib.apply_chat_template(ASK, tools=[WEATHER]), add_special=False)) > plain
    no_think = client.chat.completions.create(model="m", messages=ASK, max_tokens=1,
                                              extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert no_think.usage.prompt_tokens == len(lib.tokenize(lib.apply_chat_template(ASK, enable_thinking=False),
                                                            add_special=False)) > plain


@pytest.mark.parametrize("body,param,fragment", [
    ({"tools": [{"type": "web_search"}]}, "tools", "'web_search'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": "get_weather"}, "tools", "tools"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs", "tools"),
    ({"reasoning_format": "loud"}, "reasoning_format", "reasoning_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}], "tool_choice": "required"},
     "tools", "the tool schema is not usable"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": []}}}]},
     "tools", "'properties' must be an object"),
    ({"messages": [{"role": "assistant", "tool_calls": [7]}]}, "messages", "tool_calls"),
])
def test_bad_tool_requests_are_400(server, body, param, fragment):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 1, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


# ---------------------------------------------------------------- a scripted model (in-process app)


class Script:
    """Stands in for the Sampler: returns the scripted tokens in order, then end of turn."""

    tokens: list[int] = []

    def __init__(self, params):
        self.i = 0

    def __call__(self, logits, history):
        t = Script.tokens[self.i] if self.i < len(Script.tokens) else Script.eot
        self.i += 1
        return t


@pytest.fixture(scope="module")
def scripted(lib):
    from fastapi.testclient import TestClient

    import ocula.engine.scheduler as sched_mod
    from ocula.server.app import create_app

    Script.eot = min(lib.tokenizer.eot_ids)
    mp = pytest.MonkeyPatch()
    mp.setattr(sched_mod, "Sampler", Script)
    with TestClient(create_app(lib)) as tc:
        def say(text, **body):
            Script.tokens = lib.tokenize(text, add_special=False)
            return tc.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 200, **body})
        yield say
    mp.undo()


def sse_events(resp) -> list[dict]:
    return [json.loads(line[6:]) for line in resp.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


CALL_TEXT = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2, '
             '"metric": false}}\n</tool_call>')


def test_auto_parses_a_model_written_call(scripted):
    r = scripted(CALL_TEXT, tools=[WEATHER, TIME])
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "I will check."
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Rome", "days": 2, "metric": False}
    # the same text without tools is only text
    plain = scripted(CALL_TEXT).json()["choices"][0]
    assert plain["message"]["content"] == CALL_TEXT and "tool_calls" not in plain["message"]
    # with tool_choice none the same text is text (and no grammar holds the model to calls)
    other = scripted(CALL_TEXT, tools=[WEATHER], tool_choice="none").json()["choices"][0]
    assert other["finish_reason"] == "stop" and other["message"]["content"] == CALL_TEXT


def test_auto_stream_matches_full(scripted):
    events = sse_events(scripted(CALL_TEXT, tools=[WEATHER], stream=True))
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    pieces = [tc for e in events if e["choices"] for tc in e["choices"][0]["delta"].get("tool_calls") or []]
    assert content == "I will check."
    assert pieces[0]["id"].startswith("call_") and pieces[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(p["function"].get("arguments", "") for p in pieces)) == \
        {"city": "Rome", "days": 2, "metric": False}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_reasoning_content_split(scripted):
    text = "<think>\nParis is in France.\n</think>\n\nIt is sunny."
    msg = scripted(text).json()["choices"][0]["message"]
    assert msg["reasoning_content"] == "\nParis is in France.\n" and msg["content"] == "It is sunny."
    events = sse_events(scripted(text, stream=True))
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "\nParis is in France.\n"
    assert "".join(d.get("content") or "" for d in deltas) == "It is sunny."
    raw = scripted(text, reasoning_format="none").json()["choices"][0]["message"]
    assert raw["content"] == text and "reasoning_content" not in raw


def test_library_chat_with_tools(lib):
    r = lib.chat(ASK, tools=[TIME, WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 max_tokens=80, temperature=0)
    (call,) = r.parsed.tool_calls
    assert call.name == "get_weather" and valid_weather(json.loads(call.arguments))
    assert r.parsed.content == ""
    plain = lib.chat(ASK, max_tokens=5, temperature=0)
    assert plain.parsed.content == plain.text and plain.parsed.tool_calls == []
    with pytest.raises(ocula.errors.RequestError, match="not among the tools"):
        lib.chat(ASK, tools=[TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    with pytest.raises(ocula.errors.UnsupportedError, match="stream"):
        lib.chat(ASK, tools=[TIME], stream=True)
