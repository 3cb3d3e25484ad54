"""Text decoders of the shared fixtures' VLMs against Hugging Face on TEXT-ONLY prompts (no mmproj loaded).

The fixtures' own references all have images, so these check every text architecture independently of vision:
qwen2vl, qwen25vl (M-RoPE), qwen3vl (interleaved M-RoPE, q/k norm), gemma3, internvl (qwen2), smolvlm and
llava (llama).  References: `tests/data/text_only/<model>.npz`, written by `scripts/make_text_only_references.py`
(HF transformers 5.24, float32, eager; see that script for how the HF models were built and validated).

Per model and prompt (0 = chat template, 1 = raw text with unicode/digits/newlines): prompt ids equal HF's;
last-position logits within atol 1e-3 with the same argmax; greedy tokens (EOS does not stop) equal up to the
first step whose HF top1-top2 margin is below 1e-3.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

import ocula

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
DATA = Path(__file__).resolve().parent / "data" / "text_only"
MODELS = ["qwen2vl", "qwen25vl", "qwen3vl", "gemma3", "internvl", "smolvlm", "llava"]
PROMPTS = [0, 1]
LOGITS_ATOL = 1e-3
MARGIN_FLOOR = 1e-3  # greedy steps whose HF top1-top2 margin is below this are numerically ambiguous

pytestmark = pytest.mark.skipif(
    not FIXTURES.exists(),
    reason=f"shared fixtures not found at {FIXTURES} (they sit beside the checkout in CI)",
)

CASES = [(m, k) for m in MODELS for k in PROMPTS]  # grouped by model: each model is loaded once
IDS = [f"{m}-{'chat' if k == 0 else 'raw'}" for m, k in CASES]


@lru_cache(maxsize=None)  # the three tests run in turn over all cases: keep every (small) model loaded once
def load(name: str):
    return ocula.load(FIXTURES / "models" / name / f"{name}-f16.gguf", dtype="float32")


@lru_cache(maxsize=None)
def reference(name: str) -> dict:
    with np.load(DATA / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


@lru_cache(maxsize=None)
def ocula_logits(name: str, k: int) -> np.ndarray:
    return load(name).logits(reference(name)[f"input_ids_{k}"].tolist()).numpy()


@pytest.mark.parametrize("name, k", CASES, ids=IDS)
def test_prompt_ids(name, k):
    model, ref = load(name), reference(name)
    want = ref[f"input_ids_{k}"].tolist()
    # the prompt string as HF tokenized it (BOS, where needed, is written literally)
    assert model.tokenize(str(ref[f"prompt_{k}"]), add_special=False) == want
    if k == 0:  # ocula renders the GGUF's chat template itself
        messages = json.loads(str(ref[f"messages_json_{k}"]))
        assert model.prompt_token_ids(messages) == want
    else:  # raw text with the GGUF's own add_bos/add_eos
        assert model.tokenize(str(ref[f"raw_text_{k}"])) == want


@pytest.mark.parametrize("name, k", CASES, ids=IDS)
def test_logits(name, k):
    ref = reference(name)
    want = ref[f"logits_last_{k}"]
    got = ocula_logits(name, k)
    assert got.shape == want.shape
    err = float(np.abs(got - want).max())
    assert err <= LOGITS_ATOL, f"max |Δlogit| {err:.3g} (logit std {want.std():.2f})"
    assert got.argmax() == want.argmax()


@pytest.mark.parametrize("name, k", CASES, ids=IDS)
def test_greedy(name, k):
    model, ref = load(name), reference(name)
    want = ref[f"greedy_tokens_{k}"].tolist()
    margins = ref[f"greedy_margins_{k}"].tolist()
    checkable = next((i for i, m in enumerate(margins) if m < MARGIN_FLOOR), len(want))
    out = model.generate(ref[f"input_ids_{k}"].tolist(), max_tokens=len(want), temperature=0, ignore_eos=True)
    got = out.token_ids
    prefix = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert prefix >= checkable, f"greedy diverges at step {prefix} (checkable {checkable}): {got} vs {want}"
