"""`ocula serve` with video (the Qwen2-VL fixture pair and a fixture clip): `video_url` parts (data URI, file:// under
the allowed path) through the official `openai` client answer as the library does; llama.cpp's `input_video` part
(object and string forms) gives the same answer; a second turn re-sending the clip reuses its embedding and the KV
prefix (cached tokens); bad clips and options are OpenAI-style 400s."""
import base64
import shutil
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("av")

import ocula  # noqa: E402
from ocula.server.testing import ServerProcess  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
MODEL = FIXTURES / "models" / "qwen2vl" / "qwen2vl-f16.gguf"
MMPROJ = FIXTURES / "models" / "qwen2vl" / "mmproj-qwen2vl-f16.gguf"
CLIP = FIXTURES / "video" / "clips" / "a_coffee_zoom_30fps.mp4"
OPTIONS = {"do_sample_frames": True, "fps": 2}  # 4 frames of the 1.5 s clip: 2 temporal slots

pytestmark = [pytest.mark.skipif(not (MODEL.exists() and MMPROJ.exists() and CLIP.exists()),
                                 reason=f"shared Qwen2-VL fixture or video clip not found under {FIXTURES}"),
              pytest.mark.usefixtures("one_torch_thread")]

N_CTX = 1024


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def video_msg(part: dict, text: str = "What happens in this clip?") -> list[dict]:
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    shutil.copy(CLIP, root / "coffee.mp4")
    (root / "notes.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def server(media_root):
    args = ["-m", str(MODEL), "--mmproj", str(MMPROJ), "-c", str(N_CTX), "--allowed-media-path", str(media_root),
            "--allow-private-media", "--max-video-bytes", "100000"]
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


def test_video_url_equals_library_and_second_turn_is_cached(server, client, lib):
    part = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(CLIP)}}
    turn1 = video_msg(part)
    want = lib.chat(video_msg({"type": "video", "video": str(CLIP)}), video_options=OPTIONS, max_tokens=8,
                    temperature=0)
    before = metrics(server)
    r1 = client.chat.completions.create(model="qwen2vl", messages=turn1, max_tokens=8, temperature=0,
                                        extra_body={"video_options": OPTIONS})
    mid = metrics(server)
    assert r1.choices[0].message.content == want.text
    assert r1.usage.prompt_tokens == want.prompt_tokens
    assert mid["ocula_image_cache_misses_total"] == before["ocula_image_cache_misses_total"] + 1
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And what colour is the cup?"}]
    r2 = client.chat.completions.create(model="qwen2vl", messages=turn2, max_tokens=8, temperature=0,
                                        extra_body={"video_options": OPTIONS})
    after = metrics(server)
    assert after["ocula_image_cache_misses_total"] == mid["ocula_image_cache_misses_total"]  # not re-encoded
    assert after["ocula_image_cache_hits_total"] == mid["ocula_image_cache_hits_total"] + 1
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens  # the video's turn reused
    libturn2 = video_msg({"type": "video", "video": str(CLIP)}) + turn2[1:]
    assert r2.choices[0].message.content == lib.chat(libturn2, video_options=OPTIONS, max_tokens=8,
                                                     temperature=0).text


def test_video_modality_is_reported(server):
    assert httpx.get(server.url + "/props").json()["modalities"]["video"] is True
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["modalities"]["video"] is True


def test_input_video_and_file_url_forms(server, client, media_root):
    answers = set()
    for part in ({"type": "input_video", "input_video": {"data": b64(CLIP), "format": "mp4"}},
                 {"type": "input_video", "input_video": b64(CLIP)},
                 {"type": "video_url", "video_url": {"url": (media_root / "coffee.mp4").as_uri()}}):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "messages": video_msg(part), "max_tokens": 6, "temperature": 0, "video_options": OPTIONS})
        assert r.status_code == 200, r.text
        answers.add(r.json()["choices"][0]["message"]["content"])
    assert len(answers) == 1


@pytest.fixture(scope="module")
def http_root(media_root):
    """A loopback HTTP server over the media directory (and a clip too big for --max-video-bytes)."""
    import functools
    import http.server
    import threading

    (media_root / "big.mp4").write_bytes(CLIP.read_bytes() * 5)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media_root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_http_video_url(server, client, http_root, lib):
    want = lib.chat(video_msg({"type": "video", "video": str(CLIP)}), video_options=OPTIONS, max_tokens=6,
                    temperature=0)
    r = client.chat.completions.create(model="qwen2vl", max_tokens=6, temperature=0,
                                       messages=video_msg({"type": "video_url",
                                                           "video_url": {"url": http_root + "/coffee.mp4"}}),
                                       extra_body={"video_options": OPTIONS})
    assert r.choices[0].message.content == want.text
    with pytest.raises(openai.BadRequestError, match="too many bytes"):
        client.chat.completions.create(model="qwen2vl", max_tokens=2, extra_body={"video_options": OPTIONS},
                                       messages=video_msg({"type": "video_url",
                                                           "video_url": {"url": http_root + "/big.mp4"}}))


@pytest.mark.parametrize("part, options, code, needle", [
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(b"x" * 300).decode()}},
     None, "invalid_video", "not a video"),
    ({"type": "video_url", "video_url": {"url": "file:///etc/passwd"}}, None, "invalid_video", "outside the allowed"),
    ({"type": "video_url", "video_url": {"url": "NOTES"}}, None, "invalid_video", "not a video"),
    ({"type": "video_url", "video_url": {"url": "CLIP"}}, {"fps": -1}, "invalid_value", "fps must be a positive"),
    ({"type": "video_url", "video_url": {"url": "CLIP"}}, {"frames_per_second": 2}, "invalid_value", "unknown video"),
    ({"type": "video_url", "video_url": {"url": "CLIP"}}, {"max_tokens": 10}, None, "more than max_tokens 10"),
])
def test_bad_videos_are_400(server, media_root, part, options, code, needle):
    url = part["video_url"]["url"]
    url = {"NOTES": (media_root / "notes.txt").as_uri(), "CLIP": (media_root / "coffee.mp4").as_uri()}.get(url, url)
    body = {"messages": video_msg({"type": "video_url", "video_url": {"url": url}}), "max_tokens": 4}
    if options is not None:
        body["video_options"] = options
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"]
    if code:
        assert err["code"] == code
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
