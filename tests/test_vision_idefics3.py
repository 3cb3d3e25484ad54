"""SmolVLM / Idefics3 ("idefics3" mmproj) against the HF references in the shared fixtures (smolvlm_* cases):
image splitting, pixel shuffle, prompt layout and token budgets. Prompt ids, logits and greedy tokens through the
public API are checked for every case in test_fixture_cases.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import needs_set_a
from parity import FIXTURES, cases_of, reference, rel_err, vision_for
from PIL import Image

from ocula.media import load_image
from ocula.models.vision.base import ImageOptions, ProcessedImage

pytestmark = needs_set_a("smolvlm")

CASES = [c["id"] for c in cases_of("smolvlm")]


@pytest.fixture(scope="module")
def vision():
    return vision_for("smolvlm")


@pytest.fixture(scope="module")
def processed(vision):
    """case id → ProcessedImage of its (single) image with the default budget."""
    return {c["id"]: vision.preprocess(load_image(str(FIXTURES / c["images"][0])), ImageOptions())
            for c in cases_of("smolvlm")}


# ---------------------------------------------------------------- preprocessing + encoder


@pytest.mark.parametrize("cid", CASES)
def test_preprocess_matches_hf(cid, processed):
    ref = reference(cid)
    p = processed[cid]
    want = ref["proc_pixel_values"][0]  # [n_tiles + 1, 3, S, S]
    assert tuple(p.pixel_values.shape) == want.shape
    assert float(np.abs(p.pixel_values.numpy() - want).max()) <= 1e-4
    np.testing.assert_array_equal(p.extra["pixel_attention_mask"].numpy(), ref["proc_pixel_attention_mask"][0])
    n_tiles = want.shape[0]
    rows, cols = p.extra["rows"], p.extra["cols"]
    assert n_tiles == (rows * cols + 1 if rows else 1)
    assert p.n_tokens == int(ref["image_token_counts"].sum()) == ref["image_features"].shape[0]


@pytest.mark.parametrize("cid", CASES)
def test_encoder_matches_hf(cid, vision, processed):
    ref = reference(cid)["image_features"]
    with torch.inference_mode():
        feats = vision.encode(processed[cid]).float().numpy()
    assert feats.shape == ref.shape
    rel = rel_err(feats, ref)
    assert rel <= 1e-4, rel


def test_prompt_text_layout(vision, processed):
    t = vision.tokens_per_tile
    assert t == 16  # (256 / 16)^2 / 4^2
    run = "<image>" * t
    grid = vision.prompt_text(ProcessedImage(torch.zeros(0), 3 * t, extra={"rows": 1, "cols": 2}))
    assert grid == (f"<fake_token_around_image><row_1_col_1>{run}<fake_token_around_image><row_1_col_2>{run}\n"
                    f"\n<fake_token_around_image><global-img>{run}<fake_token_around_image>")
    single = vision.prompt_text(ProcessedImage(torch.zeros(0), t, extra={"rows": 0, "cols": 0}))
    assert single == f"<fake_token_around_image><global-img>{run}<fake_token_around_image>"
    for p in processed.values():
        assert vision.prompt_text(p).count("<image>") == p.n_tokens


def test_pixel_shuffle_order(vision):
    s, p, d = vision.scale, vision.side, 3
    x = torch.arange(p * p * d, dtype=torch.float32).reshape(1, p * p, d)
    out = vision.pixel_shuffle(x)[0]
    grid = x[0].reshape(p, p, d)
    for i, j in [(0, 0), (0, 1), (1, 0), (p // s - 1, p // s - 2)]:
        want = torch.cat([grid[i * s + a, j * s + b] for a in range(s) for b in range(s)])
        assert torch.equal(out[i * (p // s) + j], want)


def test_token_budget(vision):
    t = vision.tokens_per_tile
    rng = np.random.default_rng(0)
    for w, h in [(451, 300), (1000, 50), (64, 64)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        default = vision.preprocess(img, ImageOptions())
        assert default.pixel_values.shape[0] * t == default.n_tokens
        # a generous max budget changes nothing
        same = vision.preprocess(img, ImageOptions(max_tokens=default.n_tokens))
        assert same.n_tokens == default.n_tokens and torch.equal(same.pixel_values, default.pixel_values)
        # a tight budget falls back to one tile (the floor: T tokens even below T)
        for mx in (t, t + 1, 2 * t, 1):
            small = vision.preprocess(img, ImageOptions(max_tokens=mx))
            assert small.n_tokens == t and small.pixel_values.shape[0] == 1
            assert small.extra["rows"] == small.extra["cols"] == 0
        # min_tokens grows the longest edge in tile steps until it is met
        big = vision.preprocess(img, ImageOptions(min_tokens=default.n_tokens + 1))
        assert big.n_tokens > default.n_tokens
        assert big.pixel_values.shape[0] * t == big.n_tokens
        assert big.extra["longest_edge"] % vision.cfg.image_size == 0
        # max_tokens wins over min_tokens
        both = vision.preprocess(img, ImageOptions(min_tokens=10 ** 6, max_tokens=default.n_tokens))
        assert both.n_tokens <= default.n_tokens
