"""Transparent images are encoded as Hugging Face's processors see them: composited onto white (transformers 5's
convert_to_rgb), for every vision family of the fixtures. The fixtures' own RGBA image is fully opaque, so the
transparent picture is made here: a real photo with a gradient alpha and a fully transparent corner."""
import numpy as np
import pytest
import torch
from conftest import needs_shared
from parity import FIXTURES, manifest, model_for
from PIL import Image

VISION = sorted(n for n, m in manifest().get("models", {}).items() if m["gguf"].get("mmproj")) if FIXTURES.exists() \
    else []


def transparent_photo() -> Image.Image:
    rgb = np.asarray(Image.open(FIXTURES / "images/astronaut_224.png").convert("RGB"))
    h, w = rgb.shape[:2]
    alpha = np.tile(np.linspace(40, 255, w, dtype=np.float32), (h, 1)).astype(np.uint8)
    alpha[: h // 3, : w // 3] = 0
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def white_composite(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


@needs_shared
@pytest.mark.parametrize("name", VISION)
def test_transparent_image_features_equal_the_white_composite(name):
    model = model_for(name)
    rgba = transparent_photo()
    got = model.encode_image(rgba)
    want = model.encode_image(white_composite(rgba))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    dropped = model.encode_image(rgba.convert("RGB"))  # what ignoring the alpha gave
    assert (got - dropped).abs().max() > 1e-3 * dropped.abs().max()
