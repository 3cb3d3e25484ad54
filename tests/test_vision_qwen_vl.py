"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision ("qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger")
against the Hugging Face references in the shared fixtures.

Preprocessing (HF Qwen2VLImageProcessorPil: smart resize, bicubic, patch rows + grid), encoder + merger
features (window attention, deepstack), the text model fed with our features and HF's M-RoPE positions,
our M-RoPE positions, image-token budgets, and encode_image's deepstack output and token budget through the API.
Prompt ids, pixels, features, logits and greedy tokens through the public API are checked for every case in
test_fixture_cases.py.
"""
import types

import numpy as np
import pytest
import torch
from conftest import needs_set_a
from parity import (FIXTURES, case_by_id, case_messages, cases_of, greedy_checkable, model_for, open_image, reference,
                    rel_err, vision_for)

from ocula.models.vision.base import ImageOptions, ProcessedImage

FAMILY = ("qwen2vl", "qwen25vl", "qwen3vl")

pytestmark = needs_set_a(*FAMILY)

CASES = cases_of(*FAMILY)
CASE_IDS = [c["id"] for c in CASES]


def _split(ref):
    """Per image: (grid, pixel rows) from the HF processor output (all images concatenated)."""
    out, off = [], 0
    for g in ref["proc_image_grid_thw"]:
        g = tuple(int(x) for x in g)
        n = int(np.prod(g))
        out.append((g, torch.from_numpy(ref["proc_pixel_values"][off : off + n])))
        off += n
    return out


@torch.inference_mode()
def _encode_ref(vision, ref):
    """Our features (and deepstack) for HF's pixel values, all images concatenated."""
    feats, deep = [], []
    for g, px in _split(ref):
        out = vision.encode(ProcessedImage(px, g[1] * g[2] // vision.merge_size ** 2, g))
        f, d = out if isinstance(out, tuple) else (out, None)
        feats.append(f)
        deep.append(d)
    return feats, deep


# ---------------------------------------------------------------- structure


def test_structure():
    from ocula.models.vision.qwen_vl import QwenVLVision

    for model in FAMILY:
        v = vision_for(model)
        assert isinstance(v, QwenVLVision)
        assert v.placeholder == v.image_token == "<|image_pad|>"
        assert v.mrope and not v.bidirectional and v.merge_size == 2 and v.temporal == 2
    v25, v3 = vision_for("qwen25vl"), vision_for("qwen3vl")
    assert v25.window == 4 and v25.full_layers == [False, True, False, True]  # n_wa_pattern 2, 112 px windows
    assert vision_for("qwen2vl").window == 0 and v3.window == 0
    assert v3.deepstack_layers == [0, 2] and v3.pos_side == 16  # HF deepstack_visual_indexes [0, 2]
    assert v3.prompt_text(ProcessedImage(torch.zeros(16, 1536), 4, (1, 4, 4))) == "<|image_pad|>" * 4


def test_smart_resize():
    from ocula.errors import MediaError
    from ocula.models.vision.qwen_vl import smart_resize

    lo, hi = 56 * 56, 28 * 28 * 16384
    assert smart_resize(224, 224, 28, lo, hi) == (224, 224)
    assert smart_resize(300, 451, 28, lo, hi) == (308, 448)  # round to the factor
    assert smart_resize(8, 8, 28, lo, hi) == (56, 56)  # below min_pixels: scale up with ceil
    assert smart_resize(50, 1000, 28, lo, hi) == (56, 1008)
    assert smart_resize(2000, 3000, 28, lo, 28 * 28 * 64) == (168, 252)  # above max_pixels: scale down with floor
    assert smart_resize(224, 224, 32, 65536, 16777216) == (256, 256)
    with pytest.raises(MediaError):
        smart_resize(10, 2100, 28, lo, hi)


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_preprocess_parity(case):
    vision, ref = vision_for(case["model"]), reference(case)
    for path, (grid, px), count in zip(case["images"], _split(ref), ref["image_token_counts"]):
        p = vision.preprocess(open_image(path), ImageOptions())
        assert p.grid_thw == grid
        assert p.n_tokens == int(count)
        assert tuple(p.pixel_values.shape) == tuple(px.shape)
        assert float((p.pixel_values - px).abs().max()) < 1e-4


def test_token_budgets():
    """ImageOptions(min_tokens, max_tokens) bound the merged-token count (pixels = tokens * (p*m)^2)."""
    from ocula.errors import RequestError

    v2, v3 = vision_for("qwen2vl"), vision_for("qwen3vl")
    img = open_image("images/astronaut_224.png")
    assert v2.preprocess(img, ImageOptions()).n_tokens == 64  # 224 px, 28 px per token: no resize
    assert v3.preprocess(img, ImageOptions()).n_tokens == 64  # Qwen3-VL default minimum is 64 tokens (256 px)
    assert v3.preprocess(img, ImageOptions(min_tokens=4)).n_tokens == 49  # 224/32 = 7 per side
    small = v2.preprocess(img, ImageOptions(max_tokens=16))
    assert small.n_tokens == 16 and small.grid_thw == (1, 8, 8)
    assert small.pixel_values.shape == (64, 3 * 2 * 14 * 14)
    assert v2.preprocess(img, ImageOptions(max_tokens=20)).n_tokens <= 20
    big = v2.preprocess(img, ImageOptions(min_tokens=256))
    assert big.n_tokens >= 256 and big.grid_thw == (1, 32, 32)
    wide = v2.preprocess(open_image("images/wide_1000x50.png"), ImageOptions(max_tokens=30))
    assert wide.n_tokens <= 30
    # one bound alone overrides the other's default: Qwen3-VL's default minimum is 64 tokens
    assert v3.preprocess(img, ImageOptions(max_tokens=16)).n_tokens == 16
    assert v2.pixel_budget(ImageOptions(min_tokens=20000)) == (20000 * 784, 20000 * 784)  # above the default max
    assert v3.pixel_budget(ImageOptions()) == (65536, 16777216)
    assert v2.pixel_budget(ImageOptions()) == (3136, 12845056)
    with pytest.raises(RequestError):
        v2.preprocess(img, ImageOptions(min_tokens=100, max_tokens=10))
    with pytest.raises(RequestError):
        v2.preprocess(img, ImageOptions(max_tokens=0))
    # a budgeted image still encodes to the announced token count
    out = v2.encode(small)
    assert out.shape == (16, v2.output_dim)


# ---------------------------------------------------------------- encoder + merger


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_encoder_parity(case):
    vision, ref = vision_for(case["model"]), reference(case)
    feats, deep = _encode_ref(vision, ref)
    got = torch.cat(feats).numpy()
    assert got.shape == ref["image_features"].shape
    assert rel_err(got, ref["image_features"]) < 1e-4
    if "deepstack_features" in ref:
        ds = np.stack([torch.cat([d[k] for d in deep]).numpy() for k in range(len(deep[0]))])
        assert ds.shape == ref["deepstack_features"].shape
        assert rel_err(ds, ref["deepstack_features"]) < 1e-4
    else:
        assert all(d is None for d in deep)


# ---------------------------------------------------------------- text model fed with our features


def _image_spans(ids, image_id, feats, deep):
    from ocula.engine.prompt import ImageSpan

    starts = [i for i, t in enumerate(ids) if t == image_id and (i == 0 or ids[i - 1] != image_id)]
    assert len(starts) == len(feats)
    return [ImageSpan(s, f, f"img{i}", d) for i, (s, f, d) in enumerate(zip(starts, feats, deep))]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mrope_positions(case):
    """VisionRuntime.positions (t, h, w ids from grid_thw and merge_size) equals HF's position_ids."""
    from ocula.engine.multimodal import VisionRuntime

    model = case["model"]
    vision, text, ref = vision_for(model), model_for(model).text, reference(case)
    ids = ref["input_ids"].tolist()
    processed = [ProcessedImage(px, g[1] * g[2] // 4, g) for g, px in _split(ref)]
    feats = [torch.zeros(p.n_tokens, 1) for p in processed]
    spans = _image_spans(ids, int(ref["image_token_id"]), feats, [None] * len(feats))
    runtime = types.SimpleNamespace(text_cfg=text.cfg, vision=vision)
    pos, nxt = VisionRuntime.positions(runtime, ids, spans, processed)
    np.testing.assert_array_equal(pos.numpy(), ref["position_ids"])
    assert nxt == int(ref["position_ids"].max()) + 1


@torch.inference_mode()
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_logits_with_features(case):
    """HF input ids + positions + our features (+ deepstack) → HF last logits and greedy tokens."""
    from ocula.models.text.base import StepInput

    model = case["model"]
    vision, text, ref = vision_for(model), model_for(model).text, reference(case)
    ids = ref["input_ids"].tolist()
    feats, deep = _encode_ref(vision, ref)
    spans = _image_spans(ids, int(ref["image_token_id"]), feats, deep)
    x = text.embed(torch.tensor(ids))
    ds = None
    for s in spans:
        x[s.start : s.stop] = s.features
        if s.deepstack:
            ds = ds or [torch.zeros_like(x) for _ in s.deepstack]
            for layer, d in enumerate(s.deepstack):
                ds[layer][s.start : s.stop] = d
    positions = torch.from_numpy(ref["position_ids"].astype(np.int64))
    cache = text.new_cache()
    step = StepInput(positions, cache, None, [d[None] for d in ds] if ds else None)
    logits = text.logits(text(x[None], step)[0, -1])
    np.testing.assert_allclose(logits.numpy(), ref["logits_last"], rtol=0, atol=1e-3)
    assert int(logits.argmax()) == int(ref["logits_last"].argmax())

    tokens, pos, tok = [], int(positions.max()) + 1, int(logits.argmax())
    for _ in range(len(ref["greedy_tokens"])):
        tokens.append(tok)
        h = text(text.embed(torch.tensor([tok]))[None], StepInput(torch.tensor([[pos]] * 3), cache))[0, -1]
        pos, tok = pos + 1, int(text.logits(h).argmax())
    want = ref["greedy_tokens"].tolist()
    n = min(greedy_checkable(case, len(want)) + 1, len(want))  # one step past the first near-tie, if any
    assert tokens[:n] == want[:n]


# ---------------------------------------------------------------- encode_image through the API


def test_encode_image_api():
    ref = reference("qwen3vl_astronaut")
    m = model_for("qwen3vl")
    feats, deep = m.encode_image(str(FIXTURES / "images/astronaut_224.png"), deepstack=True)
    assert rel_err(feats.numpy(), ref["image_features"]) < 1e-4
    assert rel_err(np.stack([d.numpy() for d in deep]), ref["deepstack_features"]) < 1e-4
    # the API's token budget reaches the processor: 224 px with at most 16 tokens -> 128 px, 4x4 tokens
    small, small_deep = m.encode_image(str(FIXTURES / "images/astronaut_224.png"), deepstack=True,
                                       image_max_tokens=16)
    assert small.shape == (16, m.vision.vision.output_dim) and [d.shape for d in small_deep] == [small.shape] * 2
    ids = m.prompt_token_ids(case_messages(case_by_id("qwen3vl_astronaut")), image_max_tokens=16)
    assert ids.count(int(ref["image_token_id"])) == 16
