"""`ocula serve` with a vision model (the Qwen2-VL fixture pair from ../shared): image chats through the
official `openai` client equal the library's greedy answers, plain and streamed; 8 simultaneous streaming
clients (mixed text/image) each get the answer they get alone; a second turn re-sending the same image reuses
the image embedding and the KV prefix; client disconnects free the sequence; media policy refusals are
OpenAI-style 400s and the server keeps serving."""
import base64
import io
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import ocula  # noqa: E402
from ocula.server.testing import ServerProcess  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"
MODEL = FIXTURES / "models" / "qwen2vl" / "qwen2vl-f16.gguf"
MMPROJ = FIXTURES / "models" / "qwen2vl" / "mmproj-qwen2vl-f16.gguf"
IMAGES = FIXTURES / "images"

pytestmark = [pytest.mark.skipif(not (MODEL.exists() and MMPROJ.exists()),
                                 reason=f"shared Qwen2-VL fixture not found under {FIXTURES}"),
              pytest.mark.usefixtures("one_torch_thread")]

N_CTX = 1024
MAX_PIXELS = 1_000_000
MAX_BYTES = 600_000


def data_uri(path: Path) -> str:
    mime = "image/jpeg" if path.suffix == ".jpg" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def png_bytes(w: int, h: int, color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def image_msg(url: str, text: str = "Describe the image.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    shutil.copy(IMAGES / "astronaut_224.png", root / "astronaut.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def server(media_root):
    args = ["-m", str(MODEL), "--mmproj", str(MMPROJ), "-c", str(N_CTX), "--parallel", "8",
            "--allowed-media-path", str(media_root), "--max-image-pixels", str(MAX_PIXELS),
            "--max-image-bytes", str(MAX_BYTES), "--max-images", "2"]
    with ServerProcess(args) as s:
        yield s


@pytest.fixture(scope="module")
def lib():
    return ocula.load(MODEL, mmproj=MMPROJ, n_ctx=N_CTX)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def metrics(server) -> dict[str, float]:
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def stream_text(client, messages, **kw):
    chunks = list(client.chat.completions.create(model="qwen2vl", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage


def concurrent_streams(client, convs: list, max_tokens: list[int]) -> list[str]:
    """Each conversation streamed greedily by its own client thread, all started at once; their texts."""
    got: list = [None] * len(convs)
    barrier = threading.Barrier(len(convs))

    def worker(i):
        barrier.wait()
        got[i] = stream_text(client, convs[i], max_tokens=max_tokens[i], temperature=0)[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(convs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return got


def test_models_and_health(server, client):
    card = client.models.list().data[0].model_dump()
    assert card["id"] == "qwen2vl-f16.gguf" and card["context_length"] == N_CTX
    assert card["capabilities"]["vision"] is True
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    m = metrics(server)
    assert "ocula_image_cache_hits_total" in m and "ocula_image_cache_misses_total" in m


def test_image_chat_equals_library(server, client, lib):
    messages = image_msg(data_uri(IMAGES / "astronaut_224.png"))
    want = lib.chat(messages, max_tokens=16, temperature=0)
    r = client.chat.completions.create(model="qwen2vl", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == 16
    text, usage = stream_text(client, messages, max_tokens=16, temperature=0)
    assert text == want.text
    assert usage.prompt_tokens_details.cached_tokens == want.prompt_tokens - 1  # the same prompt again


def test_concurrent_streams_equal_alone(server, client, lib):
    convs = [
        image_msg(data_uri(IMAGES / "astronaut_224.png"), "What is in this picture?"),
        [{"role": "user", "content": "Write a haiku about rivers."}],
        image_msg(data_uri(IMAGES / "chelsea_451x300.png"), "Describe the cat."),
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}],
        image_msg(data_uri(IMAGES / "rocket_160x240.png"), "Where is it going?"),
        [{"role": "user", "content": "Count from one to ten in French, please."}],
        image_msg(data_uri(IMAGES / "camera_gray_128.png"), "Is this photo old?"),
        [{"role": "user", "content": "Name a prime number larger than one hundred."}],
    ]
    max_tokens = [12, 20, 16, 24, 12, 20, 16, 24]
    want = [lib.chat(c, max_tokens=n, temperature=0).text for c, n in zip(convs, max_tokens)]
    before = metrics(server)
    assert concurrent_streams(client, convs, max_tokens) == want
    after = metrics(server)
    steps = after["ocula_decode_steps_total"] - before["ocula_decode_steps_total"]
    assert steps < sum(max_tokens) / 2  # decode steps were shared: several sequences per forward
    assert after["ocula_active_sequences"] == 0


def test_second_turn_reuses_image_and_prefix(server, client, lib):
    img = data_uri(IMAGES / "coffee_300x200.jpg")
    turn1 = image_msg(img, "What drink is this?")
    before = metrics(server)
    r1 = client.chat.completions.create(model="qwen2vl", messages=turn1, max_tokens=8, temperature=0)
    mid = metrics(server)
    assert mid["ocula_image_cache_misses_total"] == before["ocula_image_cache_misses_total"] + 1  # encoded once
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And what colour is the cup?"}]
    r2 = client.chat.completions.create(model="qwen2vl", messages=turn2, max_tokens=8, temperature=0)
    after = metrics(server)
    assert after["ocula_image_cache_misses_total"] == mid["ocula_image_cache_misses_total"]  # not re-encoded
    assert after["ocula_image_cache_hits_total"] == mid["ocula_image_cache_hits_total"] + 1
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens  # the whole first turn (image included) was not recomputed
    assert after["ocula_prefix_cache_hit_tokens_total"] - mid["ocula_prefix_cache_hit_tokens_total"] == cached
    extra = r2.model_extra["timings"]
    assert extra["images_encoded"] == 0 and extra["images_cached"] == 1
    assert r2.choices[0].message.content == lib.chat(turn2, max_tokens=8, temperature=0).text


def test_file_url_inside_allowed_root(server, client, lib, media_root):
    messages = image_msg((media_root / "astronaut.png").as_uri())
    want = lib.chat(image_msg(data_uri(IMAGES / "astronaut_224.png")), max_tokens=6, temperature=0)
    r = client.chat.completions.create(model="qwen2vl", messages=messages, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == want.text


def test_json_schema_with_image(server, client):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"objects": {"type": "array", "items": {"enum": ["cat", "person",
              "rocket", "cup"]}, "minItems": 1, "maxItems": 3}, "outdoor": {"type": "boolean"}},
              "required": ["objects", "outdoor"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="qwen2vl", messages=image_msg(data_uri(IMAGES / "astronaut_224.png"), "List the objects as JSON."),
        max_tokens=60, temperature=0, response_format={"type": "json_schema",
                                                       "json_schema": {"name": "objects", "schema": schema}})
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"objects", "outdoor"} and isinstance(obj["outdoor"], bool)
    assert 1 <= len(obj["objects"]) <= 3 and set(obj["objects"]) <= {"cat", "person", "rocket", "cup"}


def test_disconnect_stops_generation(server):
    body = {"messages": [{"role": "user", "content": "Talk forever."}], "max_tokens": 800, "temperature": 0,
            "ignore_eos": True, "stream": True}
    before = metrics(server)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        n = 0
        for line in r.iter_lines():
            n += line.startswith("data: ")
            if n >= 4:
                break  # leave: closes the connection mid-stream
    deadline = time.time() + 10
    while time.time() < deadline:
        m = metrics(server)
        if m["ocula_active_sequences"] == 0:
            break
        time.sleep(0.1)
    m = metrics(server)
    assert m["ocula_active_sequences"] == 0
    cancelled = 'ocula_scheduler_requests_total{outcome="cancelled"}'
    assert m[cancelled] == before[cancelled] + 1
    generated = m["ocula_tokens_generated_total"] - before["ocula_tokens_generated_total"]
    assert generated < 400  # stopped long before max_tokens


def test_plain_request_stops_when_its_client_goes(server):
    """A non-streaming client that leaves while its tokens keep coming: the sequence is cancelled within a poll
    interval instead of being generated to max_tokens (before, the disconnect check ran only when no token had
    come for a while, which never happens during a generation)."""
    body = json.dumps({"messages": [{"role": "user", "content": "Talk forever."}], "max_tokens": N_CTX - 40,
                       "temperature": 0, "ignore_eos": True}).encode()
    before = metrics(server)
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host.strip("[]"), int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.time() + 10
    while time.time() < deadline and metrics(server)["ocula_tokens_generated_total"] == before["ocula_tokens_generated_total"]:
        time.sleep(0.02)
    sock.close()  # the client leaves once its tokens are coming
    deadline = time.time() + 10
    while time.time() < deadline and metrics(server)["ocula_active_sequences"] != 0:
        time.sleep(0.05)
    m = metrics(server)
    assert m["ocula_active_sequences"] == 0
    cancelled = 'ocula_scheduler_requests_total{outcome="cancelled"}'
    assert m[cancelled] == before[cancelled] + 1
    assert m["ocula_tokens_generated_total"] - before["ocula_tokens_generated_total"] < N_CTX - 40


def _bad_cases(server_url: str, media_root: Path):
    astronaut = (IMAGES / "astronaut_224.png").read_bytes()
    big = png_bytes(1200, 1000)  # 1.2 Mpx > --max-image-pixels, but few bytes
    b64 = base64.b64encode
    return [  # (id, url or content part list, status, code, text in message)
        ("file-outside-root", (IMAGES / "astronaut_224.png").as_uri(), 400, "invalid_image", "outside the allowed"),
        ("path-outside-root", "/etc/hostname", 400, "invalid_image", "outside the allowed"),
        ("dotdot-escape", (media_root / ".." / "x.png").as_uri(), 400, "invalid_image", "outside the allowed"),
        ("file-not-image", (media_root / "notes.txt").as_uri(), 400, "invalid_image", "not an image"),
        ("file-missing", (media_root / "nope.png").as_uri(), 400, "invalid_image", "not found"),
        ("loopback-url", f"{server_url}/health", 400, "invalid_image", "loopback"),
        ("localhost-url", "http://localhost/cat.png", 400, "invalid_image", "loopback"),
        ("bad-scheme", "ftp://127.0.0.1/cat.png", 400, "invalid_image", "scheme"),
        ("data-not-image", "data:text/plain;base64," + b64(b"hello").decode(), 400, "invalid_image",
         "not an image"),
        ("broken-png", "data:image/png;base64," + b64(astronaut[:2000]).decode(), 400, "invalid_image", "truncated"),
        ("garbage-base64", "data:image/png;base64,!!!notbase64!!!", 400, "invalid_image", "base64"),
        ("not-image-bytes", "data:image/png;base64," + b64(b"GIF89a" + b"\0" * 64).decode(), 400,
         "invalid_image", "invalid image"),
        ("huge-pixels", "data:image/png;base64," + b64(big).decode(), 400, "invalid_image", "too many pixels"),
        ("huge-bytes", "data:image/png;base64," + "A" * (MAX_BYTES * 2), 400, "invalid_image", "too many bytes"),
        ("raw-base64-ok-but-huge", b64(big).decode(), 400, "invalid_image", "too many pixels"),
    ]


def test_bad_media_requests(server, media_root):
    failures = []
    for case_id, url, status, code, text in _bad_cases(server.url, media_root):
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": image_msg(url), "max_tokens": 2},
                       timeout=60)
        body = r.json()
        err = body.get("error", {})
        if r.status_code != status or err.get("code") != code or text not in err.get("message", ""):
            failures.append((case_id, r.status_code, body))
        elif err.get("param") != "messages[0].content[0]":
            failures.append((case_id, "param", err.get("param")))
    assert not failures, failures
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_bad_image_requests_shape_and_limits(server):
    url = data_uri(IMAGES / "tiny_8x8.png")
    three = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 3}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": three})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_images"
    wrong = [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": wrong})
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]
    # an image that fits the pixel limit but whose tokens overflow the context: refused before it is encoded,
    # with the numbers
    big = "data:image/png;base64," + base64.b64encode(png_bytes(980, 980)).decode()
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": image_msg(big), "max_tokens": 2},
                   timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    assert f"the request's images alone need 1225 tokens but the context holds {N_CTX}" in err["message"]


def test_server_still_serves(server, client, lib):
    messages = image_msg(data_uri(IMAGES / "astronaut_224.png"), "One word?")
    r = client.chat.completions.create(model="qwen2vl", messages=messages, max_tokens=4, temperature=0)
    assert r.choices[0].message.content == lib.chat(messages, max_tokens=4, temperature=0).text
    m = metrics(server)
    assert m["ocula_active_sequences"] == 0 and m["ocula_queue_depth"] == 0
