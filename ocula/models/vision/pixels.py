"""Fast, bit-exact versions of the two steps every image processor repeats: Pillow resizes and
`(x / 255 - mean) / std`.

Resize: Pillow resamples in two separable passes — horizontal (each output row from one input row)
and vertical (each output column from one input column) — rounding to uint8 in between, with
coefficients that depend only on the sizes. So a width-only resize of a band of rows, or a
height-only resize of a band of columns, gives exactly the pixels the full resize gives there.
`resize` cuts each pass into bands and runs them on a thread pool (Pillow releases the GIL while
resampling): the same bytes as `Image.resize`, up to `torch.get_num_threads()` times faster.
The order of the two passes matters (the rounding in between differs): Pillow up to 13.0.0.dev
always goes horizontal first; Pillow 13.0.0 goes vertical first when the height shrinks by more
than twice what the width shrinks. Each process finds which of these rules its Pillow follows by
comparing a few small resizes with `Image.resize`; if neither fits, resizes stay with Pillow.

Normalize: HF rescales uint8 in float64 (x * (1/255)), casts to float32, then normalizes in float32.
Each step is a per-value function of the byte, so a 256-entry table per channel reproduces it bit
for bit without full-size float64 copies.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

RESCALE = 1.0 / 255.0
MIN_PARALLEL_PIXELS = 256 * 256  # below this (output pixels per pass) threads cost more than they save

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(n, thread_name_prefix="ocula-resize"), n
        return _pool


def _bands(total: int, n: int) -> list[tuple[int, int]]:
    cuts = [total * i // n for i in range(n + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _horizontal(img: Image.Image, width: int, resample, n: int) -> Image.Image:
    """Width-only resize, rows split into n bands."""
    w, h = img.size
    bands = _bands(h, n)
    if len(bands) < 2 or width * h < MIN_PARALLEL_PIXELS:
        return img.resize((width, h), resample=resample)
    parts = list(_executor(n).map(
        lambda ab: img.crop((0, ab[0], w, ab[1])).resize((width, ab[1] - ab[0]), resample=resample), bands))
    out = Image.new(img.mode, (width, h), None)
    for (a, _), part in zip(bands, parts):
        out.paste(part, (0, a))
    return out


def _vertical(img: Image.Image, height: int, resample, n: int) -> Image.Image:
    """Height-only resize, columns split into n bands."""
    w, h = img.size
    bands = _bands(w, n)
    if len(bands) < 2 or w * height < MIN_PARALLEL_PIXELS:
        return img.resize((w, height), resample=resample)
    parts = list(_executor(n).map(
        lambda ab: img.crop((ab[0], 0, ab[1], h)).resize((ab[1] - ab[0], height), resample=resample), bands))
    out = Image.new(img.mode, (w, height), None)
    for (a, _), part in zip(bands, parts):
        out.paste(part, (a, 0))
    return out


def _vertical_first_13(w: int, h: int, width: int, height: int) -> bool:
    """Pillow 13.0.0's pass order when both passes are needed (read from its ImagingResampleInner)."""
    return h - height > 0 and h - height > 2 * (w - width)


ORDER_RULES = {"pillow-13": _vertical_first_13, "horizontal-first": lambda w, h, width, height: False}
_order: list = []  # [rule or None], decided once per process by _pass_order()
_order_lock = threading.Lock()


def _banded(img: Image.Image, width: int, height: int, resample, n: int, rule) -> Image.Image:
    w, h = img.size
    if width != w and height != h and rule(w, h, width, height):
        return _horizontal(_vertical(img, height, resample, n), width, resample, n)
    out = _horizontal(img, width, resample, n) if width != w else img
    return _vertical(out, height, resample, n) if height != h else out


def _pass_order():
    """The rule this Pillow follows, found by comparing small resizes with Image.resize (None: no
    known rule fits, so resizes stay with Pillow)."""
    with _order_lock:
        if not _order:
            rng = np.random.default_rng(0)
            img = Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))
            sizes = [(97, 40), (30, 20), (40, 30), (20, 50), (200, 150), (47, 63)]
            filters = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)
            refs = {(s, f): np.asarray(img.resize(s, resample=f)) for s in sizes for f in filters}
            found = None
            for name, rule in ORDER_RULES.items():
                if all(np.array_equal(ref, np.asarray(_banded(img, *s, f, 1, rule))) for (s, f), ref in refs.items()):
                    found = rule
                    break
            _order.append(found)
        return _order[0]


def resize(img: Image.Image, width: int, height: int, resample, threads: int | None = None) -> Image.Image:
    """`img.resize((width, height), resample)`, byte for byte, with both passes run on threads.

    Only for Pillow's separable filters on RGB/L images; anything else goes to Pillow unchanged."""
    n = threads or torch.get_num_threads()
    if (width, height) == img.size:
        return img.copy()
    if (n < 2 or img.mode not in ("RGB", "L") or resample == Image.Resampling.NEAREST
            or width * height < MIN_PARALLEL_PIXELS or _pass_order() is None):
        return img.resize((width, height), resample=resample)
    img.load()  # a lazily opened file must be decoded once, here, not by every band's crop at once
    return _banded(img, width, height, resample, n, _pass_order())


# ---------------------------------------------------------------- normalization


def value_table(mean, std) -> np.ndarray:
    """[3, 256] float32: HF's float32((v * (1/255)) in float64), then (x - mean) / std in float32."""
    levels = (np.arange(256, dtype=np.float64) * RESCALE).astype(np.float32)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    return ((levels[None, :] - m) / s).astype(np.float32)


def normalized_chw(images: list[np.ndarray], mean, std) -> torch.Tensor:
    """uint8 HWC arrays of one size (views are fine) → [n, 3, H, W] float32 normalized pixels,
    equal to (stack(images) / 255 - mean) / std computed with HF's dtypes."""
    table = value_table(mean, std)
    h, w = images[0].shape[:2]
    out = np.empty((len(images), 3, h, w), dtype=np.float32)
    for i, arr in enumerate(images):
        if arr.shape != (h, w, 3) or arr.dtype != np.uint8:
            raise ValueError(f"expected uint8 [{h}, {w}, 3] images, got {arr.dtype} {arr.shape}")
        for c in range(3):
            np.take(table[c], arr[:, :, c], out=out[i, c])
    return torch.from_numpy(out)
