"""Gemma 3 vision (projector type "gemma3") against the Hugging Face references in the shared fixtures.

Preprocessing (HF Gemma3ImageProcessorPil), encoder + projector features from HF's pixels, the text model fed with
our features (bidirectional image attention), and the chat template. Prompt ids, logits and greedy tokens through
the public API are checked for every case in test_fixture_cases.py.
"""
import numpy as np
import pytest
import torch
from conftest import needs_set_a
from parity import (case_messages, cases_of, check_encoder, check_preprocess, model_for, open_image, reference,
                    vision_for)

from ocula.models.vision.base import ImageOptions, ProcessedImage

pytestmark = needs_set_a("gemma3")

CASES = cases_of("gemma3")
CASE_IDS = [c["id"] for c in CASES]


@pytest.fixture(scope="module")
def vision():
    return vision_for("gemma3")


# ---------------------------------------------------------------- structure


def test_geometry_and_prompt(vision):
    from ocula.models.vision.gemma3 import Gemma3Vision

    assert isinstance(vision, Gemma3Vision)
    assert vision.placeholder == "<start_of_image>" and vision.image_token == "<image_soft_token>"
    assert vision.bidirectional and not vision.mrope
    # 224 px / 14 = 16 patches per side, 4x4 average pool -> 4x4 = 16 tokens (HF mm_tokens_per_image)
    assert (vision.side, vision.pool, vision.tokens_side) == (16, 4, 4)
    text = vision.prompt_text(ProcessedImage(torch.zeros(1, 3, 224, 224), 16))
    assert text == "\n\n<start_of_image>" + "<image_soft_token>" * 16 + "<end_of_image>\n\n"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_chat_template_renders_hf_prompt(case):
    assert model_for("gemma3").apply_chat_template(case_messages(case)) == case["prompt"]


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_preprocess_parity(case, vision):
    check_preprocess(vision, case)


def test_token_budget_options_do_not_apply(vision):
    """Gemma 3 has a fixed token count: min/max token budgets leave the output unchanged."""
    img = open_image(CASES[0]["images"][0])
    base = vision.preprocess(img, ImageOptions())
    for opts in (ImageOptions(1, 4), ImageOptions(64, 4096), ImageOptions(None, 8)):
        p = vision.preprocess(img, opts)
        assert p.n_tokens == base.n_tokens
        assert torch.equal(p.pixel_values, base.pixel_values)


# ---------------------------------------------------------------- encoder + projector


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_encoder_parity(case, vision):
    check_encoder(vision, case)


# ---------------------------------------------------------------- text model fed with our features


@torch.inference_mode()
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_logits_with_features(case, vision):
    """HF input ids + our features + bidirectional image span → HF last logits."""
    from ocula.engine.prompt import ImageSpan, Prompt
    from ocula.models.text.base import StepInput

    text_model = model_for("gemma3").text
    ref = reference(case)
    ids = ref["input_ids"].tolist()
    image_id = int(ref["image_token_id"])
    feats = vision.encode(ProcessedImage(torch.from_numpy(ref["proc_pixel_values"]), vision.tokens_side ** 2))
    start = ids.index(image_id)
    assert ids[start : start + feats.shape[0]] == [image_id] * feats.shape[0]
    prompt = Prompt(ids, torch.arange(len(ids)), len(ids),
                    [ImageSpan(start, feats, "k", None, vision.bidirectional)])
    x = text_model.embed(torch.tensor(ids))
    x[start : start + feats.shape[0]] = feats
    cache = text_model.new_cache()
    hidden = text_model(x[None], StepInput(prompt.positions, cache, prompt.groups(0, len(ids))))[0, -1]
    logits = text_model.logits(hidden)
    np.testing.assert_allclose(logits.numpy(), ref["logits_last"], rtol=0, atol=1e-3)
    assert int(logits.argmax()) == int(ref["logits_last"].argmax())
