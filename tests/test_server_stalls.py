"""No request can stall the others (issue 18 items 2 and 4), against a real `ocula serve` on the Qwen2-VL
fixture: image URLs that drip one byte a second end at the media deadline, never more than
--max-media-fetches at once, while a data-URI image request is answered at once; a large image encodes on
the image worker while a text request is answered; images over the per-request token total get a 400
before any is encoded."""
from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from ocula.server.testing import ServerProcess  # noqa: E402
from slow_peers import DripServer  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
MODEL = FIXTURES / "models" / "qwen2vl" / "qwen2vl-f16.gguf"
MMPROJ = FIXTURES / "models" / "qwen2vl" / "mmproj-qwen2vl-f16.gguf"
IMAGES = FIXTURES / "images"

pytestmark = pytest.mark.skipif(not (MODEL.exists() and MMPROJ.exists()),
                                reason=f"shared Qwen2-VL fixture not found under {FIXTURES}")

MEDIA_TIMEOUT = 2.0
MAX_FETCHES = 4


@pytest.fixture(scope="module")
def server():
    args = ["-m", str(MODEL), "--mmproj", str(MMPROJ), "-c", "8192", "-t", "1", "--parallel", "4",
            "--allow-private-media", "--media-timeout", str(MEDIA_TIMEOUT), "--max-media-fetches", str(MAX_FETCHES),
            "--max-image-tokens-per-request", "6000"]
    with ServerProcess(args) as s:
        r, _ = chat(s, image_content(data_uri(IMAGES / "astronaut_224.png")))  # warm-up: kernels compile
        assert r.status_code == 200, r.text
        yield s


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


# one client for every request: making an httpx client per request costs tens of ms of the test's own CPU
CLIENT = httpx.Client(limits=httpx.Limits(max_connections=100, max_keepalive_connections=0))


def chat(server, content, timeout: float = 60.0, **extra) -> tuple[httpx.Response, float]:
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0,
            **extra}
    t0 = time.monotonic()
    r = CLIENT.post(server.url + "/v1/chat/completions", json=body, timeout=timeout)
    return r, time.monotonic() - t0


def image_content(url: str, text: str = "What is this?") -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


def test_dripping_urls_end_at_the_deadline_and_do_not_delay_a_data_uri_image(server):
    n_slow = 24
    with DripServer("headers", interval=1.0) as drip:
        results: list = [None] * n_slow

        def slow(i):
            results[i] = chat(server, image_content(drip.url(f"/img{i}.png")), timeout=30)

        threads = [threading.Thread(target=slow, args=(i,)) for i in range(n_slow)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the fetches are under way
        r, took = chat(server, image_content(data_uri(IMAGES / "astronaut_224.png")), timeout=30)
        assert r.status_code == 200, r.text
        assert took < MEDIA_TIMEOUT, f"a data-URI image waited {took:.1f} s behind the slow URLs"
        for t in threads:
            t.join(40)
        # +1: the peer notices a closed connection a moment after the server has already started the next fetch
        assert drip.most_open <= MAX_FETCHES + 1, drip.most_open
    for r, took in results:
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_image" and "timed out after 2 s" in err["message"], err
        assert took < MEDIA_TIMEOUT + 1.0, f"a dripping URL held its request {took:.1f} s"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def pattern_png(side: int, seed: int = 0) -> str:
    """A side x side PNG data URI (a smooth pattern: small to send, as costly to encode as any image)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side]
    rgb = np.stack([(x * 7 + seed) % 256, (y * 5) % 256, ((x + y) * 3 + seed * 11) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_a_large_image_encodes_while_a_text_request_is_answered(server):
    """A 2000x2000 image is capped at the server's default 4096 tokens per image (the processor's own default:
    5041) and takes seconds to encode; a text request sent meanwhile is answered within a second or two, and
    the image's timings report the encode as image_ms, not as queue time."""
    big: dict = {}
    content = image_content(pattern_png(2000), "Describe it.")

    def send_big():
        big["r"], big["took"] = chat(server, content)
        big["done"] = time.monotonic()

    t = threading.Thread(target=send_big)
    t.start()
    time.sleep(1.0)  # the image is encoding now
    r, took = chat(server, "Say hi.")
    text_done = time.monotonic()
    t.join(120)
    assert r.status_code == 200, r.text
    assert big["r"].status_code == 200, big["r"].text
    timings = big["r"].json()["timings"]
    assert timings["image_tokens"] == 4096
    assert text_done < big["done"] - 1.0, "the image request was not encoding while the text one ran"
    # before the image worker, the text request waited for the whole encode (here: seconds)
    assert took < min(3.0, timings["image_ms"] / 1000 / 2), f"a text request waited {took:.1f} s ({timings})"
    assert timings["queue_ms"] < 1000, timings


def test_images_over_the_per_request_total_are_refused_before_encoding(server):
    content = [{"type": "image_url", "image_url": {"url": pattern_png(2000, seed)}} for seed in (1, 2)]
    content.append({"type": "text", "text": "Compare them."})
    r, took = chat(server, content)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "too_many_image_tokens", err
    assert "need 8192 image tokens (4096 + 4096), more than the 6000 allowed per request" in err["message"]
    assert took < 3.0, f"refusing took {took:.1f} s: were the images encoded first?"
    # a request may lower its own per-image budget to fit
    r, _ = chat(server, content, image_max_tokens=1024)
    assert r.status_code == 200, r.text
    assert r.json()["timings"]["image_tokens"] == 2048


def test_the_default_image_cap_lowers_but_never_raises():
    import ocula
    from ocula.server.image_budget import image_max_tokens

    qwen = ocula.load(MODEL, mmproj=MMPROJ)
    assert qwen.vision.vision.default_max_tokens == 16384  # the Qwen2-VL processor's own default
    assert image_max_tokens(qwen, None, None) == 4096  # the server's default cap
    assert image_max_tokens(qwen, 1000, None) == 1000 and image_max_tokens(qwen, 1000, 20000) == 20000
    internvl = FIXTURES / "models" / "internvl"
    if (internvl / "internvl-f16.gguf").exists():
        m = ocula.load(internvl / "internvl-f16.gguf", mmproj=internvl / "mmproj-internvl-f16.gguf")
        own = m.vision.vision.default_max_tokens  # 12 tiles + thumbnail: a max_tokens above it adds tiles
        assert own < 4096 and image_max_tokens(m, None, None) == own
