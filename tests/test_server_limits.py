"""The default request-body limit is sized from the context and the inline-media allowance (#18 item 3): a body
that cannot fit is refused with 413 before it is read in full, instead of allowing ~214 MB of anything."""
import pytest

from ocula.server.config import ServerConfig
from tiny import write_tiny_model

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from ocula.server.testing import ServerProcess  # noqa: E402


def test_default_body_limit_is_the_context_text_plus_the_media_allowance():
    cfg = ServerConfig(max_request_media_bytes=3 * 1024 * 1024)
    assert cfg.body_limit(4096 * 16) == 6 * 4096 * 16 + 4 * 1024 * 1024 + 1024 * 1024
    assert ServerConfig().body_limit(32768 * 32) < 50 * 1024 * 1024  # was 214 MB whatever the context
    assert ServerConfig(max_body_bytes=1000).body_limit(10**9) == 1000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("lim") / "tiny-llama.gguf", "llama")
    with ServerProcess(["-m", str(path), "-c", "256", "--max-request-media-bytes", "1M"]) as s:
        yield s


def test_a_body_beyond_the_default_limit_is_refused_with_the_reason(server):
    big = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 4_000_000}}]}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=big, timeout=30)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "--max-request-media-bytes" in err["message"]
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    ok = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200, ok.text
