"""Text decoders against Hugging Face references from ../shared (llama fixture, f16 and quantized)."""
import json

import numpy as np
import pytest
from conftest import needs_shared
from tiny import FIXTURES

import ocula

pytestmark = needs_shared

LLAMA_VARIANTS = [
    ("llama-f16.gguf", "llama_text.npz"),
    ("llama-Q8_0.gguf", "llama_text.Q8_0.npz"),
    ("llama-Q4_K_M.gguf", "llama_text.Q4_K_M.npz"),
]


@pytest.fixture(scope="module")
def llama_case():
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    return next(c for c in manifest["cases"] if c["id"] == "llama_text")


@pytest.mark.parametrize("gguf_name, ref_name", LLAMA_VARIANTS)
def test_llama_logits_and_greedy(gguf_name, ref_name, llama_case):
    ref = np.load(FIXTURES / "reference" / ref_name)
    model = ocula.load(FIXTURES / "models/llama" / gguf_name, dtype="float32")
    ids = ref["input_ids"].tolist()
    # the prompt as HF tokenized it (the template writes BOS literally)
    assert model.tokenize(llama_case["prompt"], add_special=False) == ids
    messages = [{"role": "user", "content": llama_case["question"]}]
    assert model.prompt_token_ids(messages) == ids

    logits = model.logits(ids).numpy()
    assert logits.shape == ref["logits_last"].shape
    np.testing.assert_allclose(logits, ref["logits_last"], rtol=0, atol=1e-3)
    assert logits.argmax() == ref["logits_last"].argmax()

    out = model.generate(ids, max_tokens=16, temperature=0, ignore_eos=True)
    assert out.token_ids == ref["greedy_tokens"].tolist()


def test_chat_equals_raw_prompt(llama_case):
    model = ocula.load(FIXTURES / "models/llama/llama-f16.gguf")
    ref = np.load(FIXTURES / "reference/llama_text.npz")
    out = model.chat([{"role": "user", "content": llama_case["question"]}], max_tokens=16, temperature=0, ignore_eos=True)
    assert out.token_ids == ref["greedy_tokens"].tolist()
    assert out.prompt_tokens == len(ref["input_ids"])
    assert out.text == model.detokenize(out.token_ids)
