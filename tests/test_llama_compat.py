"""llama-server conventions that its own test suite (tools/server/tests) checks, on `ocula serve` (a real
subprocess on a tiny random model): serve-time chat templates by name or file, and the request fields and
response shapes that suite reads (see benchmarks/llama_server_suite.md)."""
import subprocess
import sys

import pytest
from tiny import write_tiny_model

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from ocula.server.testing import ServerProcess, free_port  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SYSTEM_USER = [{"role": "system", "content": "You are a test."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("llama-compat") / "tiny-compat.gguf", "llama")


@pytest.fixture(scope="module")
def server(tiny_path):
    with ServerProcess(["-m", str(tiny_path), "--chat-template", "command-r", "-np", "2", "-c", "512",
                        "--no-ui", "--threads", "1",
                        "--cors-origin", "localhost", "--cors-origin", "https://app.example",
                        "--alias", "tiny-2, fim,code", "--tags", "chat,small"]) as s:
        yield s


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=60)


def test_builtin_template_by_name(server):
    r = post(server, "/apply-template", {"messages": SYSTEM_USER})
    assert r.status_code == 200
    assert r.json()["prompt"] == ("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are a test.<|END_OF_TURN_TOKEN|>"
                                  "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi there<|END_OF_TURN_TOKEN|>"
                                  "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")
    assert httpx.get(server.url + "/props").json()["chat_template"].startswith("{% for message in messages %}")


def test_template_file(tiny_path, tmp_path):
    template = tmp_path / "turns.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}[assistant]{% endif %}")
    with ServerProcess(["-m", str(tiny_path), "--chat-template-file", str(template), "--threads", "1",
                        "--verbose"]) as s:
        r = post(s, "/apply-template", {"messages": SYSTEM_USER})
        assert r.json()["prompt"] == "[system]You are a test.[user]Hi there[assistant]"
        r = post(s, "/v1/chat/completions", {"messages": SYSTEM_USER, "max_tokens": 1}).json()
        assert r["__verbose"]["prompt"].endswith("[system]You are a test.[user]Hi there[assistant]")
        assert httpx.get(s.url + "/").text.startswith("<!doctype html>")


def test_no_ui(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("flags, message", [
    (["--chat-template", "no-such-template"], "neither a built-in template"),
    (["--chat-template-file", "/nonexistent/t.jinja"], "no such file"),
    (["--chat-template", "{% for %}"], "template"),
    (["--chat-template", "chatml", "--chat-template-file", "x.jinja"], "pick one"),
])
def test_bad_template_flags(tiny_path, flags, message):
    r = subprocess.run([sys.executable, "-m", "ocula", "serve", "-m", str(tiny_path), "--port", str(free_port()),
                        *flags], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocula: error:") and message in lines[0], r.stderr


# The end of DeepSeek-R1-Distill's template as llama.cpp ships it (models/templates): user contents are
# concatenated as strings, "['type']" is only read from tool calls, and thinking is closed when enable_thinking
# is false.
R1_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '<｜User｜>' + message['content'] }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] -%}"
    "{%- for tool in message['tool_calls'] -%}{{ '<｜tool▁call▁begin｜>' + tool['type'] }}{%- endfor -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<｜Assistant｜><think>\\n' }}"
    "{% if not enable_thinking %}{{- '</think>' -}}{% endif %}{%- endif %}"
)


@pytest.mark.parametrize("reasoning, end", [("auto", "<think>\n"), ("off", "<think>\n</think>")])
def test_reasoning_flag_and_string_contents(tiny_path, tmp_path, reasoning, end):
    template = tmp_path / "r1.jinja"
    template.write_text(R1_TEMPLATE)
    with ServerProcess(["-m", str(tiny_path), "--chat-template-file", str(template), "--reasoning", reasoning,
                        "--threads", "1"]) as s:
        r = post(s, "/apply-template", {"messages": [{"role": "user", "content": "What is today?"}]})
        assert r.status_code == 200, r.text
        assert r.json()["prompt"].endswith("<｜User｜>What is today?<｜Assistant｜>" + end)
        # a request's chat_template_kwargs win over the flag
        r = post(s, "/apply-template", {"messages": [{"role": "user", "content": "Hi"}],
                                        "chat_template_kwargs": {"enable_thinking": reasoning == "off"}})
        assert r.json()["prompt"].endswith("<think>\n" if reasoning == "off" else "</think>")
        if reasoning == "auto":
            r = post(s, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            assert r.status_code == 200, r.text


def test_template_type_error_is_a_400():
    from ocula.text.chat import ChatTemplate, TemplateError

    with pytest.raises(TemplateError, match="TypeError"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render([{"role": "user", "content": "x"}])


def test_date_string_is_today(tiny_path, tmp_path):
    import time

    # how Llama 3.x templates date their system turn (their fallback when the variable is missing is a fixed day)
    template = tmp_path / "dated.jinja"
    template.write_text("{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
                        "Today Date: {{ date_string }}\n{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with ServerProcess(["-m", str(tiny_path), "--chat-template-file", str(template), "--threads", "1"]) as s:
        prompt = post(s, "/apply-template", {"messages": [{"role": "user", "content": "Hi"}]}).json()["prompt"]
        assert prompt.startswith("Today Date: ") and prompt.endswith("\nHi")
        assert prompt.split("\n")[0][len("Today Date: "):] in (time.strftime("%d %b %Y"),
                                                                time.strftime("%d %b %Y", time.localtime(time.time() - 120)))


@pytest.mark.parametrize("origin, allowed", [
    ("http://localhost", True), ("http://localhost:8080", True), ("http://127.0.0.1:3000", True),
    ("http://[::1]:3000", True), ("https://app.example", True),
    ("http://evil.com", False), ("http://notlocalhost", False), ("http://localhost.evil.com", False),
    ("https://app.example:444", False),
])
def test_cors_localhost_keyword(server, origin, allowed):
    r = httpx.options(server.url + "/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "Authorization"})
    assert r.status_code == 200
    assert r.headers.get("access-control-allow-origin") == (origin if allowed else None)
    if allowed:  # llama-server's clients may read the names case-sensitively
        assert (b"Access-Control-Allow-Origin", origin.encode()) in r.headers.raw
    r = httpx.get(server.url + "/health", headers={"Origin": origin})
    assert r.headers.get("access-control-allow-origin") == (origin if allowed else None)


def test_aliases_and_tags(server):
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["id"] == "code" and card["aliases"] == ["code", "fim", "tiny-2"] and card["tags"] == ["chat", "small"]
    assert httpx.get(server.url + "/v1/models/fim").json()["id"] == "code"
    assert httpx.get(server.url + "/v1/models/other").status_code == 404
    r = post(server, "/v1/chat/completions", {"model": "fim", "messages": [{"role": "user", "content": "Hi"}],
                                              "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "code"


PREFILL = SYSTEM_USER + [{"role": "assistant", "content": "Whill"}]


def test_assistant_prefill(server):
    prompt = post(server, "/apply-template", {"messages": PREFILL}).json()["prompt"]
    assert prompt.endswith("<|USER_TOKEN|>Hi there<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Whill")
    n_prompt = len(post(server, "/tokenize", {"content": prompt, "add_special": True}).json()["tokens"])
    for extra in ({}, {"add_generation_prompt": False, "continue_final_message": True}):
        r = post(server, "/v1/chat/completions", {"messages": PREFILL, "max_tokens": 2, **extra})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == n_prompt, r.text
    parts = [{"type": "text", "text": "Wh"}, {"type": "text", "text": "ill"}]
    prompt = post(server, "/apply-template", {"messages": SYSTEM_USER + [{"role": "assistant", "content": parts}]})
    assert prompt.json()["prompt"].endswith("<|CHATBOT_TOKEN|>Wh\n\nill")
    # without prefill the assistant turn is closed and a new one opened
    r = post(server, "/v1/chat/completions", {"messages": PREFILL, "max_tokens": 2, "add_generation_prompt": False})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > n_prompt


def test_continue_final_message_contradiction(server):
    r = post(server, "/v1/chat/completions", {"messages": PREFILL, "max_tokens": 2, "add_generation_prompt": True,
                                              "continue_final_message": True})
    assert r.status_code == 400 and "continue_final_message" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", {"messages": SYSTEM_USER, "max_tokens": 2,
                                              "add_generation_prompt": False, "continue_final_message": True})
    assert r.status_code == 400 and "ends with an assistant message" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", {"messages": PREFILL + [{"role": "assistant", "content": "x"}]})
    assert r.status_code == 400 and "two assistant messages" in r.json()["error"]["message"]


def test_verbose_shows_the_prompt(server):
    prompt = post(server, "/apply-template", {"messages": PREFILL}).json()["prompt"]
    r = post(server, "/v1/chat/completions", {"messages": PREFILL, "max_tokens": 2, "verbose": True}).json()
    seen = r["__verbose"]
    assert seen["prompt_tokens"] == post(server, "/tokenize", {"content": prompt, "add_special": True}).json()["tokens"]
    assert seen["prompt"].endswith("<|CHATBOT_TOKEN|>Whill") and len(seen["prompt_tokens"]) == r["usage"]["prompt_tokens"]
    assert "__verbose" not in post(server, "/v1/chat/completions", {"messages": PREFILL, "max_tokens": 2}).json()
    r = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "verbose": True}).json()
    assert r["__verbose"]["prompt_tokens"] == post(server, "/tokenize", {"content": "Hello", "add_special": True}).json()["tokens"]


def test_relative_file_urls_under_media_root(tmp_path):
    from PIL import Image

    from ocula.media import MediaPolicy
    from ocula.media.sources import _load_str

    (tmp_path / "root" / "mtmd").mkdir(parents=True)
    Image.new("RGB", (8, 6), "red").save(tmp_path / "root" / "mtmd" / "img.png")
    (tmp_path / "secret.png").write_bytes((tmp_path / "root" / "mtmd" / "img.png").read_bytes())
    policy = MediaPolicy(allow_local_files=True, allowed_local_root=str(tmp_path / "root"))
    for url in ("file://mtmd/img.png", "file:////mtmd//img.png", f"file://{tmp_path}/root/mtmd/img.png"):
        assert _load_str(url, policy).size == (8, 6)
    for url, why in (("file://mtmd/none.png", "not found"), ("file://../secret.png", "outside the allowed"),
                     (f"file://{tmp_path}/secret.png", "outside the allowed"), ("file://mtmd/img.png?x=1", "query")):
        with pytest.raises(Exception, match=why):
            _load_str(url, policy)
    with pytest.raises(Exception, match="remote host 'mtmd' is not allowed"):
        _load_str("file://mtmd/img.png", MediaPolicy())


def test_llama3_builtin_starts_with_bos(tiny_path):
    import ocula
    from ocula.text.builtin_templates import BUILTIN_TEMPLATES
    from ocula.text.chat import ChatTemplate

    model = ocula.load(tiny_path)
    tok = model.tokenizer
    model.template = ChatTemplate(BUILTIN_TEMPLATES["llama3"], tok.bos_token, tok.eos_token, model.architecture)
    prompt = model.apply_chat_template([{"role": "system", "content": "Book"}, {"role": "user", "content": "Hi"}])
    assert prompt == (tok.bos_token + "<|start_header_id|>system<|end_header_id|>\n\nBook<|eot_id|>"
                      "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = model.build_prompt([{"role": "user", "content": "Hi"}]).token_ids
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id
