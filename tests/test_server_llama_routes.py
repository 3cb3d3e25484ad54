"""llama-server's routes and conventions on `ocula serve` (a real subprocess on a tiny random model):
/props, /tokenize, /detokenize, /apply-template, the OpenAI routes without /v1, and `n` > 1 on chat and
completions (independent samples sharing one prefill, seeds per choice, logprobs, streaming by index)."""
import json

import pytest
from tiny import write_tiny_model

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import ocula  # noqa: E402
from ocula.server.testing import ServerProcess  # noqa: E402

MSGS = [{"role": "user", "content": "Name three rivers."}]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("llama-routes") / "tiny-routes.gguf", "llama",
                            chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def lib(tiny_path):
    return ocula.load(tiny_path)


@pytest.fixture(scope="module")
def server(tiny_path):
    with ServerProcess(["-m", str(tiny_path), "--alias", "tiny", "--parallel", "4", "--threads", "1"]) as s:
        yield s


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=60)


def metric(server, name):
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_props(server, tiny_path, lib):
    p = httpx.get(server.url + "/props").json()
    assert p["model_path"] == str(tiny_path) and p["model_alias"] == "tiny"
    assert p["total_slots"] == 4 and p["default_generation_settings"]["n_ctx"] == lib.n_ctx == 256
    assert p["modalities"] == {"vision": False, "audio": False, "video": False}
    assert p["chat_template"] == TEMPLATE and p["build_info"].startswith("b")
    params = p["default_generation_settings"]["params"]
    assert params["temperature"] == 0.8 and params["top_k"] == 40 and params["n_predict"] == -1


def test_tokenize_detokenize(server, lib):
    text = "the heat in a theme"
    r = post(server, "/tokenize", {"content": text}).json()
    assert r["tokens"] == lib.tokenize(text, add_special=False)
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json()["content"] == text
    pieces = post(server, "/tokenize", {"content": text, "with_pieces": True}).json()["tokens"]
    assert [t["id"] for t in pieces] == r["tokens"]
    assert "".join(t["piece"] for t in pieces) == text
    # a token that is not whole UTF-8 shows as its bytes; special tokens parse unless asked not to
    split = post(server, "/tokenize", {"content": "é", "with_pieces": True}).json()["tokens"]
    assert [t["piece"] for t in split] == [[0xC3], [0xA9]]  # byte-level BPE: one token per byte here
    special = lib.tokenizer.token_id("<|im_end|>")
    assert post(server, "/tokenize", {"content": "<|im_end|>"}).json()["tokens"] == [special]
    assert special not in post(server, "/tokenize", {"content": "<|im_end|>", "parse_special": False}).json()["tokens"]


def test_apply_template(server, lib):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = post(server, "/apply-template", {"messages": msgs}).json()
    assert r["prompt"] == lib.apply_chat_template(msgs)
    assert r["prompt"].endswith("<|im_start|>assistant\n")
    r = post(server, "/apply-template", {"messages": msgs, "add_generation_prompt": False}).json()
    assert not r["prompt"].endswith("<|im_start|>assistant\n")


def test_native_errors(server):
    r = post(server, "/tokenize", {"content": 5})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == 400 and "content must be str" in r.json()["error"]["message"]
    r = post(server, "/detokenize", {"tokens": [1, 999999]})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    r = post(server, "/apply-template", {"messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and "robot" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/apply-template", content=b"{nope", timeout=10)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_unprefixed_openai_routes(server, lib):
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    want = lib.chat(MSGS, max_tokens=8, temperature=0)
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want.text
    assert httpx.get(server.url + "/v1/health").json()["status"] == "ok"


def test_n_choices_chat(server, lib):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    hits = metric(server, "ocula_prefix_cache_hits_total")
    opts = dict(max_tokens=10, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    r = client.chat.completions.create(model="tiny", messages=MSGS, n=3, seed=7, logprobs=True, top_logprobs=2,
                                       extra_body={"top_k": 0, "min_p": 0.0}, max_tokens=10, temperature=1.0,
                                       top_p=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    for i, c in enumerate(r.choices):  # choice i samples as a lone request with seed 7 + i
        want = lib.chat(MSGS, seed=7 + i, **opts)
        assert c.message.content == want.text
        assert len(c.logprobs.content) == want.completion_tokens
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    assert len(set(texts)) > 1
    assert r.usage.completion_tokens == sum(lib.chat(MSGS, seed=7 + i, **opts).completion_tokens for i in range(3))
    assert r.usage.prompt_tokens == lib.chat(MSGS, max_tokens=1).prompt_tokens
    # the two later samples started from the first one's prefill
    assert metric(server, "ocula_prefix_cache_hits_total") >= hits + 2

    stream = client.chat.completions.create(model="tiny", messages=MSGS, n=2, seed=7, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"top_k": 0, "min_p": 0.0}, max_tokens=10, temperature=1.0,
                                            top_p=1.0)
    got, finish, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
        for c in chunk.choices:
            got[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [got[0], got[1]] == texts[:2]
    assert set(finish) == {0, 1} and usage.completion_tokens == sum(
        lib.chat(MSGS, seed=7 + i, **opts).completion_tokens for i in range(2))


def test_n_choices_completions_and_json(server, lib):
    r = post(server, "/v1/completions", {"prompt": "the", "n": 2, "max_tokens": 6, "temperature": 0})
    body = r.json()
    want = lib.generate("the", max_tokens=6, temperature=0).text
    assert [c["text"] for c in body["choices"]] == [want, want] and [c["index"] for c in body["choices"]] == [0, 1]
    r = post(server, "/v1/chat/completions", {"messages": MSGS, "n": 2, "max_tokens": 40, "temperature": 1.0,
                                              "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:  # each choice keeps its own grammar state
        if c["finish_reason"] == "stop":
            json.loads(c["message"]["content"])
    r = post(server, "/v1/chat/completions", {"messages": MSGS, "n": 17})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_llama_server_conventions_on_openai_routes(server):
    # llama-server's json_schema / grammar request fields constrain chat and completions too
    r = post(server, "/chat/completions", {"messages": MSGS, "max_tokens": 10, "json_schema": {"const": "42"}})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == '"42"'
    r = post(server, "/v1/completions", {"prompt": "the", "max_tokens": 8, "grammar": 'root ::= "a"{5,5}'})
    assert r.json()["choices"][0]["text"] == "aaaaa"
    r = post(server, "/v1/chat/completions", {"messages": MSGS, "grammar": "root ::= nowhere"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "grammar"
    r = post(server, "/v1/chat/completions", {"messages": MSGS, "json_schema": {"const": 1},
                                              "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and "not both" in r.json()["error"]["message"]
    # system_fingerprint in llama-server's b<build> form; the first stream chunk has content null;
    # the usage chunk carries llama-server's timings
    body = post(server, "/chat/completions", {"messages": MSGS, "max_tokens": 3, "ignore_eos": True}).json()
    assert body["system_fingerprint"].startswith("b") and "cmpl" in body["id"]
    assert body["timings"]["predicted_n"] == 3 and body["timings"]["prompt_n"] + body["timings"]["cache_n"] == \
        body["usage"]["prompt_tokens"]
    with httpx.stream("POST", server.url + "/chat/completions", timeout=60,
                      json={"messages": MSGS, "max_tokens": 3, "stream": True, "ignore_eos": True,
                            "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert "timings" not in chunks[0]
    assert chunks[-1]["choices"] == [] and chunks[-1]["timings"]["predicted_n"] == 3
    assert "predicted_per_second" in chunks[-1]["timings"]
    # GET /models also lists the model as llama-server does (capabilities as a list)
    listed = httpx.get(server.url + "/models").json()["models"][0]
    assert listed["name"] == "tiny" and listed["capabilities"] == ["completion"]


def test_input_tokens(server, lib):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three rivers."}]
    for path in ("/v1/chat/completions/input_tokens", "/chat/completions/input_tokens"):
        r = post(server, path, {"model": "tiny", "messages": msgs})
        assert r.json() == {"object": "chat.completion.input_tokens", "input_tokens": len(lib.prompt_token_ids(msgs))}
    r = post(server, "/v1/chat/completions/input_tokens", {"messages": [{"role": "bot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    r = post(server, "/v1/chat/completions/input_tokens", {"messages": image})
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_input_not_supported"


def test_server_sampling_defaults_and_slots(tiny_path, lib):
    args = ["-m", str(tiny_path), "--threads", "1", "--temp", "0", "--seed", "42", "-n", "5", "--top-k", "7",
            "--parallel", "2"]
    with ServerProcess(args) as s:
        params = httpx.get(s.url + "/props").json()["default_generation_settings"]["params"]
        assert (params["temperature"], params["seed"], params["n_predict"], params["top_k"]) == (0, 42, 5, 7)
        want = lib.chat(MSGS, max_tokens=5, temperature=0, ignore_eos=True)
        r = post(s, "/v1/chat/completions", {"messages": MSGS, "ignore_eos": True}).json()  # server defaults apply
        assert r["choices"][0]["message"]["content"] == want.text and r["usage"]["completion_tokens"] == 5
        b = post(s, "/completion", {"prompt": "the", "n_predict": 50}).json()  # -n caps n_predict there
        assert b["generation_settings"]["n_predict"] == 5 and b["generation_settings"]["seed"] == 42
        assert b["generation_settings"]["temperature"] == 0
        slots = httpx.get(s.url + "/slots").json()
        assert len(slots) == 2 and not any(x["is_processing"] for x in slots) and slots[0]["n_ctx"] == 256
    from ocula.server.testing import ServerProcess as SP

    with pytest.raises(RuntimeError, match="bad sampling default"):
        SP(["-m", str(tiny_path), "--top-p", "0"], startup_timeout=30).start()


def test_stream_logprobs_on_every_content_chunk(server, lib):
    greedy = lib.chat(MSGS, max_tokens=6, temperature=0, ignore_eos=True).text
    stop = greedy[-1] + "\x00"  # holds the last character back until the end: it leaves as the tail
    body = {"messages": MSGS, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stop": [stop], "stream": True,
            "logprobs": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    content = [c["choices"][0] for c in chunks[1:] if c["choices"][0]["finish_reason"] is None]
    assert content[-1]["delta"]["content"] == greedy[-1]  # the tail chunk
    assert all(c["logprobs"] is not None for c in content)
    assert sum(len(c["logprobs"]["content"]) for c in content) == 6
    assert "".join(c["delta"]["content"] for c in content) == greedy


def test_llama_server_command_line(tiny_path, tmp_path, lib):
    from ocula.text.chat import CHATML_TEMPLATE

    args = ["-m", str(tiny_path), "--threads", "1", "--chat-template", "chatml", "--no-slots", "--jinja",
            "-ngl", "99", "-fa", "on", "-b", "64", "--cont-batching"]
    with ServerProcess(args, log_level="info") as s:
        assert httpx.get(s.url + "/props").json()["chat_template"] == CHATML_TEMPLATE
        msgs = [{"role": "user", "content": "Hi"}]
        assert post(s, "/apply-template", {"messages": msgs}).json()["prompt"] == \
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        note = [line for line in s.output().splitlines() if "have no effect" in line]
        assert note and all(f in note[0] for f in ("--no-slots", "--jinja", "--n-gpu-layers", "--flash-attn"))
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    with ServerProcess(["-m", str(tiny_path), "--threads", "1", "--chat-template-file", str(template)]) as s:
        assert post(s, "/apply-template", {"messages": [{"role": "user", "content": "Hi"}]}).json()["prompt"] == \
            "[user] Hi\n"
    with pytest.raises(RuntimeError, match="nope.jinja"):
        ServerProcess(["-m", str(tiny_path), "--chat-template-file", str(tmp_path / "nope.jinja")],
                      startup_timeout=30).start()


def test_several_completion_prompts(server, lib):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    prompts = ["the heat", "in a theme"]
    want = [lib.generate(p, max_tokens=5, temperature=0, ignore_eos=True) for p in prompts]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0, n=2, echo=True,
                                  extra_body={"ignore_eos": True})
    # OpenAI's order: the n choices of the first prompt, then those of the second
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [prompts[0] + want[0].text] * 2 + [prompts[1] + want[1].text] * 2
    assert r.usage.prompt_tokens == sum(w.prompt_tokens for w in want) and r.usage.completion_tokens == 20
    ids = [lib.tokenize(p) for p in prompts]
    stream = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    got = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            got[c.index] += c.text
    assert [got[0], got[1]] == [w.text for w in want]


def test_n_choices_with_a_parsing_template(tmp_path):
    """A template that thinks (<think>) sends the answer through the reasoning parser: each choice gets its own
    parser state, so every choice equals the same request sent alone with its seed."""
    path = write_tiny_model(tmp_path / "thinks.gguf", "llama", chat_template=TEMPLATE + "{# <think> #}")
    opts = {"messages": MSGS, "max_tokens": 12, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    with ServerProcess(["-m", str(path), "--threads", "1", "--parallel", "2"]) as s:
        both = post(s, "/v1/chat/completions", {**opts, "n": 2, "seed": 7}).json()["choices"]
        alone = [post(s, "/v1/chat/completions", {**opts, "seed": 7 + i}).json()["choices"][0] for i in range(2)]
        streamed = {0: "", 1: ""}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json={**opts, "n": 2, "seed": 7, "stream": True},
                          timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        streamed[c["index"]] += c["delta"].get("content") or ""
    assert [c["message"] for c in both] == [c["message"] for c in alone]
    assert both[0]["message"] != both[1]["message"]
    assert [streamed[0], streamed[1]] == [c["message"]["content"] for c in alone]


def test_seed_minus_one_is_random(tiny_path):
    """llama-server clients send seed -1 for a random seed: two such requests differ, also under --seed."""
    opts = {"messages": MSGS, "max_tokens": 12, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
            "seed": -1}
    with ServerProcess(["-m", str(tiny_path), "--threads", "1", "--seed", "3"]) as s:
        texts = {post(s, "/v1/chat/completions", opts).json()["choices"][0]["message"]["content"] for _ in range(3)}
        native = {post(s, "/completion", {"prompt": "the", "n_predict": 12, "temperature": 1.0, "top_k": 0,
                                          "seed": -1}).json()["content"] for _ in range(3)}
    assert len(texts) > 1 and len(native) > 1
