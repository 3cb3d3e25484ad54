"""Load an image from any source into one representation, a fully loaded ``PIL.Image.Image``, safely.

``load_image(source, policy)`` accepts:

* ``str`` / ``pathlib.Path`` local paths, ``file://`` URLs (subject to ``allow_local_files`` and
  ``allowed_local_root``);
* ``http://`` / ``https://`` URLs (subject to ``allow_urls`` / ``allow_private_urls``): the host is resolved,
  every resolved address is checked, the connection is pinned to a checked address (no DNS-rebinding window),
  redirects are followed by hand (bounded, re-checked on every hop), environment proxies are ignored, and the
  body is read with a byte cap and a total deadline of ``url_timeout`` seconds;
* ``data:image/...;base64,...`` URIs and raw base64 strings (a string that is not an existing file and decodes
  as base64 to image bytes);
* ``bytes`` / ``bytearray`` / ``memoryview`` holding an encoded image;
* ``PIL.Image.Image`` (loaded, EXIF orientation applied);
* numpy ``uint8`` arrays shaped (H, W), (H, W, 1) -> mode L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA;
* torch tensors, by this rule:
    - floating dtypes are channels-first in [0, 1]: (H, W) or (C, H, W) with C in {1, 3, 4}; values are scaled by
      255 and *rounded* (so a ``uint8 / 255`` round trip is exact);
    - ``uint8`` (H, W) is grayscale; ``uint8`` (A, B, C) is channels-last (HWC) when C is in {1, 3, 4}, otherwise
      channels-first (CHW) when A is in {1, 3, 4} (so an ambiguous shape like (3, 5, 3) is read as HWC);
    - any other dtype or shape is refused;
* OpenAI content-part dicts: ``{"type": "image_url", "image_url": {"url": ...}}``,
  ``{"type": "image_url", "image_url": "..."}``, ``{"type": "image", "image": <any of the above>}`` and
  ``{"type": "input_image", "image_url": ...}``.

The result is decoded and loaded (a ``PIL.Image`` input comes back as the same object unless its EXIF orientation
had to be applied), EXIF orientation applied (``PIL.ImageOps.exif_transpose``), in its original mode
(L, LA, P, RGB, RGBA, I;16, CMYK, ...). Conversion to RGB is a separate step, :func:`to_rgb`, done the way Hugging
Face image processors do it.

Every failure raises :class:`ocula.errors.MediaError` whose message names the problem and the kind of source.

Pixel limits: the width and height from the header are checked against ``policy.max_pixels`` before any pixel is
decoded. PIL's own guard (``PIL.Image.MAX_IMAGE_PIXELS``, a process-wide setting this module leaves alone) still
applies: its ``DecompressionBombWarning`` is silenced around the decode (our check replaces it) and its
``DecompressionBombError`` becomes a MediaError, so a ``max_pixels`` above twice PIL's limit is capped by PIL.
EPS is never decoded (PIL would hand it to Ghostscript).
"""
from __future__ import annotations

import hashlib

from PIL import Image

from ocula.errors import MediaError
from ocula.media.policy import DEFAULT_POLICY, MediaPolicy
from ocula.media.sources import load_source

__all__ = ["MediaPolicy", "load_image", "to_rgb", "image_digest"]


def load_image(source, policy: MediaPolicy | None = None) -> Image.Image:
    """Load ``source`` (see the module docstring for every accepted kind) as a loaded, EXIF-oriented PIL image."""
    policy = policy or DEFAULT_POLICY
    return load_source(source, policy, 0)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert to RGB exactly like Hugging Face's ``transformers.image_transforms.convert_to_rgb`` (transformers 5,
    which every supported family's image processor calls on a PIL image when ``do_convert_rgb=True``).

    An image with an alpha band (RGBA, LA, PA) or a transparency key (``info["transparency"]``: a P image's
    transparent palette entries, an L or RGB PNG's tRNS colour) is converted to RGBA and composited onto opaque
    white (``PIL.Image.alpha_composite``), so a transparent pixel becomes white, not the colour stored under it.
    Otherwise an RGB image is returned unchanged and any other mode goes through ``image.convert("RGB")``: L is
    replicated to three channels, P looked up in its palette, I;16 / I / F clipped to 0..255, CMYK by PIL's naive
    conversion.
    """
    if not isinstance(image, Image.Image):
        raise MediaError(f"to_rgb: expected a PIL.Image.Image, got {type(image).__name__}")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if image.mode == "RGB" and not has_alpha:
        return image
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise MediaError(f"to_rgb: cannot convert a {image.mode} image to RGB: {e}") from None


def image_digest(image: Image.Image) -> str:
    """sha256 hex of mode, size, palette (for P/PA) and the decoded pixel bytes: a cache key for the pixels."""
    if not isinstance(image, Image.Image):
        raise MediaError(f"image_digest: expected a PIL.Image.Image, got {type(image).__name__}")
    h = hashlib.sha256()
    h.update(f"{image.mode}\0{image.size[0]}x{image.size[1]}\0".encode())
    if image.mode in ("P", "PA"):
        h.update(bytes(image.getpalette() or b""))
    h.update(repr(image.info.get("transparency")).encode())  # to_rgb composites transparent pixels onto white
    h.update(b"\0")
    try:
        h.update(image.tobytes())
    except (OSError, ValueError) as e:
        raise MediaError(f"image_digest: cannot read the pixels: {e}") from None
    return h.hexdigest()
