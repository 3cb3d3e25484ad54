"""`ocula serve` with a Mixture-of-Experts vision model (the qwen3vlmoe fixture pair from ../shared): simultaneous
streams, mixed text and image, get what each gets alone while sharing decode steps (the C step groups the batch's
tokens by expert); a second turn re-sending the image reuses its embedding and the KV prefix; JSON output."""
import json

import pytest
# `client` is a fixture: the OpenAI client of whichever `server` the test module defines
from test_server_vision import FIXTURES, IMAGES, client, concurrent_streams, data_uri, image_msg, metrics  # noqa: F401

import ocula
from ocula.server.testing import ServerProcess

MODEL = FIXTURES / "models" / "qwen3vlmoe" / "qwen3vlmoe-f16.gguf"
MMPROJ = FIXTURES / "models" / "qwen3vlmoe" / "mmproj-qwen3vlmoe-f16.gguf"
N_CTX = 1024

pytestmark = [pytest.mark.skipif(not (MODEL.exists() and MMPROJ.exists()),
                                 reason=f"shared qwen3vlmoe fixture not found under {FIXTURES}"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["-m", str(MODEL), "--mmproj", str(MMPROJ), "-c", str(N_CTX), "--parallel", "4"]) as s:
        yield s


@pytest.fixture(scope="module")
def lib():
    return ocula.load(MODEL, mmproj=MMPROJ, n_ctx=N_CTX)


def test_concurrent_moe_streams_equal_alone(server, client, lib):
    convs = [
        image_msg(data_uri(IMAGES / "astronaut_224.png"), "What is in this picture?"),
        [{"role": "user", "content": "Write a haiku about rivers."}],
        image_msg(data_uri(IMAGES / "chelsea_451x300.png"), "Describe the cat."),
        [{"role": "user", "content": "Name a prime number larger than one hundred."}],
    ]
    max_tokens = [12, 16, 12, 16]
    want = [lib.chat(c, max_tokens=n, temperature=0).text for c, n in zip(convs, max_tokens)]
    before = metrics(server)
    assert concurrent_streams(client, convs, max_tokens) == want
    after = metrics(server)
    assert after["ocula_decode_steps_total"] - before["ocula_decode_steps_total"] < sum(max_tokens) / 2


def test_second_turn_reuses_image_and_prefix(server, client, lib):
    turn1 = image_msg(data_uri(IMAGES / "coffee_300x200.jpg"), "What drink is this?")
    r1 = client.chat.completions.create(model="m", messages=turn1, max_tokens=8, temperature=0)
    mid = metrics(server)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And what colour is the cup?"}]
    r2 = client.chat.completions.create(model="m", messages=turn2, max_tokens=8, temperature=0)
    after = metrics(server)
    assert after["ocula_image_cache_misses_total"] == mid["ocula_image_cache_misses_total"]
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    assert r2.choices[0].message.content == lib.chat(turn2, max_tokens=8, temperature=0).text


def test_json_schema(server, client):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"animal": {"enum": ["cat", "dog"]}, "count": {"type": "integer"}},
              "required": ["animal", "count"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="m", messages=image_msg(data_uri(IMAGES / "chelsea_451x300.png"), "Answer as JSON."), max_tokens=40,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    obj = json.loads(r.choices[0].message.content)
    assert obj["animal"] in ("cat", "dog") and isinstance(obj["count"], int)
