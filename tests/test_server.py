"""`ocula serve` as a real subprocess on a tiny random model (no shared fixtures needed), driven with the
official `openai` client and raw httpx: answers equal the library's, streaming, auth, metrics, the bounded
queue, and a bad-input suite after which the server is still healthy.

Unknown request fields are accepted and ignored (documented in the README); OpenAI fields that would change
the answer but are not implemented (legacy functions, ...) are refused with 400.
"""
import concurrent.futures as cf
import json

import pytest
from tiny import write_tiny_model

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import ocula  # noqa: E402
from ocula.server.testing import ServerProcess  # noqa: E402

KEY = "sk-test-key"
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three rivers."}]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("srv") / "tiny-llama.gguf", "llama")


@pytest.fixture(scope="module")
def lib(tiny_path):
    return ocula.load(tiny_path)


@pytest.fixture(scope="module")
def server(tiny_path):
    args = ["-m", str(tiny_path), "--api-key", KEY, "--alias", "tiny", "--parallel", "2", "--queue-size", "2",
            "--max-request-bytes", "256K"]
    with ServerProcess(args) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                          timeout=60, **kw)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def metric(server, name):
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_health_models_metrics(server, client):
    h = httpx.get(server.url + "/health").json()  # no key needed
    assert h["status"] == "ok" and h["model"] == "tiny"
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    card = models[0].model_dump()
    assert card["context_length"] == 256 and card["capabilities"]["vision"] is False
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("ocula_requests_total", "ocula_prompt_tokens_total", "ocula_completion_tokens_total",
                 "ocula_time_to_first_token_seconds_bucket", "ocula_decode_tokens_per_second", "ocula_queue_depth",
                 "ocula_prefix_cache_hits_total", "ocula_active_sequences"):
        assert name in text


def test_chat_equals_library(server, client, lib):
    want = lib.chat(MSGS, max_tokens=20, temperature=0)
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == want.completion_tokens
    assert r.model == "tiny" and r.object == "chat.completion"

    stream = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.completion_tokens
    # the second identical prompt came from the prefix cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == want.prompt_tokens - 1


def test_stream_wire_format(server):
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and "usage" not in last  # include_usage not asked


def test_completions_equals_library(server, client, lib):
    want = lib.generate("Once upon a time", max_tokens=12, temperature=0)
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, logprobs=2)
    assert r.choices[0].text == want.text
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == want.completion_tokens and all(len(t) == 2 for t in lp.top_logprobs)
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, echo=True)
    assert r.choices[0].text == "Once upon a time" + want.text
    stream = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == want.text


def test_sampling_options_and_seed(server, client, lib):
    opts = dict(max_tokens=16, temperature=0.8, top_p=0.9, seed=123, presence_penalty=0.5, frequency_penalty=0.2)
    want = lib.chat(MSGS, top_k=40, min_p=0.05, **opts)  # the server's defaults for top_k / min_p
    a = client.chat.completions.create(model="tiny", messages=MSGS, **opts).choices[0].message.content
    b = client.chat.completions.create(model="tiny", messages=MSGS, **opts).choices[0].message.content
    assert a == b == want.text
    greedy = lib.chat(MSGS, max_tokens=20, temperature=0).text
    stop = greedy[3:5]
    want = lib.chat(MSGS, max_tokens=20, temperature=0, stop=[stop])
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == want.finish_reason == "stop"
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 3 for c in content)


def test_json_schema_response_format(server, client):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["color", "count"], "additionalProperties": False}
    for seed in (1, 2):
        r = client.chat.completions.create(
            model="tiny", messages=MSGS, max_tokens=40, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}})
        obj = json.loads(r.choices[0].message.content)
        assert set(obj) == {"color", "count"} and obj["color"] in ("red", "green", "blue")
        assert isinstance(obj["count"], int) and 0 <= obj["count"] <= 99
        assert r.choices[0].finish_reason == "stop"


def test_auth(server):
    assert post(server, "/v1/chat/completions", {"messages": MSGS}, key=None).status_code == 401
    r = post(server, "/v1/chat/completions", {"messages": MSGS}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200


TEXT_ONLY_IMAGE = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    {"type": "text", "text": "what is it?"}]}]

BAD = [  # (id, body, status, error code, text in the message)
    ("malformed-json", b'{"messages": [', 400, "invalid_json", "not valid JSON"),
    ("not-an-object", b"[1, 2]", 400, "invalid_json", "must be a JSON object"),
    ("empty-body", b"", 400, "invalid_json", "empty"),
    ("deep-nesting", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "invalid_json", "nested too deeply"),
    ("no-messages", {"model": "tiny"}, 400, "missing_required_parameter", "messages"),
    ("messages-string", {"messages": "hi"}, 400, "invalid_type", "messages"),
    ("empty-messages", {"messages": []}, 400, "invalid_value", "at least 1"),
    ("no-role", {"messages": [{"content": "hi"}]}, 400, "invalid_request", "'role'"),
    ("bad-role", {"messages": [{"role": "bot", "content": "hi"}]}, 400, "invalid_request", "'bot'"),
    ("content-int", {"messages": [{"role": "user", "content": 5}]}, 400, "invalid_request", "content"),
    ("audio-part", {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400, "invalid_request",
     "messages[0].content[0] is a part of type 'input_audio', but this model cannot take audio input"),
    ("file-part", {"messages": [{"role": "user", "content": ["hi", {"type": "file", "file": {}}]}]}, 400,
     "invalid_request", "messages[0].content[1] is a part of type 'file'"),
    ("unknown-part", {"messages": [{"role": "user", "content": [{"type": "hologram"}]}]}, 400, "invalid_request",
     "unknown part type 'hologram'"),
    ("temperature-type", {"messages": MSGS, "temperature": "hot"}, 400, "invalid_type", "temperature"),
    ("temperature-range", {"messages": MSGS, "temperature": -1}, 400, "invalid_value", "temperature"),
    ("top-p-range", {"messages": MSGS, "top_p": 0}, 400, "invalid_value", "top_p"),
    # non-finite (Python's json reads Infinity / NaN) and overflowing numbers name the value, never a 500
    ("temperature-infinity", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', 400,
     "invalid_value", "temperature: Input should be a finite number, got inf"),
    ("temperature-nan", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "invalid_value", "temperature: Input should be a finite number"),
    ("temperature-1e308", {"messages": MSGS, "temperature": 1e308}, 400, "invalid_value",
     "temperature must be in [0, 1e6], got 1e+308"),
    ("top-p-nan", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', 400, "invalid_value",
     "top_p"),
    ("min-p-infinity", b'{"messages": [{"role": "user", "content": "hi"}], "min_p": -Infinity}', 400,
     "invalid_value", "min_p"),
    ("repetition-penalty-tiny", {"messages": MSGS, "repetition_penalty": 1e-300}, 400, "invalid_value",
     "repetition_penalty must be in"),
    ("frequency-penalty-infinity", b'{"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": '
     b'Infinity}', 400, "invalid_value", "frequency_penalty"),
    ("logit-bias-nan", b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": NaN}}', 400,
     "invalid_value", "logit_bias"),
    # strict booleans: "yes" / 1 are not true
    ("stream-yes", {"messages": MSGS, "stream": "yes"}, 400, "invalid_type", "stream: Input should be a valid boolean"),
    ("stream-one", {"messages": MSGS, "stream": 1}, 400, "invalid_type", "stream"),
    ("ignore-eos-string", {"messages": MSGS, "ignore_eos": "true"}, 400, "invalid_type", "ignore_eos"),
    ("logprobs-string", {"messages": MSGS, "logprobs": "true"}, 400, "invalid_type", "logprobs"),
    ("include-usage-string", {"messages": MSGS, "stream": True, "stream_options": {"include_usage": "yes"}}, 400,
     "invalid_type", "include_usage"),
    # a message without content: only an assistant message with tool_calls may leave it out
    ("user-without-content", {"messages": [{"role": "user"}]}, 400, "invalid_request", "messages[0] has no 'content'"),
    ("null-content", {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": None}]}, 400,
     "invalid_request", "messages[1] has no 'content'"),
    ("assistant-without-content", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"},
                                                {"role": "user", "content": "again"}]}, 400, "invalid_request",
     "messages[1] has no 'content'"),
    ("max-tokens-negative", {"messages": MSGS, "max_tokens": -5}, 400, "invalid_value", "max_tokens"),
    ("max-tokens-type", {"messages": MSGS, "max_tokens": "many"}, 400, "invalid_type", "max_tokens"),
    ("stop-type", {"messages": MSGS, "stop": 5}, 400, "invalid_type", "stop"),
    ("seed-range", {"messages": MSGS, "seed": 2**70}, 400, "invalid_value", "seed"),
    ("n-zero", {"messages": MSGS, "n": 0}, 400, "invalid_value", "n"),
    ("n-too-many", {"messages": MSGS, "n": 17}, 400, "invalid_value", "at most 16 choices"),
    ("legacy-functions", {"messages": MSGS, "functions": [{"name": "f"}]}, 400, "unsupported_parameter",
     "send tools instead"),
    ("tool-choice-bogus", {"messages": MSGS, "tools": [{"type": "function", "function": {"name": "f"}}],
                           "tool_choice": "bogus"}, 400, "invalid_value", "tool_choice must be"),
    ("logit-bias-key", {"messages": MSGS, "logit_bias": {"abc": 1}}, 400, "invalid_value", "logit_bias"),
    ("logit-bias-id", {"messages": MSGS, "logit_bias": {"999999": 1}}, 400, "invalid_value", "outside the vocab"),
    ("top-logprobs-alone", {"messages": MSGS, "top_logprobs": 2}, 400, "invalid_value", "logprobs"),
    ("response-format-type", {"messages": MSGS, "response_format": {"type": "yaml"}}, 400, "invalid_request",
     "'yaml'"),
    ("response-format-schema", {"messages": MSGS, "response_format": {"type": "json_schema",
                                "json_schema": {"name": "x", "schema": {"type": "objectx"}}}}, 400,
     "invalid_request", "response_format"),
    ("image-to-text-model", {"messages": TEXT_ONLY_IMAGE}, 400, "image_input_not_supported", "does not take images"),
    ("context-overflow", {"messages": [{"role": "user", "content": "the " * 400}]}, 400, "context_length_exceeded",
     "tokens but the context holds 256"),
    ("max-tokens-overflow", {"messages": MSGS, "max_tokens": 1000}, 400, "context_length_exceeded",
     "max_tokens asks for 1000 more"),
    ("body-too-large", {"messages": [{"role": "user", "content": "x" * 300_000}]}, 413, "request_too_large",
     "allowed"),
    # refused from its length alone, before any tokenizing (characters / the longest token's bytes)
    ("text-beyond-context", {"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 200_000}]}]},
     400, "context_length_exceeded", "200000 characters, at least"),
]


@pytest.mark.parametrize("body,status,code,text", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_chat_requests(server, body, status, code, text):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and text in err["message"], err
    assert "Traceback" not in r.text


def test_bad_completion_requests_and_routes(server):
    r = post(server, "/v1/completions", {"prompt": ["a"] * 17})
    assert r.status_code == 400 and "at most 16 prompts" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"prompt": [1, 2, 99999]})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"prompt": "x", "suffix": "y"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    r = post(server, "/v1/completions", {"prompt": {"text": "x"}})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt")
    r = httpx.get(server.url + "/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_assistant_message_with_tool_calls_may_leave_out_content(server):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "user", "content": "again"}]
    r = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text


def test_completions_context_error_names_the_prompt(server):
    r = post(server, "/v1/completions", {"prompt": "the " * 400, "max_tokens": 4})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt", err
    r = post(server, "/v1/completions", {"prompt": "the", "max_tokens": 1000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = post(server, "/v1/completions", {"prompt": "the", "echo": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo", r.text


def test_unknown_fields_are_ignored(server, lib):
    want = lib.chat(MSGS, max_tokens=6, temperature=0)
    body = {"model": "anything", "messages": MSGS, "max_tokens": 6, "temperature": 0, "user": "u1",
            "metadata": {"a": "b"}, "store": False, "some_future_option": {"x": 1}, "parallel_tool_calls": False}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want.text


def test_queue_full_gives_503(server):
    # --parallel 2 --queue-size 2: of 8 long requests sent at once, some must be turned away
    body = {"messages": MSGS, "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: post(server, "/v1/chat/completions", body), range(8)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(503) >= 1 and codes.count(200) >= 2 and set(codes) <= {200, 503}, codes
    busy = next(r for r in results if r.status_code == 503)
    assert busy.json()["error"]["code"] == "queue_full" and busy.headers.get("retry-after") == "1"
    assert metric(server, 'ocula_scheduler_requests_total{outcome="rejected_queue_full"}') >= 1


def test_server_still_healthy(server, client, lib):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    want = lib.chat(MSGS, max_tokens=8, temperature=0)
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want.text
    assert metric(server, "ocula_active_sequences") == 0
    assert metric(server, 'ocula_requests_total{endpoint="chat",status="400"}') >= 20
