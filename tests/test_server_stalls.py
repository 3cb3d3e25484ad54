"""No request can stall the others (issue 18 items 2 and 4), against a real `ocula serve` on the Qwen2-VL
fixture: image URLs that drip one byte a second end at the media deadline, never more than
--max-media-fetches at once, while a data-URI image request is answered at once."""
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
            "--allow-private-media", "--media-timeout", str(MEDIA_TIMEOUT), "--max-media-fetches", str(MAX_FETCHES)]
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
