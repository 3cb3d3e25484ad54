"""InternVL parity with HF transformers (GotOcr2 tiling, InternViT, pixel-shuffle projector, prompt expansion)."""
from __future__ import annotations

import pytest
import torch
from conftest import needs_set_a
from parity import FIXTURES, case_messages, cases_of, check_encoder, check_preprocess, model_for, open_image, vision_for

from ocula.models.vision.base import ImageOptions
from ocula.models.vision.internvl import best_tile_grid, pixel_shuffle, tile_grids

CASES = cases_of("internvl")
CASE_IDS = [c["id"] for c in CASES]
needs_fixtures = needs_set_a("internvl")


@pytest.fixture(scope="module")
def vision():
    return vision_for("internvl")


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
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_preprocess_parity(vision, case):
    processed = check_preprocess(vision, case)
    text = vision.prompt_text(processed)
    assert text == "<img>" + "<IMG_CONTEXT>" * processed.n_tokens + "</img>"


@needs_fixtures
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_encoder_parity(vision, case):
    check_encoder(vision, case)


@needs_fixtures
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_chat_template_renders_hf_prompt(case):
    assert model_for("internvl").apply_chat_template(case_messages(case)) == case["prompt"]


@needs_fixtures
def test_token_budget_maps_to_tiles(vision):
    per_tile = vision.tokens_per_tile
    image = open_image("images/wide_1000x50.png")
    assert vision.preprocess(image, ImageOptions()).n_tokens == 13 * per_tile  # HF default: 12 tiles + thumbnail
    for max_tokens in (per_tile, 2 * per_tile, 3 * per_tile + 5, 6 * per_tile, 12 * per_tile):
        p = vision.preprocess(image, ImageOptions(max_tokens=max_tokens))
        assert p.n_tokens <= max_tokens
        assert p.pixel_values.shape[0] * per_tile == p.n_tokens
    # 3 tiles of budget: 2 grid tiles + thumbnail
    p = vision.preprocess(image, ImageOptions(max_tokens=3 * per_tile))
    assert p.extra["grid"] == (2, 1) and p.n_tokens == 3 * per_tile
    # min_tokens forces tiling of an image that would otherwise take one tile
    square = open_image("images/astronaut_224.png")
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
        p = vision.preprocess(open_image(path), ImageOptions())
        assert p.pixel_values.shape == (1, 3, vision.cfg.image_size, vision.cfg.image_size)
