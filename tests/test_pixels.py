"""ocula.models.vision.pixels: threaded resizes give Image.resize's bytes; the normalization table gives HF's
float64-rescale-then-float32 values bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ocula.models.vision import pixels

FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)


def test_pillow_pass_order_is_known():
    assert pixels._pass_order() is not None  # else every resize silently falls back to Pillow (still exact)


@pytest.mark.parametrize("seed", range(3))
def test_threaded_resize_equals_pillow(seed):
    rng = np.random.default_rng(seed)
    for _ in range(4):
        h, w = (int(v) for v in rng.integers(20, 420, 2))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        # growing, shrinking, one side only, and both orders of Pillow's two passes
        for nw, nh in [(int(rng.integers(260, 640)), int(rng.integers(260, 640))), (w, 700), (700, h),
                       (int(w * 3), max(1, h // 3)), (max(1, w // 3), int(h * 3))]:
            for f in FILTERS:
                want = np.asarray(img.resize((nw, nh), resample=f))
                got = np.asarray(pixels.resize(img, nw, nh, f, threads=3))
                assert np.array_equal(want, got), (h, w, nh, nw, f)


def test_resize_of_grey_and_lazily_opened_images(tmp_path):
    rng = np.random.default_rng(7)
    grey = Image.fromarray(rng.integers(0, 256, (300, 500), dtype=np.uint8))
    assert np.array_equal(np.asarray(grey.resize((800, 640), Image.Resampling.BICUBIC)),
                          np.asarray(pixels.resize(grey, 800, 640, Image.Resampling.BICUBIC, threads=2)))
    path = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)).save(path)
    with Image.open(path) as lazy:  # not decoded yet: bands must not race to decode it
        got = np.asarray(pixels.resize(lazy, 1000, 700, Image.Resampling.LANCZOS, threads=4))
    with Image.open(path) as im:
        assert np.array_equal(got, np.asarray(im.resize((1000, 700), Image.Resampling.LANCZOS)))


def test_normalized_chw_equals_hf_arithmetic():
    rng = np.random.default_rng(3)
    tiles = [rng.integers(0, 256, (16, 24, 3), dtype=np.uint8) for _ in range(3)]
    big = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    tiles.append(big[8:24, 4:28])  # a strided view
    for mean, std in [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                      ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))]:
        x = (np.stack(tiles).astype(np.float64) * (1 / 255)).astype(np.float32)
        want = ((x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)).transpose(0, 3, 1, 2)
        got = pixels.normalized_chw(tiles, mean, std).numpy()
        assert got.dtype == np.float32 and np.array_equal(got, want)
    with pytest.raises(ValueError):
        pixels.normalized_chw([tiles[0], big], (0.5,) * 3, (0.5,) * 3)
