"""The chat page at `/`, driven in a real headless Chromium (Debian's /usr/bin/chromium through the
`playwright` package, no browser download) against real `ocula serve` processes: the Qwen2-VL fixture pair,
and the same model without its mmproj (text only) behind --api-key.

What the page must do (issue #19): a typed question with an image attached by the file input or by a paste
streams the same answer the API gives greedily for the same request; a second turn reports cached tokens;
stop ends a stream; a reload finds the conversation; an image for a text-only model is refused visibly;
model output containing <script> renders as text; server errors read as such; a server restart mid-stream
leaves a usable page. Light and dark screenshots come from here too (OCULA_WRITE_SCREENSHOTS=1 writes them
to docs/ for the README).
"""
import base64
import json
import os
import re
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from ocula.server.testing import ServerProcess, free_port  # noqa: E402
from ocula.server.web import page_files, page_url  # noqa: E402

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the test extra installs it
    sync_playwright = None

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
MODEL = FIXTURES / "models" / "qwen2vl" / "qwen2vl-f16.gguf"
MMPROJ = FIXTURES / "models" / "qwen2vl" / "mmproj-qwen2vl-f16.gguf"
IMAGES = FIXTURES / "images"
CHROMIUM = Path(os.environ.get("OCULA_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]
API_KEY = "webui-test-key"
N_CTX = 2048
LONG = 1900  # max_tokens of an answer long enough to stop or break off mid-way (about 4 s here)

pytestmark = pytest.mark.skipif(not (MODEL.exists() and MMPROJ.exists()),
                                reason=f"shared Qwen2-VL fixture not found under {FIXTURES}")


def data_uri(path: Path) -> str:
    mime = "image/jpeg" if path.suffix == ".jpg" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


# ---------------------------------------------------------------- servers and browser


@pytest.fixture(scope="module")
def vlm():
    with ServerProcess(["-m", str(MODEL), "--mmproj", str(MMPROJ), "-c", str(N_CTX), "-t", "1", "--parallel", "2"],
                       log_level="info") as s:
        yield s


TEXT_ARGS = ["-m", str(MODEL), "-c", str(N_CTX), "-t", "1", "--parallel", "2", "--api-key", API_KEY]


@pytest.fixture(scope="module")
def text_server():
    """The model without its mmproj, behind an API key, on a port kept for restarts (tests may replace the
    process: `text_server["proc"]`)."""
    holder = {"proc": ServerProcess(TEXT_ARGS, port=free_port()).start()}
    yield holder
    holder["proc"].stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if sync_playwright is None:
        pytest.skip("the playwright package is missing (pip install playwright; it is in the test extra)")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; or set OCULA_CHROMIUM)")
    pw = sync_playwright().start()
    try:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1100, "height": 720}, accept_downloads=True)
    except Exception as e:  # a browser that cannot start here (no display libraries, ...)
        pw.stop()
        pytest.skip(f"Chromium at {CHROMIUM} does not start: {e}")
    ctx.grant_permissions(["clipboard-read", "clipboard-write"])
    yield ctx
    ctx.close()
    pw.stop()


class Page:
    """One browser tab on a server's page, with the steps a person takes."""

    def __init__(self, browser, url: str):
        self.page = browser.new_page()
        self.url = url
        self.errors: list[str] = []
        self.sent: list[dict] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", self._record)
        self.page.on("dialog", lambda d: d.accept())
        self.goto()

    def _record(self, request):
        if request.method == "POST" and request.url.endswith("/v1/chat/completions"):
            self.sent.append(request.post_data_json)

    def goto(self):
        self.page.goto(self.url + "/")
        self.page.wait_for_selector("body[data-ready=true]")

    def settings(self, **values):
        p = self.page
        p.click("#open-settings")
        for name, value in values.items():
            field = p.locator(f"#settings-form [name={name}]")
            if isinstance(value, bool):
                field.set_checked(value)
            else:
                field.fill(str(value))
        p.click("#settings-save")
        p.wait_for_selector("#settings", state="hidden")

    def new_chat(self):
        self.page.click("#new-chat")

    def ask(self, text: str):
        self.answers_before = self.page.locator("#messages .msg.assistant").count()
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def wait_answer(self, timeout=60_000):
        """Waits until the answer to the last question has ended (stats, or a status); returns its element."""
        self.page.wait_for_function(
            """(before) => document.querySelector('#stop').hidden &&
               document.querySelectorAll('#messages .msg.assistant').length === before + 1 &&
               document.querySelector('#messages .msg.assistant:last-child .meta .stats, '
                                      + '#messages .msg.assistant:last-child .meta .status')""",
            arg=self.answers_before, timeout=timeout)
        return self.page.locator("#messages .msg.assistant").last

    def paste_image(self, path: Path, mime: str):
        self.page.evaluate("""([b64, name, mime]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, {type: mime}));
            document.querySelector('#prompt').dispatchEvent(
                new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
        }""", [base64.b64encode(path.read_bytes()).decode(), path.name, mime])

    def drop_image(self, path: Path, mime: str):
        self.page.evaluate("""([b64, name, mime]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, {type: mime}));
            const main = document.querySelector('#main');
            for (const type of ['dragenter', 'dragover', 'drop']) {
                main.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
            }
        }""", [base64.b64encode(path.read_bytes()).decode(), path.name, mime])

    def exported(self) -> list[dict]:
        with self.page.expect_download() as download:
            self.page.click("#export")
        data = json.loads(Path(download.value.path()).read_text())
        assert data["format"] == "ocula-chat"
        return data["conversations"]

    def conversation(self, title: str) -> dict:
        found = [c for c in self.exported() if c["title"] == title]
        assert len(found) == 1, [c["title"] for c in self.exported()]
        return found[0]

    def close(self):
        errors = self.errors
        self.page.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def vlm_page(browser, vlm):
    page = Page(browser, vlm.url)
    yield page
    page.close()


def greedy_answer(server_url: str, sent: dict, headers=None) -> dict:
    """The API's non-streamed answer to the request the page sent."""
    body = dict(sent, stream=False)
    body.pop("stream_options", None)
    r = httpx.post(server_url + "/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


STATS = re.compile(r"(\d+) tokens · ([\d.]+) tok/s · prompt (\d+) cached / (\d+) · TTFT (\d+) ms(?: · (\d+) image tokens)?")


def stats_of(message) -> dict:
    m = STATS.search(message.locator(".stats").inner_text())
    assert m, message.locator(".meta").inner_text()
    completion, tps, cached, prompt, ttft, image = m.groups()
    return {"completion": int(completion), "tps": float(tps), "cached": int(cached), "prompt": int(prompt),
            "ttft": int(ttft), "image": int(image or 0)}


# ---------------------------------------------------------------- the page and its files


def test_page_files_are_served_with_a_strict_policy(vlm):
    r = httpx.get(vlm.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert '<script type="module" src="/web/app.js"></script>' in r.text
    names = set(page_files())
    assert {"index.html", "app.js", "markdown.js", "style.css"} <= names
    for name in names:
        f = httpx.get(f"{vlm.url}/web/{name}")
        assert f.status_code == 200 and f.content == (REPO / "ocula" / "server" / "web" / name).read_bytes()
    assert httpx.get(vlm.url + "/web/app.js").headers["content-type"].startswith("text/javascript")
    for bad in ("/web/nothing.js", "/web/..%2Fweb.py", "/web/../app.py", "/web/%2e%2e%2fapp.py"):
        r = httpx.get(vlm.url + bad)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", bad
    card = httpx.get(vlm.url + "/v1/models").json()["data"][0]
    assert card["modalities"] == {"vision": True, "audio": False, "video": True}  # the Qwen2-VL fixture takes clips
    assert f"ocula: chat page at http://127.0.0.1:{vlm.port}/" in vlm.output()


def test_page_address_printed_at_start_up():
    assert page_url("127.0.0.1", 8080) == "http://127.0.0.1:8080/"
    assert page_url("0.0.0.0", 80) == "http://127.0.0.1:80/"  # listening everywhere: reachable here on loopback
    assert page_url("::1", 8080) == "http://[::1]:8080/"
    assert page_url("localhost", 9000) == "http://localhost:9000/"


def test_markdown_renders_formatting_and_escapes_html(vlm_page):
    html = vlm_page.page.evaluate("""async () => {
        const {renderMarkdown} = await import('/web/markdown.js');
        return renderMarkdown(
            '# T\\n**b** *i* `<c>` [l](https://e.com/?a=1&b="2") [x](javascript:alert(1))\\n\\n' +
            '- one\\n- two\\n\\n```py\\nx = "<b>"\\n```\\n| a | b |\\n|---|---|\\n| 1 | <i>2</i> |');
    }""")
    assert "<h1>T</h1>" in html and "<strong>b</strong>" in html and "<em>i</em>" in html
    assert "<code>&lt;c&gt;</code>" in html
    assert '<a href="https://e.com/?a=1&amp;b=&quot;2&quot;"' in html and "javascript:" not in html.split("[x]")[0]
    assert "[x](javascript:alert(1))" in html  # not a link
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert 'class="language-py">x = &quot;&lt;b&gt;&quot;</code>' in html and "copy-code" in html
    assert "<td>&lt;i&gt;2&lt;/i&gt;</td>" in html


# ---------------------------------------------------------------- chatting with images


def test_image_by_file_input_streams_the_greedy_answer_and_the_second_turn_is_cached(vlm_page, vlm):
    p = vlm_page
    p.new_chat()
    p.settings(temperature=0, maxTokens=24, topP="", extra="")
    image = IMAGES / "astronaut_224.png"
    p.page.set_input_files("#file-input", str(image))
    assert p.page.locator("#attachments img").get_attribute("src") == data_uri(image)
    p.ask("What is in this picture?")
    first = p.wait_answer()

    sent = p.sent[-1]
    assert sent["stream"] is True and sent["temperature"] == 0 and sent["max_tokens"] == 24
    assert sent["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image)}}, {"type": "text", "text": "What is in this picture?"}]}]
    api = greedy_answer(vlm.url, sent)
    saved = p.conversation("What is in this picture?")
    assert saved["messages"][1]["content"] == api["choices"][0]["message"]["content"] != ""
    assert p.page.locator("#messages .msg.user img").get_attribute("src") == data_uri(image)
    s1 = stats_of(first)
    assert s1["completion"] == api["usage"]["completion_tokens"]
    assert s1["prompt"] == api["usage"]["prompt_tokens"] and s1["image"] == api["timings"]["image_tokens"] > 0
    assert s1["tps"] > 0

    p.ask("And what colours are there?")
    second = p.wait_answer()
    s2 = stats_of(second)
    # the history (image included) comes from the prefix cache: more than the image's tokens were reused
    assert s2["cached"] > s1["image"] and s2["prompt"] > s1["prompt"]
    sent2 = p.sent[-1]
    assert [m["role"] for m in sent2["messages"]] == ["user", "assistant", "user"]
    assert sent2["messages"][1]["content"] == api["choices"][0]["message"]["content"]


def test_image_by_paste_and_by_drop(vlm_page, vlm):
    p = vlm_page
    p.new_chat()
    p.settings(temperature=0, maxTokens=12, extra="")
    coffee = IMAGES / "coffee_300x200.jpg"
    p.paste_image(coffee, "image/jpeg")
    p.page.wait_for_selector("#attachments img")
    p.ask("Pasted: what is this?")
    p.wait_answer()
    sent = p.sent[-1]
    assert sent["messages"][0]["content"][0]["image_url"]["url"] == data_uri(coffee)
    api = greedy_answer(vlm.url, sent)
    assert p.conversation("Pasted: what is this?")["messages"][1]["content"] == api["choices"][0]["message"]["content"]

    rocket = IMAGES / "rocket_160x240.png"
    p.drop_image(rocket, "image/png")
    p.page.wait_for_selector("#attachments img")
    assert p.page.locator("#attachments img").get_attribute("src") == data_uri(rocket)
    p.page.click("#attachments .thumb button")  # removed again before sending
    assert p.page.locator("#attachments img").count() == 0


def test_stop_ends_the_stream_and_keeps_the_partial_answer(vlm_page, vlm):
    p = vlm_page
    p.new_chat()
    p.settings(temperature=0, maxTokens=LONG, extra='{"ignore_eos": true}')
    p.ask("Talk for a long time")
    p.page.wait_for_function("() => (document.querySelector('#messages .msg.assistant .body')?.textContent.length ?? 0) > 40")
    p.page.click("#stop")
    message = p.wait_answer()
    assert message.locator(".status").inner_text() == "stopped"
    assert p.page.locator("#send").is_visible()
    shown = message.locator(".body").inner_text()
    deadline = time.monotonic() + 10
    while httpx.get(vlm.url + "/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(vlm.url + "/health").json()["active"] == 0  # the generation was cancelled
    assert message.locator(".body").inner_text() == shown
    saved = p.conversation("Talk for a long time")["messages"][1]
    assert saved["status"] == "stopped" and 0 < len(saved["content"]) and "stats" not in saved


def test_reload_finds_the_conversation_and_the_list_renames_and_deletes(vlm_page):
    p = vlm_page
    p.new_chat()
    p.settings(temperature=0, maxTokens=6, extra="")
    p.page.set_input_files("#file-input", str(IMAGES / "chelsea_451x300.png"))
    p.ask("Remember this cat")
    answer = p.wait_answer().locator(".body").inner_text()
    p.goto()  # reload: the open conversation comes back, and it is in the list
    assert p.page.locator("#messages .msg.user .body").inner_text() == "Remember this cat"
    assert p.page.locator("#messages .msg.user img").count() == 1
    assert p.page.locator("#messages .msg.assistant .body").inner_text() == answer
    item = p.page.locator("#conversations li", has_text="Remember this cat")
    assert item.count() == 1 and "active" in item.get_attribute("class")
    p.new_chat()
    assert p.page.locator("#messages .msg").count() == 0
    item.locator(".title").click()
    p.page.wait_for_selector("#messages .msg.user img")

    item.locator(".rename").click()
    p.page.fill("#conversations li input", "The cat chat")
    p.page.press("#conversations li input", "Enter")
    p.page.wait_for_selector("#conversations li .title >> text='The cat chat'")
    p.goto()
    renamed = p.page.locator("#conversations li", has_text="The cat chat")
    assert renamed.count() == 1
    renamed.locator(".delete").click()  # the confirm() is accepted
    p.page.wait_for_function("() => ![...document.querySelectorAll('#conversations .title')].some((t) => t.textContent === 'The cat chat')")
    p.goto()
    assert p.page.locator("#conversations li", has_text="The cat chat").count() == 0


# ---------------------------------------------------------------- untrusted output, errors, settings


SCRIPT_REPLY = '<script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2">'


def test_a_reply_containing_script_renders_as_text(vlm_page):
    """The model is made to answer with HTML through a response_format whose schema allows only that string
    (sent through the page's extra request fields), so the markup really arrives in the streamed reply."""
    p = vlm_page
    p.new_chat()
    schema = {"type": "json_schema", "json_schema": {"name": "html", "schema": {"const": SCRIPT_REPLY}}}
    p.settings(temperature=0, maxTokens=64, extra=json.dumps({"response_format": schema}))
    p.ask("Answer with HTML")
    message = p.wait_answer()
    assert message.locator(".body").inner_text() == json.dumps(SCRIPT_REPLY)
    assert message.locator(".body script, .body img").count() == 0
    assert p.page.evaluate("() => window.__pwned") is None


def test_imported_markdown_is_rendered_safely_and_code_copies(vlm_page, tmp_path):
    p = vlm_page
    code = '<script>window.__pwned = 3</script>\nprint("hi")'
    reply = (f"**Bold** and a list:\n\n- one\n- two\n\n```html\n{code}\n```\n\n"
             "[click](javascript:window.__pwned=4) <b onmouseover=\"window.__pwned=5\">not bold</b>")
    export = {"format": "ocula-chat", "version": 1, "conversations": [{"title": "Imported <b>html</b>", "messages": [
        {"role": "user", "content": "<script>window.__pwned = 6</script>", "images": []},
        {"role": "assistant", "content": reply, "images": []}]}]}
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(export))
    p.page.set_input_files("#import-file", str(path))
    p.page.wait_for_selector("#messages .msg.assistant strong")
    assert "Imported 1 conversation(s)" in p.page.locator("#notice").inner_text()
    assert p.page.locator("#conversations .title", has_text="Imported <b>html</b>").count() == 1
    body = p.page.locator("#messages .msg.assistant .body")
    assert body.locator("strong").inner_text() == "Bold" and body.locator("li").count() == 2
    assert body.locator("a").count() == 0 and body.locator("b, script").count() == 0
    assert '<b onmouseover="window.__pwned=5">not bold</b>' in body.inner_text()
    assert p.page.locator("#messages .msg.user .body").inner_text() == "<script>window.__pwned = 6</script>"
    body.locator(".copy-code").click()
    p.page.wait_for_selector(".copy-code >> text=Copied")
    assert p.page.evaluate("() => navigator.clipboard.readText()") == code
    assert p.page.evaluate("() => window.__pwned") is None

    bad = tmp_path / "bad.json"
    bad.write_text('{"conversations": [{"messages": [{"role": "robot", "content": "x"}]}]}')
    p.page.set_input_files("#import-file", str(bad))
    p.page.wait_for_selector("#notice.error")
    assert 'message 1: role must be "user" or "assistant"' in p.page.locator("#notice").inner_text()


def test_server_errors_are_shown_readably(vlm_page):
    p = vlm_page
    p.new_chat()
    p.settings(maxTokens=100000, extra="")
    p.ask("Too long an answer")
    message = p.wait_answer()
    error = message.locator(".error-text").inner_text()
    assert error.startswith("Server error 400 (context_length_exceeded): ") and "100000" in error
    assert message.locator(".status").inner_text() == "failed" and message.locator(".retry").is_visible()


def test_settings_shape_the_request(vlm_page, vlm):
    p = vlm_page
    p.new_chat()
    p.settings(systemPrompt="You answer in JSON.", temperature=0, topP=0.5, maxTokens=12, imageMaxTokens=16,
               jsonMode=True, extra='{"seed": 7}')
    p.page.set_input_files("#file-input", str(IMAGES / "wide_1000x50.png"))
    p.ask("Settings check")
    message = p.wait_answer()
    sent = p.sent[-1]
    assert sent["messages"][0] == {"role": "system", "content": "You answer in JSON."}
    assert (sent["top_p"], sent["max_tokens"], sent["image_max_tokens"], sent["seed"]) == (0.5, 12, 16, 7)
    assert sent["response_format"] == {"type": "json_object"}
    api = greedy_answer(vlm.url, sent)
    saved = p.conversation("Settings check")["messages"][1]["content"]
    assert saved == api["choices"][0]["message"]["content"] and saved.lstrip().startswith("{")
    assert stats_of(message)["image"] == api["timings"]["image_tokens"]
    unbudgeted = greedy_answer(vlm.url, {k: v for k, v in sent.items() if k != "image_max_tokens"})
    assert 0 < api["timings"]["image_tokens"] < unbudgeted["timings"]["image_tokens"]  # the budget took effect
    p.settings(systemPrompt="", topP="", imageMaxTokens="", jsonMode=False, extra="")


def test_settings_refuse_bad_values(vlm_page):
    p = vlm_page
    p.page.click("#open-settings")
    p.page.fill("#settings-form [name=extra]", "{not json")
    p.page.click("#settings-save")
    assert "not JSON" in p.page.locator("#settings-error").inner_text()
    p.page.fill("#settings-form [name=extra]", "[1, 2]")
    p.page.click("#settings-save")
    assert "must be a JSON object" in p.page.locator("#settings-error").inner_text()
    p.page.fill("#settings-form [name=extra]", "")
    p.page.fill("#settings-form [name=topP]", "1.5")
    p.page.click("#settings-save")
    assert p.page.locator("#settings-error").inner_text() == "Top-p must be between 0 and 1"
    assert p.page.locator("#settings").is_visible()
    p.page.click("#settings-cancel")


# ---------------------------------------------------------------- text-only model, API key, restarts


def test_api_key_is_asked_once_and_images_are_refused_by_a_text_only_model(browser, text_server):
    server = text_server["proc"]
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", "wrong key")
    page.click("#key-save")
    page.wait_for_selector("#key-reason >> text=refused the saved API key")
    page.fill("#key-input", API_KEY)
    page.click("#key-save")
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#model-badges").inner_text().startswith("text only")

    page.set_input_files("#file-input", str(IMAGES / "astronaut_224.png"))
    notice = page.locator("#notice.error")
    assert "does not take images (the server was started without --mmproj)" in notice.inner_text()
    assert page.locator("#attachments img").count() == 0
    page.click("#notice-close")
    page.click("#attach")
    assert "does not take images" in page.locator("#notice.error").inner_text()
    page.click("#notice-close")
    page.evaluate("""(b64) => {
        const data = new DataTransfer();
        data.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], 'a.png', {type: 'image/png'}));
        document.querySelector('#prompt').dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
    }""", base64.b64encode((IMAGES / "tiny_8x8.png").read_bytes()).decode())
    assert "does not take images" in page.locator("#notice.error").inner_text()
    assert page.locator("#attachments img").count() == 0

    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert not page.locator("#key-dialog").is_visible()  # the key was kept
    page.click("#open-settings")
    page.fill("#settings-form [name=maxTokens]", "5")
    page.click("#settings-save")
    page.fill("#prompt", "Hello")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#messages .msg.assistant .stats")
    assert not errors, errors
    page.close()


def test_a_server_restart_mid_stream_leaves_a_usable_page(browser, text_server):
    server = text_server["proc"]
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.add_init_script(f"localStorage.setItem('ocula.apiKey', {json.dumps(API_KEY)})")
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    page.click("#new-chat")
    page.click("#open-settings")
    page.fill("#settings-form [name=maxTokens]", str(LONG))
    page.fill("#settings-form [name=extra]", '{"ignore_eos": true}')
    page.click("#settings-save")
    page.fill("#prompt", "A long answer, please")
    page.press("#prompt", "Enter")
    page.wait_for_function("() => (document.querySelector('#messages .msg.assistant .body')?.textContent.length ?? 0) > 40")
    server.proc.kill()  # the server dies mid-answer (a crash; Ctrl-C waits for the stream to end first)
    server.proc.wait(10)
    page.wait_for_selector("#messages .msg.assistant .status >> text=interrupted")
    assert "connection to the server was lost mid-answer" in page.locator(".msg.assistant .error-text").inner_text()
    partial = page.locator("#messages .msg.assistant .body").inner_text()
    assert len(partial) > 40
    page.wait_for_selector("#server-status.down")

    text_server["proc"] = ServerProcess(TEXT_ARGS, port=server.port).start()
    page.wait_for_selector("#notice >> text=The server is back.", timeout=20_000)
    assert page.locator("#server-status").inner_text() == ""
    page.click("#open-settings")
    page.fill("#settings-form [name=maxTokens]", "5")
    page.fill("#settings-form [name=extra]", "")
    page.click("#settings-save")
    page.click("#messages .retry")
    page.wait_for_selector("#messages .msg.assistant .stats")
    assert page.locator("#messages .msg.assistant").count() == 1 and page.locator(".msg .status").count() == 0
    assert not errors, errors
    page.close()


# ---------------------------------------------------------------- screenshots


def test_screenshots_light_and_dark(vlm_page, tmp_path):
    from PIL import Image, ImageStat

    p = vlm_page
    p.new_chat()
    p.settings(temperature=0, maxTokens=40, extra="")
    p.page.set_input_files("#file-input", str(IMAGES / "astronaut_224.png"))
    p.ask("What is in this picture?")
    p.wait_answer()
    p.ask("Describe it in one sentence.")
    p.wait_answer()
    brightness = {}
    for scheme in ("light", "dark"):
        p.page.emulate_media(color_scheme=scheme)
        shot = tmp_path / f"webui-{scheme}.png"
        p.page.screenshot(path=str(shot))
        brightness[scheme] = ImageStat.Stat(Image.open(shot).convert("L")).mean[0]
        if os.environ.get("OCULA_WRITE_SCREENSHOTS") == "1":
            (REPO / "docs").mkdir(exist_ok=True)
            (REPO / "docs" / shot.name).write_bytes(shot.read_bytes())
    assert brightness["light"] > 180 and brightness["dark"] < 80, brightness
