"""llama-server's native POST /completion (and /completions) on `ocula serve`: prompt shapes (text, ids, mixed,
several prompts), n_predict, the llama-server response and stream shapes, n_probs, response_fields,
logit_bias, json_schema and GBNF grammar, errors in llama-server's shape; and multimodal_data with
<__media__> markers on the Qwen2-VL fixture, which answers as the chat route does for the same image."""
import base64
import json
from pathlib import Path

import pytest
from tiny import write_tiny_model

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import ocula  # noqa: E402
from ocula.server.testing import ServerProcess  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
VLM = FIXTURES / "models" / "qwen2vl" / "qwen2vl-f16.gguf"
VLM_MMPROJ = FIXTURES / "models" / "qwen2vl" / "mmproj-qwen2vl-f16.gguf"
IMAGE = FIXTURES / "images" / "astronaut_224.png"

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "the heat in the theme"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("native") / "tiny-native.gguf", "llama")


@pytest.fixture(scope="module")
def lib(tiny_path):
    return ocula.load(tiny_path)


@pytest.fixture(scope="module")
def server(tiny_path):
    with ServerProcess(["-m", str(tiny_path), "--parallel", "2", "--threads", "1"]) as s:
        yield s


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=60)


def test_completion_fields(server, lib):
    want = lib.generate(PROMPT, max_tokens=8, temperature=0)
    r = post(server, "/completion", {"prompt": PROMPT, "n_predict": 8, "temperature": 0, "return_tokens": True})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["content"] == want.text and b["tokens"] == want.token_ids
    assert b["stop"] is True and b["stop_type"] == "limit" and b["truncated"] is False
    assert isinstance(b["has_new_line"], bool)
    assert b["tokens_predicted"] == 8 and b["tokens_evaluated"] == want.prompt_tokens
    assert b["timings"]["predicted_n"] == 8 and b["timings"]["prompt_n"] + b["timings"]["cache_n"] == want.prompt_tokens
    assert b["generation_settings"]["n_predict"] == 8 and b["generation_settings"]["temperature"] == 0
    assert b["prompt"] == PROMPT
    # OpenAI's text_completion fields ride along
    assert b["choices"][0]["text"] == want.text and b["usage"]["completion_tokens"] == 8
    # without return_tokens, tokens is empty; /completions is the same route
    b = post(server, "/completions", {"prompt": PROMPT, "n_predict": 8, "temperature": 0}).json()
    assert b["content"] == want.text and b["tokens"] == []


def test_prompt_shapes(server, lib):
    ids = lib.tokenize(PROMPT)
    want = lib.generate(ids, max_tokens=6, temperature=0).text
    assert post(server, "/completion", {"prompt": ids, "n_predict": 6, "temperature": 0}).json()["content"] == want
    many = post(server, "/completion", {"prompt": [ids, PROMPT], "n_predict": 6, "temperature": 0}).json()
    assert isinstance(many, list) and [m["content"] for m in many] == [want, want]
    assert [m["index"] for m in many] == [0, 1]
    mixed = ids[:2] + [lib.detokenize(ids[2:])]  # ids, then text: tokenized without BOS
    want_mixed = lib.generate(ids[:2] + lib.tokenize(lib.detokenize(ids[2:]), add_special=False), max_tokens=6,
                              temperature=0).text
    assert post(server, "/completion", {"prompt": mixed, "n_predict": 6, "temperature": 0}).json()["content"] == \
        want_mixed


def test_stream_shape(server, lib):
    want = lib.generate(PROMPT, max_tokens=8, temperature=0)
    with httpx.stream("POST", server.url + "/completion", json={"prompt": PROMPT, "n_predict": 8, "temperature": 0,
                                                                 "stream": True, "n_probs": 3}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and "[DONE]" not in lines[-1]
    chunks = [json.loads(line[6:]) for line in lines]
    assert [c["stop"] for c in chunks] == [False] * 8 + [True]
    assert [t for c in chunks[:-1] for t in c["tokens"]] == want.token_ids
    assert all(len(c["completion_probabilities"]) == 1 and len(c["completion_probabilities"][0]["top_logprobs"]) == 3
               for c in chunks[:-1])
    assert "".join(c["content"] for c in chunks) == want.text
    last = chunks[-1]
    assert last["stop_type"] == "limit" and last["timings"]["predicted_n"] == 8 and "generation_settings" in last


def test_n_probs_and_response_fields(server, lib):
    b = post(server, "/completion", {"prompt": PROMPT, "n_predict": 4, "temperature": 0, "n_probs": 5}).json()
    probs = b["completion_probabilities"]
    assert len(probs) == 4
    for p in probs:
        assert p["logprob"] <= 0 and len(p["top_logprobs"]) == 5 and isinstance(p["bytes"], list)
        assert p["top_logprobs"][0]["id"] == p["id"]  # greedy: the chosen token is the most likely one
    fields = ["content", "generation_settings/n_predict", "timings/predicted_n"]
    b = post(server, "/completion", {"prompt": PROMPT, "n_predict": 4, "response_fields": fields}).json()
    assert set(b) == {"content", "generation_settings/n_predict", "timings/predicted_n"}
    assert b["generation_settings/n_predict"] == 4 and b["timings/predicted_n"] == 4


def test_stop_word_and_logit_bias(server, lib):
    greedy = lib.generate(PROMPT, max_tokens=12, temperature=0).text
    word = greedy[4:6]
    b = post(server, "/completion", {"prompt": PROMPT, "n_predict": 12, "temperature": 0, "stop": [word]}).json()
    assert b["stop_type"] == "word" and b["stopping_word"] == word and word not in b["content"]
    first = lib.generate(PROMPT, max_tokens=1, temperature=0).token_ids[0]
    for bias in ([[first, False]], {str(first): -100}):
        b = post(server, "/completion", {"prompt": PROMPT, "n_predict": 1, "temperature": 0, "logit_bias": bias,
                                         "return_tokens": True}).json()
        assert b["tokens"] != [first]
    text_bias = post(server, "/completion", {"prompt": PROMPT, "n_predict": 1, "temperature": 0, "return_tokens": True,
                                             "logit_bias": [[lib.detokenize([first]), False]]}).json()
    assert text_bias["tokens"] != [first]


def test_constraints(server):
    b = post(server, "/completion", {"prompt": PROMPT, "n_predict": 8, "grammar": 'root ::= "a"{5,5}'}).json()
    assert b["content"] == "aaaaa" and b["stop_type"] == "eos"
    b = post(server, "/completion", {"prompt": PROMPT, "n_predict": 10, "json_schema": {"const": "42"}}).json()
    assert b["content"] == '"42"'
    r = post(server, "/completion", {"prompt": PROMPT, "grammar": "root ::= undefined_rule"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("grammar is not usable")


@pytest.mark.parametrize("body,text", [
    ({}, "prompt is required"),
    ({"prompt": 5}, "prompt must be"),
    ({"prompt": [1, 999999]}, "outside the vocabulary"),
    ({"prompt": "x", "mirostat": 2}, "mirostat is not supported"),
    ({"prompt": "x", "temperature": "hot"}, "temperature must be"),
    ({"prompt": "x", "n_probs": 500}, "n_probs"),
    ({"prompt": ["a", "b"], "stream": True}, "one prompt and one completion at a time"),
    ({"prompt": {"prompt_string": "a <__media__>", "multimodal_data": ["AAAA"]}}, "does not take images"),
    ({"prompt": {"prompt_string": "a", "multimodal_data": ["AAAA"]}}, "0 <__media__> marker(s) for 1"),
])
def test_errors(server, body, text):
    r = post(server, "/completion", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and text in err["message"], err


def test_context_overflow(server):
    r = post(server, "/completion", {"prompt": "the " * 400})
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "exceed_context_size_error"
    assert err["n_ctx"] == 256 and err["n_prompt_tokens"] > 256 and err["param"] == "prompt"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.mark.skipif(not (VLM.exists() and VLM_MMPROJ.exists() and IMAGE.exists()),
                    reason=f"shared Qwen2-VL fixture not found under {FIXTURES}")
def test_multimodal_data_equals_chat():
    lib = ocula.load(VLM, mmproj=VLM_MMPROJ, n_ctx=1024)
    b64 = base64.b64encode(IMAGE.read_bytes()).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}},
                                         {"type": "text", "text": "Describe the image."}]}]
    with ServerProcess(["-m", str(VLM), "--mmproj", str(VLM_MMPROJ), "-c", "1024", "--threads", "1"]) as s:
        chat = httpx.post(s.url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 8, "temperature": 0},
                          timeout=120).json()
        counted = httpx.post(s.url + "/v1/chat/completions/input_tokens", json={"messages": msgs}, timeout=60).json()
        assert counted["input_tokens"] == chat["usage"]["prompt_tokens"]  # image tokens included
        text = httpx.post(s.url + "/apply-template", json={"messages": msgs}, timeout=60).json()["prompt"]
        assert text.count(lib.vision.vision.placeholder) == 1
        prompt = text.replace(lib.vision.vision.placeholder, "<__media__>")
        r = httpx.post(s.url + "/completion", json={"prompt": {"prompt_string": prompt, "multimodal_data": [b64]},
                                                    "n_predict": 8, "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["content"] == chat["choices"][0]["message"]["content"]
        assert r.json()["tokens_evaluated"] == chat["usage"]["prompt_tokens"]
        r = httpx.post(s.url + "/completion", json={"prompt": {"prompt_string": prompt, "multimodal_data": ["bm90"]},
                                                    "n_predict": 8}, timeout=60)
        assert r.status_code == 400 and "multimodal_data[0]" in r.json()["error"]["message"]


def test_n_cmpl_and_ignore_eos(server, lib):
    b = post(server, "/completion", {"prompt": PROMPT, "n_predict": 6, "n_cmpl": 3, "seed": 5, "temperature": 1.0,
                                     "top_k": 0, "top_p": 1.0, "min_p": 0.0})
    got = b.json()
    assert isinstance(got, list) and [g["index"] for g in got] == [0, 1, 2]
    for i, g in enumerate(got):  # sample i draws with seed 5 + i
        assert g["content"] == lib.generate(PROMPT, max_tokens=6, seed=5 + i, temperature=1.0, top_k=0, top_p=1.0,
                                            min_p=0.0).text
    r = post(server, "/completion", {"prompt": PROMPT, "n_cmpl": 2, "stream": True})
    assert r.status_code == 400 and "n_cmpl 2" in r.json()["error"]["message"]
    # ignore_eos bans the end-of-generation tokens (reported as null biases), so all n_predict tokens come
    b = post(server, "/completion", {"prompt": PROMPT, "n_predict": 30, "ignore_eos": True, "temperature": 0,
                                     "return_tokens": True}).json()
    bias = b["generation_settings"]["logit_bias"]
    assert {e["token"] for e in bias} == set(lib.tokenizer.eot_ids) and all(e["bias"] is None for e in bias)
    assert b["tokens_predicted"] == 30 and not set(b["tokens"]) & set(lib.tokenizer.eot_ids)
    assert post(server, "/completion", {"prompt": PROMPT, "n_predict": 2}).json()["generation_settings"][
        "logit_bias"] == []


def test_post_sampling_probs(server, lib):
    b = post(server, "/completion", {"prompt": PROMPT, "n_predict": 4, "temperature": 0, "n_probs": 3,
                                     "post_sampling_probs": True}).json()
    for p in b["completion_probabilities"]:  # greedy: the chosen token had all the probability
        assert p["prob"] == 1.0 and [t["prob"] for t in p["top_probs"]] == [1.0]  # no zero-probability entries
        assert p["top_probs"][0]["id"] == p["id"] and "logprob" not in p
    b = post(server, "/completion", {"prompt": PROMPT, "n_predict": 6, "temperature": 0.7, "top_k": 5,
                                     "top_p": 1.0, "min_p": 0.0, "seed": 3, "n_probs": 8,
                                     "post_sampling_probs": True}).json()
    for p in b["completion_probabilities"]:  # top_k 5: only five tokens had any chance, summing to one
        probs = [t["prob"] for t in p["top_probs"]]
        assert len(probs) == 5 and all(x > 0 for x in probs) and abs(sum(probs) - 1) < 1e-5 and p["prob"] > 0
        assert probs == sorted(probs, reverse=True)


@pytest.mark.parametrize("body", [
    {"prompt": "x", "seed": 2**70},
    {"prompt": "x", "response_fields": [1]},
    {"prompt": "x", "logit_bias": [["the", "much"]]},
    {"prompt": [1, 1.5]},
    {"prompt": [{"foo": 1}]},
    {"prompt": [[]]},
    {"prompt": "x", "stop": [1]},
    {"prompt": "x", "n_predict": 1.5},
    {"prompt": "x", "top_k": -5},
])
def test_bad_values_are_400(server, body):
    r = post(server, "/completion", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == 400 and "internal" not in r.json()["error"]["message"]


def test_nan_bias_is_400(server):
    r = httpx.post(server.url + "/completion", content=b'{"prompt": "x", "logit_bias": [["a", NaN]]}', timeout=30)
    assert r.status_code == 400 and "finite" in r.json()["error"]["message"]


def test_native_requests_are_counted(server):
    def count(status):
        text = httpx.get(server.url + "/metrics").text
        line = [x for x in text.splitlines() if x.startswith("ocula_requests_total{")
                and 'endpoint="completion"' in x and f'status="{status}"' in x]
        return float(line[0].rsplit(" ", 1)[1]) if line else 0.0

    ok, bad = count(200), count(400)
    post(server, "/completion", {"prompt": PROMPT, "n_predict": 2})
    post(server, "/completion", {"prompt": [PROMPT, PROMPT], "n_predict": 2})
    post(server, "/completion", {"prompt": 5})
    assert count(200) == ok + 2 and count(400) == bad + 1


def test_openai_client_on_unprefixed_completions(server, lib):
    """OpenAI clients whose base URL lacks /v1 reach llama-server's /completions: its answer carries OpenAI's
    text_completion fields, so the official client reads it, plain and streamed."""
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=60)
    want = lib.generate(PROMPT, max_tokens=6, temperature=0, ignore_eos=True)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want.text and chunks[-1].choices[0].finish_reason == "length"
    r = httpx.post(server.url + "/props", json={"n_ctx": 5}, timeout=10)
    assert r.status_code == 501 and r.json()["error"]["type"] == "not_supported_error"


def test_too_many_completions(server):
    r = post(server, "/completion", {"prompt": ["a"] * 65})
    assert r.status_code == 400 and "at most 64 completions" in r.json()["error"]["message"]
    r = post(server, "/completion", {"prompt": ["a"] * 5, "n_cmpl": 16})
    assert r.status_code == 400 and "5 x 16" in r.json()["error"]["message"]
