"""InternVL parity with HF transformers (GotOcr2 tiling, InternViT, pixel-shuffle projector, prompt expansion)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ocula.models.vision.base import ImageOptions, ProcessedImage
from ocula.models.vision.internvl import best_tile_grid, pixel_shuffle, tile_grids

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"
MODEL_DIR = FIXTURES / "models" / "internvl"
CASES = ["internvl_astronaut", "internvl_chelsea", "internvl_wide"]

needs_fixtures = pytest.mark.skipif(
    not (MODEL_DIR / "mmproj-internvl-f16.gguf").exists(),
    reason=f"shared InternVL fixtures not found under {FIXTURES}",
)
needs_e2e = pytest.mark.skipif(
    importlib.util.find_spec("ocula.tokenizer") is None or importlib.util.find_spec("ocula.media") is None,
    reason="end-to-end API not available yet (ocula.tokenizer / ocula.media missing)",
)


def _case(case_id: str) -> dict:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    return next(c for c in manifest["cases"] if c["id"] == case_id)


def _ref(case_id: str):
    return np.load(FIXTURES / _case(case_id)["reference_npz"])


def _messages(case: dict) -> list[dict]:
    content = [{"type": "image", "image": str(FIXTURES / p)} for p in case["images"]]
    content.append({"type": "text", "text": case["question"]})
    msgs = [{"role": "user", "content": content}]
    if case.get("system"):
        msgs.insert(0, {"role": "system", "content": case["system"]})
    return msgs


@pytest.fixture(scope="module")
def vision():
    from ocula.models.vision import build_vision_model

    return build_vision_model(MODEL_DIR / "mmproj-internvl-f16.gguf", 32)


@pytest.fixture(scope="module")
def model():
    import ocula

    return ocula.load(MODEL_DIR / "internvl-f16.gguf", mmproj=MODEL_DIR / "mmproj-internvl-f16.gguf",
                      dtype="float32")


# ---------------------------------------------------------------- pure algorithm (no fixtures)


def test_tile_grid_candidates_order():
    assert tile_grids(1, 4) == [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1)]
    assert tile_grids(3, 4) == [(1, 3), (3, 1), (1, 4), (2, 2), (4, 1)]


def test_best_tile_grid_closest_aspect_and_ties():
    assert best_tile_grid(451, 300, 224, 1, 12) == (3, 2)
    assert best_tile_grid(1000, 50, 224, 1, 12) == (12, 1)
    assert best_tile_grid(50, 1000, 224, 1, 12) == (1, 12)
    # square: 1x1, 2x2, 3x3 tie on aspect; the larger grid wins while area > half its pixel area
    assert best_tile_grid(224, 224, 224, 1, 12) == (1, 1)
    assert best_tile_grid(448, 448, 224, 1, 12) == (2, 2)
    assert best_tile_grid(700, 700, 224, 1, 12) == (3, 3)
    assert best_tile_grid(700, 700, 224, 1, 4) == (2, 2)
    assert best_tile_grid(224, 224, 224, 4, 12) == (2, 2)  # min tiles forces a grid
    assert best_tile_grid(224, 224, 224, 5, 4) == (1, 1)  # no candidate: HF falls back to 1x1


def test_pixel_shuffle_matches_hf_order():
    # HF: view(B, W, H/2, 2C) → permute → view(B, H/2, W/2, 4C) → permute
    x = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 4, 4, 3)
    b, w, h, c = x.shape
    ref = x.view(b, w, h // 2, c * 2).permute(0, 2, 1, 3).contiguous()
    ref = ref.view(b, h // 2, w // 2, c * 4).permute(0, 2, 1, 3).contiguous()
    assert torch.equal(pixel_shuffle(x, 2), ref)


# ---------------------------------------------------------------- parity with the HF reference


@needs_fixtures
@pytest.mark.parametrize("case_id", CASES)
def test_preprocess_parity(vision, case_id):
    case, ref = _case(case_id), _ref(case_id)
    processed = vision.preprocess(Image.open(FIXTURES / case["images"][0]), ImageOptions())
    want = ref["proc_pixel_values"]
    assert tuple(processed.pixel_values.shape) == want.shape
    assert float(np.abs(processed.pixel_values.numpy() - want).max()) <= 1e-4
    assert processed.n_tokens == int(ref["image_token_counts"][0])
    text = vision.prompt_text(processed)
    assert text == "<img>" + "<IMG_CONTEXT>" * processed.n_tokens + "</img>"


@needs_fixtures
@pytest.mark.parametrize("case_id", CASES)
def test_encoder_parity(vision, case_id):
    case, ref = _case(case_id), _ref(case_id)
    with torch.inference_mode():
        processed = vision.preprocess(Image.open(FIXTURES / case["images"][0]), ImageOptions())
        feats = vision.encode(processed).float().numpy()
        # also from HF's own pixels, so encoder errors are not masked by preprocessing
        from_ref = vision.encode(ProcessedImage(torch.from_numpy(ref["proc_pixel_values"]), processed.n_tokens))
    want = ref["image_features"]
    scale = float(np.abs(want).max())
    assert feats.shape == want.shape
    assert float(np.abs(feats - want).max()) / scale <= 1e-4
    assert float(np.abs(from_ref.float().numpy() - want).max()) / scale <= 1e-4


@needs_fixtures
def test_token_budget_maps_to_tiles(vision):
    per_tile = vision.tokens_per_tile
    image = Image.open(FIXTURES / "images" / "wide_1000x50.png")
    assert vision.preprocess(image, ImageOptions()).n_tokens == 13 * per_tile  # HF default: 12 tiles + thumbnail
    for max_tokens in (per_tile, 2 * per_tile, 3 * per_tile + 5, 6 * per_tile, 12 * per_tile):
        p = vision.preprocess(image, ImageOptions(max_tokens=max_tokens))
        assert p.n_tokens <= max_tokens
        assert p.pixel_values.shape[0] * per_tile == p.n_tokens
    # 3 tiles of budget: 2 grid tiles + thumbnail
    p = vision.preprocess(image, ImageOptions(max_tokens=3 * per_tile))
    assert p.extra["grid"] == (2, 1) and p.n_tokens == 3 * per_tile
    # min_tokens forces tiling of an image that would otherwise take one tile
    square = Image.open(FIXTURES / "images" / "astronaut_224.png")
    assert vision.preprocess(square, ImageOptions()).n_tokens == per_tile
    for min_tokens in (2 * per_tile, 5 * per_tile, 10 * per_tile):
        p = vision.preprocess(square, ImageOptions(min_tokens=min_tokens))
        assert p.n_tokens >= min_tokens
    # when both are given and conflict, the ceiling wins
    p = vision.preprocess(square, ImageOptions(min_tokens=10 * per_tile, max_tokens=3 * per_tile))
    assert p.n_tokens <= 3 * per_tile


@needs_fixtures
def test_grayscale_and_rgba_inputs(vision):
    for name in ("camera_gray_128.png", "logo_rgba_128.png"):
        path = FIXTURES / "images" / name
        if not path.exists():
            pytest.skip(f"{name} missing")
        p = vision.preprocess(Image.open(path), ImageOptions())
        assert p.pixel_values.shape == (1, 3, vision.cfg.image_size, vision.cfg.image_size)


# ---------------------------------------------------------------- end to end (tokenizer + text model)


@needs_fixtures
@needs_e2e
@pytest.mark.parametrize("case_id", CASES)
def test_end_to_end(model, case_id):
    case, ref = _case(case_id), _ref(case_id)
    msgs = _messages(case)
    assert model.apply_chat_template(msgs) == case["prompt"]
    assert model.prompt_token_ids(msgs) == ref["input_ids"].tolist()
    logits = model.logits(msgs)
    want = torch.from_numpy(ref["logits_last"])
    assert float((logits - want).abs().max()) <= 1e-3
    assert int(logits.argmax()) == int(want.argmax())
    got = model.chat(msgs, max_tokens=16, temperature=0, ignore_eos=True).token_ids
    margins = case["greedy_margins"]
    n = next((i for i, m in enumerate(margins) if m < 1e-3), len(margins))  # compare up to the first near-tie
    assert list(got[: n + 1]) == ref["greedy_tokens"].tolist()[: n + 1]
