"""Encoded bytes or a PIL image to a loaded, EXIF-oriented image, with the pixel limit checked before decoding."""
from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from ocula.media.policy import MediaPolicy, fail

# Formats never decoded: EPS hands the data to Ghostscript (an interpreter), which no image input needs.
_BLOCKED_FORMATS = frozenset({"EPS"})


def _allowed_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in Image.ID if f not in _BLOCKED_FORMATS)


def check_pixels(size: tuple[int, int], policy: MediaPolicy, kind: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise fail(kind, f"empty image ({w}x{h})")
    if w * h > policy.max_pixels:
        raise fail(kind, f"too many pixels: {w}x{h} = {w * h} > max_pixels {policy.max_pixels}")


def decode_bytes(data: bytes, policy: MediaPolicy, kind: str, where: str | None = None) -> Image.Image:
    suffix = f" ({where!r})" if where else ""
    if len(data) > policy.max_bytes:
        raise fail(kind, f"too many bytes: {len(data)} > max_bytes {policy.max_bytes}{suffix}")
    if not data:
        raise fail(kind, f"empty data{suffix}")
    try:
        with warnings.catch_warnings():
            # PIL warns above Image.MAX_IMAGE_PIXELS; our own limit (policy.max_pixels) is checked just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_allowed_formats())
    except Image.DecompressionBombError as e:
        raise fail(kind, f"too many pixels (decompression bomb): {e}{suffix}") from None
    except UnidentifiedImageError:
        raise fail(kind, f"not an image: cannot identify image file{suffix}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, MemoryError) as e:
        raise fail(kind, _broken(e) + suffix) from None
    # Dimensions come from the header: refuse before any pixel is decoded.
    check_pixels(img.size, policy, kind)
    return finish_pil(img, policy, kind, suffix)


def _broken(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, EOFError) or "truncat" in text.lower():
        return f"truncated image: {text}"
    return f"unreadable image data: {text}"


def finish_pil(img: Image.Image, policy: MediaPolicy, kind: str, suffix: str = "") -> Image.Image:
    check_pixels(img.size, policy, kind)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Image.DecompressionBombError as e:
        raise fail(kind, f"too many pixels (decompression bomb): {e}{suffix}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, MemoryError) as e:
        raise fail(kind, _broken(e) + suffix) from None
    return _apply_exif_orientation(img)


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # broken EXIF: keep the pixels as stored
        return img
    if orientation in (None, 1) or orientation not in range(2, 9):
        return img
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:  # pragma: no cover - broken EXIF: keep the pixels as stored
        return img
    if out is None:  # pragma: no cover - in_place variants
        return img
    out.load()
    return out
