"""JSON output (response_format) on both vocabulary kinds: SentencePiece with a space prefix (the llama and llava
fixtures: Llama-2 / LLaVA-1.5 tokenizers) and byte-level BPE (qwen2vl). The text the grammar forces is tokenized
to exactly its bytes, so every answer parses; a matcher failure is a one-line error without llguidance's state."""
import json

import pytest
from conftest import needs_shared
from tiny import FIXTURES

import ocula
from ocula.engine import structured

pytestmark = [needs_shared, pytest.mark.skipif(not structured.available(), reason="llguidance not installed")]
MODELS = {"llama": "models/llama/llama-f16.gguf", "llava": "models/llava/llava-f16.gguf",
          "qwen2vl": "models/qwen2vl/qwen2vl-f16.gguf"}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "population": {"type": "integer"}},
          "required": ["city", "population"], "additionalProperties": False}


def load(name):
    path = FIXTURES / MODELS[name]
    if not path.exists():
        pytest.skip(f"{path} not found")
    return ocula.load(path)


@pytest.mark.parametrize("name", MODELS)
def test_encode_exact_spells_the_bytes(name):
    tok = load(name).tokenizer
    for text in ['"', ' "', '{"a": 1}', "  two  spaces ", "é€😀", "\n\t x", "<s>", "[1,2]"]:
        ids = tok.encode_exact(text)
        assert b"".join(tok.token_to_bytes(i) for i in ids) == text.encode(), text


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
def test_json_answers_parse(name, kind):
    model = load(name)
    rf = ({"type": "json_object"} if kind == "json_object"
          else {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}})
    out = model.chat([{"role": "user", "content": "A city as JSON."}], max_tokens=200, temperature=0,
                     response_format=rf)
    if out.finish_reason == "stop":
        obj = json.loads(out.text)
        assert isinstance(obj, dict)
        if kind == "json_schema":
            assert set(obj) == {"city", "population"} and isinstance(obj["population"], int)
    else:  # a random model may run out of tokens inside a string; what it wrote is still a valid prefix
        assert out.finish_reason == "length" and out.text.startswith("{")


def test_matcher_failure_is_one_clean_line():
    err = structured._failure('Parser Error: token " {" doesn\'t satisfy the grammar\n<state>\nTokens: ...'
                              '\n<backtrace>\n 0: <unknown>')
    assert str(err) == 'constrained decoding failed: Parser Error: token " {" doesn\'t satisfy the grammar'
