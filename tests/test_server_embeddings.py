"""Embeddings on `ocula serve`: /v1/embeddings through the official `openai` client and llama-server's
/embeddings, /embedding. The vector is the model's final-normed last hidden state, pooled (last token by
default; mean / cls / none with --pooling) and L2-normalised; inputs as text, ids, mixed lists, content parts
and multimodal_data; images on the Qwen2-VL fixture; errors."""
import base64
import struct
from pathlib import Path

import pytest
import torch
from tiny import write_tiny_model

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import ocula  # noqa: E402
from ocula.models.text.base import StepInput  # noqa: E402
from ocula.server.testing import ServerProcess  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
VLM = FIXTURES / "models" / "qwen2vl" / "qwen2vl-f16.gguf"
VLM_MMPROJ = FIXTURES / "models" / "qwen2vl" / "mmproj-qwen2vl-f16.gguf"
IMAGES = FIXTURES / "images"

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEXT = "the heat in the theme"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("emb") / "tiny-emb.gguf", "llama")


@pytest.fixture(scope="module")
def lib(tiny_path):
    return ocula.load(tiny_path)


@pytest.fixture(scope="module")
def server(tiny_path):
    with ServerProcess(["-m", str(tiny_path), "--threads", "1"]) as s:
        yield s


def hidden_states(lib, ids) -> torch.Tensor:
    """The final-normed hidden states of a plain one-shot forward (no server, no chunking)."""
    with torch.inference_mode():
        x = lib.text.embed(torch.tensor(ids))[None]
        return lib.text(x, StepInput(torch.arange(len(ids)), lib.text.new_cache()))[0].float()


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=60)


def test_openai_client_last_token_pooling(server, lib):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = client.embeddings.create(model="tiny", input=[TEXT, "theme"])
    assert [d.index for d in r.data] == [0, 1]
    ids = lib.tokenize(TEXT)
    h = hidden_states(lib, ids)
    want = h[-1] / h[-1].norm()
    got = torch.tensor(r.data[0].embedding)
    assert got.shape == (lib.text.cfg.n_embd,) and abs(float(got.norm()) - 1) < 1e-4
    assert torch.allclose(got, want, atol=1e-4)
    # it is the state the next-token logits come from
    assert int(lib.text.logits(got).argmax()) == int(lib.logits(ids).argmax())
    assert r.usage.prompt_tokens == len(ids) + len(lib.tokenize("theme"))
    # the same vector alone, as base64 float32, and through the un-prefixed OpenAI route
    one = client.embeddings.create(model="tiny", input=TEXT).data[0].embedding
    assert torch.allclose(torch.tensor(one), got, atol=1e-6)
    b64 = post(server, "/v1/embeddings", {"input": TEXT, "encoding_format": "base64"}).json()["data"][0]["embedding"]
    raw = base64.b64decode(b64)
    assert torch.allclose(torch.tensor(struct.unpack(f"<{len(raw) // 4}f", raw)), got, atol=1e-6)
    plain = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=60)
    assert torch.allclose(torch.tensor(plain.embeddings.create(model="tiny", input=TEXT).data[0].embedding), got,
                          atol=1e-6)


def test_input_shapes_agree(server, lib):
    ids = lib.tokenize(TEXT)
    base = post(server, "/v1/embeddings", {"input": TEXT}).json()["data"][0]["embedding"]
    shapes = [ids, [ids], {"content": [{"type": "text", "text": TEXT[:7]}, {"type": "text", "text": TEXT[7:]}]},
              {"prompt_string": TEXT}, ids[:2] + [lib.detokenize(ids[2:])]]
    for shape in shapes:
        got = post(server, "/v1/embeddings", {"input": shape}).json()["data"][0]["embedding"]
        assert torch.allclose(torch.tensor(got), torch.tensor(base), atol=1e-5), shape
    native = post(server, "/embeddings", {"content": TEXT}).json()
    assert isinstance(native, list) and native[0]["index"] == 0
    assert torch.allclose(torch.tensor(native[0]["embedding"][0]), torch.tensor(base), atol=1e-6)
    assert post(server, "/embedding", {"input": [TEXT, "x"]}).json()[1]["index"] == 1


@pytest.mark.parametrize("body,text", [
    ({"input": []}, "empty list"),
    ({"input": ""}, "empty"),
    ({"input": {"content": "text"}}, "must be a list of parts"),
    ({"input": {"content": [{"type": "input_audio", "input_audio": {}}]}}, "'input_audio' cannot be embedded"),
    ({"input": {"content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}},
     "does not take images"),
    ({"input": [1, 999999]}, "outside the vocabulary"),
    ({"input": "the " * 300}, "too large"),  # tokenized: 301 tokens > 256
    ({"input": "the " * 5000}, "too large"),  # refused from its length alone
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "dimensions": 3}, "dimensions"),
    ({"model": "x"}, "'input'"),
])
def test_errors(server, body, text):
    r = post(server, "/v1/embeddings", body)
    assert r.status_code == 400, r.text
    assert text in r.json()["error"]["message"]
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_mean_and_none_pooling(tiny_path, lib):
    ids = lib.tokenize(TEXT)
    h = hidden_states(lib, ids)
    with ServerProcess(["-m", str(tiny_path), "--threads", "1", "--pooling", "mean"]) as s:
        got = torch.tensor(post(s, "/v1/embeddings", {"input": TEXT}).json()["data"][0]["embedding"])
        mean = h.mean(0)
        assert torch.allclose(got, mean / mean.norm(), atol=1e-4)
    with ServerProcess(["-m", str(tiny_path), "--threads", "1", "--pooling", "none"]) as s:
        per_token = post(s, "/embeddings", {"input": TEXT}).json()[0]["embedding"]
        assert len(per_token) == len(ids)
        assert torch.allclose(torch.tensor(per_token), h, atol=1e-4)  # one unnormalised vector per token
        r = post(s, "/v1/embeddings", {"input": TEXT})
        assert r.status_code == 400 and "pooling 'none'" in r.json()["error"]["message"]


@pytest.mark.skipif(not (VLM.exists() and VLM_MMPROJ.exists()), reason=f"shared Qwen2-VL fixture not under {FIXTURES}")
def test_image_embeddings():
    def uri(name):
        return "data:image/png;base64," + base64.b64encode((IMAGES / name).read_bytes()).decode()

    def b64(name):
        return base64.b64encode((IMAGES / name).read_bytes()).decode()

    with ServerProcess(["-m", str(VLM), "--mmproj", str(VLM_MMPROJ), "-c", "1024", "--threads", "1"]) as s:
        def parts(name):
            return {"content": [{"type": "text", "text": "A picture: "},
                                {"type": "image_url", "image_url": {"url": uri(name)}}]}

        r = post(s, "/v1/embeddings", {"input": [parts("astronaut_224.png"), parts("astronaut_224.png"),
                                                 parts("rocket_160x240.png"), "A picture: "]})
        assert r.status_code == 200, r.text
        v = [torch.tensor(d["embedding"]) for d in r.json()["data"]]
        assert torch.equal(v[0], v[1])  # stable
        assert not torch.allclose(v[0], v[2], atol=1e-3) and not torch.allclose(v[0], v[3], atol=1e-3)
        assert r.json()["usage"]["prompt_tokens"] > 4 * 3  # image tokens count
        native = post(s, "/embeddings", {"content": [
            {"prompt_string": "A picture: <__media__>", "multimodal_data": [b64("astronaut_224.png")]}]}).json()
        assert torch.allclose(torch.tensor(native[0]["embedding"][0]), v[0], atol=1e-5)
        r = post(s, "/embeddings", {"content": [{"prompt_string": "<__media__>", "multimodal_data": ["bm9wZQ=="]}]})
        assert r.status_code == 400 and "multimodal_data[0]" in r.json()["error"]["message"]


def test_input_of_wrong_type(server):
    r = post(server, "/v1/embeddings", {"input": 5})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("input must be")
    r = post(server, "/embeddings", {"content": 5})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400
