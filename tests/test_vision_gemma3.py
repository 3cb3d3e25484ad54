"""Gemma 3 vision (projector type "gemma3") against the Hugging Face references in ../shared.

Preprocessing (HF Gemma3ImageProcessorPil), encoder + projector features, the text model fed with our
features (bidirectional image attention), and, once the tokenizer/media modules exist, the
end-to-end API (prompt ids, last logits, greedy tokens).
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"
MODELS = FIXTURES / "models" / "gemma3"
MMPROJ = MODELS / "mmproj-gemma3-f16.gguf"
TEXT = MODELS / "gemma3-f16.gguf"

pytestmark = pytest.mark.skipif(not MMPROJ.exists(), reason=f"shared Gemma 3 fixtures not found at {MODELS}")


def _cases():
    if not (FIXTURES / "manifest.json").exists():
        return []
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    return [c for c in manifest["cases"] if c["model"] == "gemma3"]


CASES = _cases()
CASE_IDS = [c["id"] for c in CASES]
HAVE_MEDIA = importlib.util.find_spec("ocula.media") is not None
HAVE_TOKENIZER = importlib.util.find_spec("ocula.tokenizer") is not None
needs_media = pytest.mark.skipif(not HAVE_MEDIA, reason="ocula.media (to_rgb/load_image) is not written yet")
needs_e2e = pytest.mark.skipif(not (HAVE_MEDIA and HAVE_TOKENIZER),
                               reason="ocula.media / ocula.tokenizer are not written yet")


def _ref(case):
    return np.load(FIXTURES / case["reference_npz"])


def _image(case):
    img = Image.open(FIXTURES / case["images"][0])
    img.load()
    return img


def _rel(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _greedy_prefix(case, ref):
    """Greedy steps that must match: up to the first one whose HF top1-top2 margin is < 1e-3."""
    margins = case.get("greedy_margins") or [1.0] * len(ref["greedy_tokens"])
    return next((i for i, m in enumerate(margins) if m < 1e-3), len(ref["greedy_tokens"]))


@pytest.fixture(scope="module")
def vision():
    from ocula.gguf import GGUFFile
    from ocula.models.vision import build_vision_model

    # the converter writes the text model's width as projection_dim (opening the text GGUF is slow)
    width = int(GGUFFile(MMPROJ).get("clip.vision.projection_dim"))
    return build_vision_model(MMPROJ, width, dtype=torch.float32)


@pytest.fixture(scope="module")
def model():
    """The end-to-end API model (text + mmproj), loaded once."""
    if not (HAVE_MEDIA and HAVE_TOKENIZER):
        pytest.skip("ocula.media / ocula.tokenizer are not written yet")
    import ocula

    return ocula.load(TEXT, mmproj=MMPROJ, dtype="float32")


@pytest.fixture(scope="module")
def text_model(request):
    """The Gemma 3 text decoder: shared with the API model when it can be built (one slow GGUF open)."""
    if HAVE_MEDIA and HAVE_TOKENIZER:
        return request.getfixturevalue("model").text
    from ocula.gguf import GGUFFile
    from ocula.models.text.base import build_text_model
    from ocula.models.weights import load_gguf_weights

    f = GGUFFile(TEXT)
    m = build_text_model(f)
    load_gguf_weights(m, f, dtype=torch.float32, aliases=m.weight_aliases())
    return m.eval()


# ---------------------------------------------------------------- structure


def test_geometry_and_prompt(vision):
    from ocula.models.vision.gemma3 import Gemma3Vision

    assert isinstance(vision, Gemma3Vision)
    assert vision.placeholder == "<start_of_image>" and vision.image_token == "<image_soft_token>"
    assert vision.bidirectional and not vision.mrope
    # 224 px / 14 = 16 patches per side, 4x4 average pool -> 4x4 = 16 tokens (HF mm_tokens_per_image)
    assert (vision.side, vision.pool, vision.tokens_side) == (16, 4, 4)
    from ocula.models.vision.base import ProcessedImage

    text = vision.prompt_text(ProcessedImage(torch.zeros(1, 3, 224, 224), 16))
    assert text == "\n\n<start_of_image>" + "<image_soft_token>" * 16 + "<end_of_image>\n\n"


# ---------------------------------------------------------------- preprocessing


@needs_media
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_preprocess_parity(case, vision):
    from ocula.models.vision.base import ImageOptions

    ref = _ref(case)
    p = vision.preprocess(_image(case), ImageOptions())
    assert tuple(p.pixel_values.shape) == tuple(ref["proc_pixel_values"].shape)
    assert float(np.abs(p.pixel_values.numpy() - ref["proc_pixel_values"]).max()) < 1e-4
    assert p.n_tokens == int(ref["image_token_counts"][0])


@needs_media
def test_token_budget_options_do_not_apply(vision):
    """Gemma 3 has a fixed token count: min/max token budgets leave the output unchanged."""
    from ocula.models.vision.base import ImageOptions

    img = _image(CASES[0])
    base = vision.preprocess(img, ImageOptions())
    for opts in (ImageOptions(1, 4), ImageOptions(64, 4096), ImageOptions(None, 8)):
        p = vision.preprocess(img, opts)
        assert p.n_tokens == base.n_tokens
        assert torch.equal(p.pixel_values, base.pixel_values)


# ---------------------------------------------------------------- encoder + projector


@torch.inference_mode()
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_encoder_parity(case, vision):
    from ocula.models.vision.base import ProcessedImage

    ref = _ref(case)
    pixels = torch.from_numpy(ref["proc_pixel_values"])
    feats = vision.encode(ProcessedImage(pixels, int(ref["image_token_counts"][0]))).numpy()
    assert feats.shape == ref["image_features"].shape
    assert _rel(feats, ref["image_features"]) < 1e-4


# ---------------------------------------------------------------- text model fed with our features


@torch.inference_mode()
@pytest.mark.skipif(not TEXT.exists(), reason="Gemma 3 text GGUF missing")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_logits_with_features(case, vision, text_model):
    """HF input ids + our features + bidirectional image span → HF logits and greedy tokens."""
    from ocula.engine.prompt import ImageSpan, Prompt
    from ocula.models.text.base import StepInput
    from ocula.models.vision.base import ProcessedImage

    ref = _ref(case)
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
    if HAVE_MEDIA and HAVE_TOKENIZER:
        return  # greedy decoding is checked through the API in test_end_to_end (keeps the file fast)

    tokens, pos, tok = [], len(ids), int(logits.argmax())
    for _ in range(len(ref["greedy_tokens"])):
        tokens.append(tok)
        h = text_model(text_model.embed(torch.tensor([tok]))[None], StepInput(torch.tensor([pos]), cache))[0, -1]
        pos, tok = pos + 1, int(text_model.logits(h).argmax())
    n = _greedy_prefix(case, ref)
    assert tokens[:n] == ref["greedy_tokens"].tolist()[:n]


# ---------------------------------------------------------------- end to end


def _messages(case):
    content = [{"type": "image", "image": str(FIXTURES / p)} for p in case["images"]]
    content.append({"type": "text", "text": case["question"]})
    msgs = [{"role": "user", "content": content}]
    if case.get("system"):
        msgs.insert(0, {"role": "system", "content": case["system"]})
    return msgs


@needs_e2e
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_end_to_end(case, model):
    ref = _ref(case)
    msgs = _messages(case)
    assert model.apply_chat_template(msgs) == case["prompt"]
    assert model.prompt_token_ids(msgs) == ref["input_ids"].tolist()
    feats = model.encode_image(str(FIXTURES / case["images"][0])).numpy()
    assert _rel(feats, ref["image_features"]) < 1e-4
    logits = model.logits(msgs).numpy()
    np.testing.assert_allclose(logits, ref["logits_last"], rtol=0, atol=1e-3)
    assert logits.argmax() == ref["logits_last"].argmax()
    out = model.chat(msgs, max_tokens=16, temperature=0, ignore_eos=True)
    n = _greedy_prefix(case, ref)
    assert out.token_ids[:n] == ref["greedy_tokens"].tolist()[:n]
