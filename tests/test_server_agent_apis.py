"""`POST /v1/responses` through the official `openai` SDK and `POST /v1/messages` (+ count_tokens) through the
official `anthropic` SDK, against a real `ocula serve`: text, an image, a tool round trip (forced call, then
its result sent back), streaming, and errors in each API's own shape.

Two servers on the `qwen3vl` fixture: its text GGUF rewritten with Qwen3's tool-capable template (tools), and
the original GGUF with its mmproj (images; its template renders image parts).
"""
import base64
import json
from pathlib import Path

import pytest
from tiny import FIXTURES

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
httpx = pytest.importorskip("httpx")
pytest.importorskip("llguidance")

from ocula.server.testing import ServerProcess  # noqa: E402

MODEL = FIXTURES / "models" / "qwen3vl" / "qwen3vl-f16.gguf"
MMPROJ = FIXTURES / "models" / "qwen3vl" / "mmproj-qwen3vl-f16.gguf"
IMAGE = FIXTURES / "images" / "camera_gray_128.png"
QWEN3_TEMPLATE = (Path(__file__).parent / "data" / "templates" / "qwen3.jinja").read_text()
KEY = "sk-agents"
GREEDY = {"temperature": 0}  # this anthropic SDK version takes no temperature argument: sent as an extra field
pytestmark = [pytest.mark.skipif(not (MODEL.exists() and MMPROJ.exists()), reason="qwen3vl fixture not found"),
              pytest.mark.usefixtures("one_torch_thread")]

CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                         "hours": {"type": "integer", "minimum": 1, "maximum": 48}},
        "required": ["city", "hours"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory):
    from gguf import GGUFValueType
    from gguf_edit import rewrite_gguf

    path = rewrite_gguf(MODEL, tmp_path_factory.mktemp("agents") / "qwen3-tools.gguf",
                        metadata={"tokenizer.chat_template": (QWEN3_TEMPLATE, GGUFValueType.STRING)})
    with ServerProcess(["-m", str(path), "--ctx-size", "2048", "--api-key", KEY]) as s:
        yield s


@pytest.fixture(scope="module")
def vision_server():
    with ServerProcess(["-m", str(MODEL), "--mmproj", str(MMPROJ), "--ctx-size", "2048", "--api-key", KEY,
                        "--allow-private-media"]) as s:
        yield s


@pytest.fixture(scope="module")
def oai(tools_server):
    return openai.OpenAI(base_url=tools_server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(tools_server):
    return anthropic.Anthropic(base_url=tools_server.url, api_key=KEY, max_retries=0, timeout=120)


def data_uri() -> str:
    return "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()


def chat_prompt_tokens(server, messages) -> int:
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


# ---------------------------------------------------------------- Responses


def test_responses_text_matches_chat(oai, tools_server):
    r = oai.responses.create(model="m", instructions="Be brief.", input="Name a river.", max_output_tokens=6,
                             temperature=0)
    chat = oai.chat.completions.create(model="m", max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}])
    assert r.object == "response" and r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == 6


def test_responses_json_schema_format(oai):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = oai.responses.create(model="m", input="Answer in JSON.", max_output_tokens=30,
                             text={"format": {"type": "json_schema", "name": "answer", "schema": schema}})
    assert set(json.loads(r.output_text)) == {"ok"}


def test_responses_tool_round_trip(oai, tools_server):
    tools = [{"type": "function", "name": "forecast", "description": "Weather forecast", "parameters": CITY}]
    r = oai.responses.create(model="m", input="Weather in Rome?", tools=tools, tool_choice="required",
                             parallel_tool_calls=False, max_output_tokens=60, temperature=0.7, extra_body={"seed": 4})
    (call,) = [o for o in r.output if o.type == "function_call"]
    args = json.loads(call.arguments)
    assert call.name == "forecast" and args["city"] in ("Paris", "Rome") and 1 <= args["hours"] <= 48
    follow = [{"role": "user", "content": "Weather in Rome?"},
              {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
              {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "clear"}'}]
    r2 = oai.responses.create(model="m", input=follow, tools=tools, max_output_tokens=1)
    expected = chat_prompt_tokens(tools_server, [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"sky": "clear"}'}])
    # the chat path given the same history (without tools) is shorter by exactly the tool list
    assert r2.usage.input_tokens > expected
    named = oai.responses.create(model="m", input="x", tools=tools, tool_choice={"type": "function", "name": "forecast"},
                                 max_output_tokens=60)
    assert [o.name for o in named.output if o.type == "function_call"] == ["forecast"]


def test_responses_streaming_event_sequence(oai):
    tools = [{"type": "function", "name": "forecast", "parameters": CITY}]
    events = list(oai.responses.create(model="m", input="Rome?", tools=tools, tool_choice="required",
                                       parallel_tool_calls=False, max_output_tokens=60, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     *["response.function_call_arguments.delta"] * (len(kinds) - 6),
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    full = oai.responses.create(model="m", input="Rome?", tools=tools, tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=60, temperature=0)
    assert json.loads(final.output[0].arguments) == json.loads(full.output[0].arguments)
    with oai.responses.stream(model="m", input="Hi", max_output_tokens=5, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        text = stream.get_final_response().output_text
    assert "".join(deltas) == text and text == oai.responses.create(model="m", input="Hi", max_output_tokens=5,
                                                                     temperature=0).output_text


def test_responses_image(vision_server):
    client = openai.OpenAI(base_url=vision_server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    content = [{"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": data_uri()}]
    r = client.responses.create(model="m", input=[{"role": "user", "content": content}], max_output_tokens=1)
    with_image = chat_prompt_tokens(vision_server, [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": data_uri()}}]}])
    text_only = chat_prompt_tokens(vision_server, [{"role": "user", "content": "What is this?"}])
    assert r.usage.input_tokens == with_image > text_only + 4


@pytest.mark.parametrize("body,fragment", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": []}, "input must be"),
    ({"input": [{"type": "computer_call"}]}, "'computer_call'"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "only function tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "'input_file'"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "cannot take audio"),
    ({"input": "x", "temperature": -1}, "temperature"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "needs a JSON schema"),
])
def test_responses_errors(oai, body, fragment):
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model="m", **body)
    assert fragment in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=oai.base_url, api_key="wrong", max_retries=0).responses.create(model="m", input="x")


def test_responses_stream_is_a_strict_boolean(tools_server):
    for stream in ("yes", 1):
        r = httpx.post(tools_server.url + "/v1/responses", json={"model": "m", "input": "x", "stream": stream},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream", r.text


# ---------------------------------------------------------------- Anthropic Messages


def test_messages_text_matches_chat(claude, oai):
    m = claude.messages.create(model="m", max_tokens=6, extra_body=GREEDY, system="Be brief.",
                               messages=[{"role": "user", "content": "Name a river."}])
    chat = oai.chat.completions.create(model="m", max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}])
    assert m.type == "message" and m.role == "assistant" and m.stop_reason == "max_tokens"
    assert m.content[0].type == "text" and m.content[0].text == chat.choices[0].message.content
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert m.usage.output_tokens == 6
    count = claude.messages.count_tokens(model="m", system="Be brief.",
                                         messages=[{"role": "user", "content": "Name a river."}])
    assert count.input_tokens == chat.usage.prompt_tokens


def test_messages_tool_round_trip_and_stream(claude, tools_server):
    tools = [{"name": "forecast", "description": "Weather forecast", "input_schema": CITY}]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    m = claude.messages.create(model="m", max_tokens=60, tools=tools, tool_choice={"type": "any"}, messages=ask,
                               extra_body=GREEDY)
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "forecast" and use.input["city"] in ("Paris", "Rome") and use.id.startswith("toolu_")
    with claude.messages.stream(model="m", max_tokens=60, tools=tools, messages=ask, extra_body=GREEDY,
                                tool_choice={"type": "tool", "name": "forecast"}) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_start" in kinds
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == m.usage.input_tokens + \
        m.usage.cache_read_input_tokens
    assert [b.input for b in final.content if b.type == "tool_use"] == [use.input]
    follow = ask + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                  "content": [{"type": "text", "text": "sunny, 24 C"}]}]}]
    count = claude.messages.count_tokens(model="m", tools=tools, messages=follow).input_tokens
    r = claude.messages.create(model="m", max_tokens=1, tools=tools, messages=follow)
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == count
    # the history rendered by the template: the call and its result are in the prompt
    plain = chat_prompt_tokens(tools_server, [
        ask[0], {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "forecast", "arguments": json.dumps(use.input)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"}])
    assert count > plain > chat_prompt_tokens(tools_server, ask) + 10


def test_messages_text_stream_equals_message(claude):
    kw = dict(model="m", max_tokens=6, extra_body=GREEDY, messages=[{"role": "user", "content": "Hi"}])
    with claude.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == claude.messages.create(**kw).content[0].text
    assert final.stop_reason == "max_tokens"


def test_messages_image_base64_and_url(vision_server):
    client = anthropic.Anthropic(base_url=vision_server.url, api_key=KEY, max_retries=0, timeout=120)
    b64 = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                       "data": base64.b64encode(IMAGE.read_bytes()).decode()}}
    expected = chat_prompt_tokens(vision_server, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri()}}, {"type": "text", "text": "What is it?"}]}])
    m = client.messages.create(model="m", max_tokens=1, messages=[
        {"role": "user", "content": [b64, {"type": "text", "text": "What is it?"}]}])
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == expected
    url = {"type": "image", "source": {"type": "url", "url": IMAGE.as_uri()}}
    with pytest.raises(anthropic.BadRequestError) as e:  # local files are refused without --allowed-media-path
        client.messages.create(model="m", max_tokens=1, messages=[{"role": "user", "content": [url]}])
    assert "image" in e.value.body["error"]["message"]


@pytest.mark.parametrize("body,fragment", [
    ({"messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"max_tokens": 5}, "messages must be"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "'user' or 'assistant'"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "'document' block"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]},
     "source must be"),
    ({"max_tokens": 5, "tools": [{"type": "web_search_20250305", "name": "web_search"}],
      "messages": [{"role": "user", "content": "x"}]}, "server tools"),
    ({"max_tokens": 5, "tool_choice": {"type": "tool", "name": "missing"}, "tools": [
        {"name": "forecast", "input_schema": CITY}], "messages": [{"role": "user", "content": "x"}]}, "missing"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
     "stream must be true or false, got 'yes'"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "temperature": 1e308}, "temperature"),
])
def test_messages_errors_in_anthropic_shape(tools_server, body, fragment):
    r = httpx.post(tools_server.url + "/v1/messages", json={"model": "m", **body}, headers={"x-api-key": KEY},
                   timeout=60)
    assert r.status_code == 400, r.text
    data = r.json()
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    assert fragment in data["error"]["message"]


def test_messages_auth_by_x_api_key(tools_server):
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=tools_server.url, api_key="wrong", max_retries=0).messages.create(
            model="m", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "authentication_error"
    ok = httpx.post(tools_server.url + "/v1/messages/count_tokens", headers={"x-api-key": KEY},
                    json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert ok.status_code == 200 and ok.json()["input_tokens"] > 0


def test_messages_stream_start_counts_the_prompt_and_empty_conversation(tools_server):
    r = httpx.post(tools_server.url + "/v1/messages", headers={"x-api-key": KEY}, timeout=60, json={
        "model": "m", "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "Say hello"}]})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    names = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert names == [e["type"] for e in events]
    start = events[0]["message"]
    assert start["content"] == [] and start["usage"]["input_tokens"] > 0
    assert [e["index"] for e in events if e["type"] == "content_block_start"] == [0]
    assert events[-2]["type"] == "message_delta" and events[-2]["usage"]["output_tokens"] == 3
    # an empty conversation is answered (as llama-server does), not refused
    empty = httpx.post(tools_server.url + "/v1/messages", headers={"x-api-key": KEY}, timeout=60,
                       json={"model": "m", "max_tokens": 2, "messages": []})
    assert empty.status_code == 200 and empty.json()["content"][0]["type"] == "text"


# ---------------------------------------------------------------- a scripted model (in-process app)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """The app in-process over the tools GGUF, its sampler replaced by a script: `say(text)` makes the model
    write `text`, then end its turn. Yields (say, http client)."""
    from fastapi.testclient import TestClient
    from gguf import GGUFValueType
    from gguf_edit import rewrite_gguf

    import ocula
    import ocula.engine.scheduler as sched_mod
    from ocula.server.app import create_app

    path = rewrite_gguf(MODEL, tmp_path_factory.mktemp("scripted") / "qwen3-tools.gguf",
                        metadata={"tokenizer.chat_template": (QWEN3_TEMPLATE, GGUFValueType.STRING)})
    model = ocula.load(path, n_ctx=2048)
    script = {"tokens": []}

    class Scripted:
        def __init__(self, params):
            self.i = -1

        def __call__(self, logits, history):
            self.i += 1
            tokens = script["tokens"]
            return tokens[self.i] if self.i < len(tokens) else min(model.tokenizer.eot_ids)

    mp = pytest.MonkeyPatch()
    mp.setattr(sched_mod, "Sampler", Scripted)
    with TestClient(create_app(model)) as tc:
        def say(text):
            script["tokens"] = model.tokenize(text, add_special=False)
        yield say, tc
    mp.undo()


THOUGHT = "<think>\nPondering.\n</think>\n\nHello there."
CALLED = ('Checking.\n<tool_call>\n{"name": "forecast", "arguments": {"city": "Rome", "hours": 5}}\n</tool_call>')


def test_messages_thinking_text_and_tool_blocks(scripted):
    say, tc = scripted
    claude = anthropic.Anthropic(base_url=str(tc.base_url), api_key="x", http_client=tc, max_retries=0)
    ask = [{"role": "user", "content": "Hi"}]
    say(THOUGHT)
    m = claude.messages.create(model="m", max_tokens=50, messages=ask)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in m.content] == \
        [("thinking", "\nPondering.\n"), ("text", "Hello there.")]
    assert m.stop_reason == "end_turn"
    say(THOUGHT)
    with claude.messages.stream(model="m", max_tokens=50, messages=ask) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [(e.index, e.content_block.type) for e in events if e.type == "content_block_start"]
    assert starts == [(0, "thinking"), (1, "text")]
    kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) for e in events]
    assert kinds.index(("content_block_delta", "signature_delta")) < kinds.index(("content_block_stop", None))
    assert [b.type for b in final.content] == ["thinking", "text"] and final.content[1].text == "Hello there."
    tools = [{"name": "forecast", "input_schema": CITY}]
    say(CALLED)
    m = claude.messages.create(model="m", max_tokens=80, messages=ask, tools=tools)
    assert [b.type for b in m.content] == ["text", "tool_use"] and m.stop_reason == "tool_use"
    assert m.content[0].text == "Checking." and m.content[1].input == {"city": "Rome", "hours": 5}
    say(CALLED)
    with claude.messages.stream(model="m", max_tokens=80, messages=ask, tools=tools) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use"] and final.content[1].input == m.content[1].input


def test_responses_reasoning_text_and_call_items(scripted):
    say, tc = scripted
    oai = openai.OpenAI(base_url=str(tc.base_url) + "/v1", api_key="x", http_client=tc, max_retries=0)
    say(THOUGHT)
    r = oai.responses.create(model="m", input="Hi", max_output_tokens=50)
    assert [o.type for o in r.output] == ["reasoning", "message"] and r.output_text == "Hello there."
    assert r.output[0].content[0].text == "\nPondering.\n"
    say(THOUGHT)
    events = list(oai.responses.create(model="m", input="Hi", max_output_tokens=50, stream=True))
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert reasoning == "\nPondering.\n" and text == "Hello there."
    assert [e.output_index for e in events if e.type == "response.output_item.added"] == [0, 1]
    tools = [{"type": "function", "name": "forecast", "parameters": CITY}]
    say(CALLED)
    r = oai.responses.create(model="m", input="Rome?", tools=tools, max_output_tokens=80)
    assert [o.type for o in r.output] == ["message", "function_call"] and r.output_text == "Checking."
    assert json.loads(r.output[1].arguments) == {"city": "Rome", "hours": 5}


def test_messages_stop_sequence_is_named(scripted):
    say, tc = scripted
    claude = anthropic.Anthropic(base_url=str(tc.base_url), api_key="x", http_client=tc, max_retries=0)
    kw = dict(model="m", max_tokens=50, messages=[{"role": "user", "content": "Count"}], stop_sequences=["THREE", "X"])
    say("one two THREE four")
    m = claude.messages.create(**kw)
    assert m.content[0].text == "one two " and m.stop_reason == "stop_sequence" and m.stop_sequence == "THREE"
    say("one two THREE four")
    with claude.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "THREE"
    say("one two")  # ended by the model: end_turn, even with stop sequences given
    m = claude.messages.create(**kw)
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
