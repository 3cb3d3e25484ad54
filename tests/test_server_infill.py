"""llama-server's POST /infill on `ocula serve`: the fill-in-the-middle prompt is laid out with the model's
FIM tokens (repository-level with repo / file-separator tokens) and answered as /completion answers; a model
without FIM tokens gets 501."""
import pytest
import tiny
from tiny import write_tiny_model

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import ocula  # noqa: E402
from ocula.server.testing import ServerProcess  # noqa: E402

FIM = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|repo_name|>", "<|file_sep|>"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fim_path(tmp_path_factory):
    # the FIM tokens go before the three chat specials, which keep their roles (BOS n-3, EOS n-1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiny, "SPECIALS", FIM + tiny.SPECIALS)
        return write_tiny_model(tmp_path_factory.mktemp("fim") / "tiny-fim.gguf", "qwen2")


@pytest.fixture(scope="module")
def lib(fim_path):
    return ocula.load(fim_path)


@pytest.fixture(scope="module")
def server(fim_path):
    with ServerProcess(["-m", str(fim_path), "--threads", "1"]) as s:
        yield s


def test_infill_layout_and_answer(server, lib):
    pre, suf, mid, rep, sep = (lib.tokenizer.token_id(t) for t in FIM)

    def text(s):
        return lib.tokenize(s, add_special=False, parse_special=False)

    body = {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n    return c\n", "prompt": "c =",
            "input_extra": [{"filename": "util.py", "text": "the heat"}], "n_predict": 6, "temperature": 0,
            "return_tokens": True}
    r = httpx.post(server.url + "/infill", json=body, timeout=60)
    assert r.status_code == 200, r.text
    want_ids = ([rep] + text("myproject\n") + [sep] + text("util.py\n") + text("the heat") + [sep]
                + text("filename\n") + [pre] + text(body["input_prefix"]) + text("c =") + [suf]
                + text(body["input_suffix"]) + [mid])
    want = lib.generate(want_ids, max_tokens=6, temperature=0)
    b = r.json()
    assert b["tokens_evaluated"] == len(want_ids) and b["content"] == want.text and b["tokens"] == want.token_ids
    assert b["prompt"].startswith("<|repo_name|>myproject\n<|file_sep|>util.py\nthe heat<|file_sep|>filename\n")
    assert b["prompt"].endswith("<|fim_suffix|>\n    return c\n<|fim_middle|>")
    r = httpx.post(server.url + "/infill", json={"input_prefix": 5}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == 400


@pytest.mark.parametrize("chunk", [{}, {"filename": "ok"}, {"filename": 123}, {"filename": 123, "text": "abc"},
                                   {"filename": 123, "text": 456}, "text"])
def test_bad_input_extra_is_a_400(server, chunk):
    """As llama-server: every input_extra chunk needs a string text; a file name, when given, is a string."""
    r = httpx.post(server.url + "/infill", json={"input_extra": [chunk], "input_prefix": "a", "prompt": "b",
                                                  "input_suffix": "c"}, timeout=60)
    assert r.status_code == 400 and "input_extra[0]" in r.json()["error"]["message"], r.text


def test_no_fim_tokens_is_501(tmp_path):
    plain = write_tiny_model(tmp_path / "plain.gguf", "llama")
    with ServerProcess(["-m", str(plain), "--threads", "1"]) as s:
        bad = httpx.post(s.url + "/infill", json={"input_extra": [{}], "input_prefix": "a"}, timeout=60)
        r = httpx.post(s.url + "/infill", json={"input_prefix": "a", "input_suffix": "b"}, timeout=60)
    assert bad.status_code == 400  # the request is checked before the model's FIM tokens
    assert r.status_code == 501 and "no fill-in-the-middle tokens" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "not_supported_error"
