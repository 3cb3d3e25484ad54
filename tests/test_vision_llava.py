"""LLaVA-1.5 / LLaVA-1.6 (NeXT) parity with HF transformers.

- Fixture cases (llava_astronaut, llava_chelsea): CLIPImageProcessor pixels and CLIP ViT + MLP projector features
  against the HF reference npz (prompt ids, last logits and greedy tokens through the public API are checked for
  every case in test_fixture_cases.py).
- LLaVA-1.6 anyres has no fixture: the expected grid choices, token counts and feature checksums below were
  derived by running HF transformers 5.24 (`select_best_resolution`, `LlavaNextProcessor._get_number_of_features`,
  `LlavaNextImageProcessorPil`, `LlavaNextModel.get_image_features`) on an mmproj derived from the llava fixture
  (pinpoints + a linspace newline embedding), rebuilt here in a temporary directory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_set_a
from parity import FIXTURES, cases_of, check_encoder, check_preprocess, open_image, vision_for
from PIL import Image

from ocula.models.vision.base import ImageOptions
from ocula.models.vision.llava import (
    anyres_token_count,
    center_crop,
    patch_output_size,
    select_best_resolution,
    shortest_edge_size,
    unpad_bounds,
)

CASES = cases_of("llava")
CASE_IDS = [c["id"] for c in CASES]
PINS_224 = [(224, 448), (448, 224), (448, 448), (672, 224), (224, 672)]  # (height, width), as HF reads them
PINS_336 = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]  # released LLaVA-1.6

needs_fixtures = needs_set_a("llava")


def _derived_mmproj(path: Path, extra_kv: dict, extra_tensors: dict, replace: dict | None = None) -> Path:
    """Copy the fixture mmproj (tensors as float32) adding/replacing metadata keys and tensors."""
    import gguf

    from ocula.models.weights import float_tensor

    src = vision_for("llava").gguf
    replace = replace or {}
    w = gguf.GGUFWriter(str(path), "clip")
    for k, v in src.metadata.items():
        if k == "general.architecture" or k in extra_kv:
            continue
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, list):
            w.add_array(k, v)
    for k, v in extra_kv.items():
        w.add_array(k, v)
    for name, t in src.tensors.items():
        value = replace.get(name)
        w.add_tensor(name, np.asarray(value if value is not None else float_tensor(t).numpy(), dtype=np.float32))
    for name, arr in extra_tensors.items():
        w.add_tensor(name, np.asarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def vision():
    return vision_for("llava")


@pytest.fixture(scope="module")
def next_vision(tmp_path_factory):
    """The fixture encoder as a LLaVA-1.6 mmproj: 224-px pinpoints + newline = linspace(-1, 1, 64)."""
    from ocula.models.vision import build_vision_model

    path = tmp_path_factory.mktemp("llava_next") / "mmproj-next.gguf"
    flat = [v for pin in PINS_224 for v in pin]
    _derived_mmproj(path, {"clip.vision.image_grid_pinpoints": flat},
                    {"model.image_newline": np.linspace(-1.0, 1.0, 64, dtype=np.float32)})
    return build_vision_model(path, 64)


# ---------------------------------------------------------------- pure geometry (numbers derived from HF code)


def test_shortest_edge_size_truncates_like_hf():
    assert shortest_edge_size(300, 451, 224) == (224, 336)  # int(224 * 451 / 300) = 336
    assert shortest_edge_size(451, 300, 224) == (336, 224)
    assert shortest_edge_size(50, 1000, 224) == (224, 4480)
    assert shortest_edge_size(200, 300, 336) == (336, 504)
    assert shortest_edge_size(7, 10, 224) == (224, 320)
    assert shortest_edge_size(3, 10, 224) == (224, 746)  # 746.66 truncated, not rounded
    assert shortest_edge_size(224, 224, 224) == (224, 224)


def test_center_crop_offsets_and_padding():
    arr = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7, 1)
    out = center_crop(arr, 3, 4)
    assert np.array_equal(out, arr[1:4, 1:5])
    small = np.full((2, 3, 1), 9, dtype=np.uint8)
    out = center_crop(small, 4, 4)  # HF pads with zeros, image placed at ceil offsets (checked against HF)
    assert out.shape == (4, 4, 1)
    assert np.array_equal(out[..., 0], np.array([[0, 0, 0, 0], [0, 9, 9, 9], [0, 9, 9, 9], [0, 0, 0, 0]]))
    tall = np.full((5, 2, 1), 7, dtype=np.uint8)  # taller than the crop, narrower than it
    assert np.array_equal(center_crop(tall, 3, 4)[..., 0], np.array([[0, 7, 7, 0]] * 3))


def test_select_best_resolution_matches_hf():
    # (height, width) of the image -> HF's choice among (height, width) pinpoints
    assert select_best_resolution((300, 451), PINS_224) == (448, 448)
    assert select_best_resolution((50, 1000), PINS_224) == (224, 672)
    assert select_best_resolution((1000, 50), PINS_224) == (672, 224)
    assert select_best_resolution((224, 224), PINS_224) == (224, 448)  # tie on effective area: least waste, first
    assert select_best_resolution((480, 640), PINS_336) == (672, 672)
    assert select_best_resolution((300, 451), PINS_336) == (336, 672)
    assert select_best_resolution((200, 1500), PINS_336) == (336, 1008)


def test_patch_output_size_and_unpad():
    assert patch_output_size((300, 451), (448, 448)) == (299, 448)  # ceil(298.004) = 299
    assert patch_output_size((50, 1000), (224, 672)) == (34, 672)
    assert patch_output_size((1000, 50), (672, 224)) == (672, 34)
    # 32 x 32 feature grid of a 300 x 451 image: 5 padded rows cut on each side, as HF unpad_image
    assert unpad_bounds((300, 451), (32, 32)) == (5, 27, 0, 32)
    assert unpad_bounds((451, 300), (32, 32)) == (0, 32, 5, 27)
    assert unpad_bounds((50, 1000), (32, 16)) == (16, 16, 0, 16)  # nothing survives: base tile only


def test_anyres_token_counts_match_hf_processor():
    hf = {  # LlavaNextProcessor._get_number_of_features(...) - 1 for each pinpoint of PINS_224
        (300, 451): [656, 426, 982, 426, 656],
        (451, 300): [432, 664, 992, 664, 432],
        (50, 1000): [322, 256, 322, 256, 354],
        (224, 224): [528, 528, 1312, 528, 528],
        (480, 640): [624, 460, 1048, 460, 624],
        (1000, 50): [272, 352, 352, 400, 272],
    }
    for hw, counts in hf.items():
        assert [anyres_token_count(hw, pin, 224, 14) for pin in PINS_224] == counts
    # released LLaVA-1.6 geometry (336 px, ViT-L/14): HF processor counts
    for hw, want in {(480, 640): 2340, (300, 451): 1464, (1000, 1000): 2928, (768, 1024): 2340,
                     (200, 1500): 1306}.items():
        assert anyres_token_count(hw, select_best_resolution(hw, PINS_336), 336, 14) == want
    # without a newline embedding, one token fewer per kept row
    assert anyres_token_count((300, 451), (448, 448), 224, 14, newline=False) == 982 - 22


# ---------------------------------------------------------------- LLaVA-1.5 parity with the HF reference


@needs_fixtures
def test_loader_runs_every_stored_block(vision):
    # HF: 3 layers, vision_feature_layer=-2 -> hidden_states[2]; the legacy converter stored 2 blocks.
    assert vision.cfg.n_layer == 2 and len(vision.v.blk) == 2 and vision.feature_layers == [2]
    assert vision.pinpoints is None and vision.image_newline is None
    assert vision.output_dim == 64


@needs_fixtures
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_preprocess_parity(vision, case):
    processed = check_preprocess(vision, case)
    assert processed.n_tokens == 256
    assert vision.prompt_text(processed) == "<image>" * 256


@needs_fixtures
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_encoder_parity(vision, case):
    check_encoder(vision, case)


@needs_fixtures
def test_budgets_do_not_change_llava15(vision):
    image = open_image("images/chelsea_451x300.png")
    base = vision.preprocess(image, ImageOptions())
    for opts in (ImageOptions(max_tokens=16), ImageOptions(min_tokens=4096)):
        p = vision.preprocess(image, opts)
        assert p.n_tokens == 256 and torch.equal(p.pixel_values, base.pixel_values)


@needs_fixtures
def test_grayscale_rgba_and_tiny_inputs(vision):
    for name in ("camera_gray_128.png", "logo_rgba_128.png", "tiny_8x8.png", "wide_1000x50.png"):
        path = FIXTURES / "images" / name
        if path.exists():
            p = vision.preprocess(open_image(path), ImageOptions())
            assert p.pixel_values.shape == (1, 3, 224, 224) and p.n_tokens == 256


@needs_fixtures
def test_feature_layer_key_concatenates_hidden_states(tmp_path):
    """`clip.vision.feature_layer` = [2, 0] (HF vision_feature_layer [-2, -4] on 3 layers): hidden states 2 and 0
    concatenated -> mm.0 of width 64. Checksums from HF LlavaForConditionalGeneration with the same weights."""
    from ocula.models.vision import build_vision_model

    rng = np.random.default_rng(0)
    mm0 = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    path = _derived_mmproj(tmp_path / "mmproj-fl.gguf", {"clip.vision.feature_layer": [2, 0]}, {},
                           replace={"mm.0.weight": mm0})
    vis = build_vision_model(path, 64)
    assert vis.feature_layers == [2, 0] and len(vis.v.blk) == 2
    with torch.inference_mode():
        p = vis.preprocess(open_image("images/chelsea_451x300.png"), ImageOptions())
        feats = vis.encode(p).numpy()
    assert feats.shape == (256, 64)
    scale = np.abs(feats).max()
    np.testing.assert_allclose(np.abs(feats).sum(), HF_FL_ABS_SUM, rtol=1e-4)
    np.testing.assert_allclose(feats[[0, 100, 255], :4], HF_FL_ROWS, rtol=0, atol=1e-4 * scale)


HF_FL_ABS_SUM = 11046.87
HF_FL_ROWS = np.array([
    [0.6164987, -0.2268853, -0.472977, -0.8369352],
    [0.409214, -0.7202821, 0.867494, 0.8306543],
    [2.066529, 0.6094114, 0.001346875, -0.9662843],
])
HF_NEXT = {  # image -> HF token count, pinpoint, sum |features|, rows [0, 300, n-2][:4]
    "chelsea_451x300.png": dict(n=982, best=(448, 448), abs_sum=48359.99, rows=[0, 300, 980], values=np.array([
        [-0.4282711, -0.07036376, 0.2829567, 0.2375665],
        [2.247913, 0.7019472, 0.09257282, 0.4383781],
        [-1.059562, 1.268052, 0.1997513, 1.518826],
    ])),
    "wide_1000x50.png": dict(n=354, best=(224, 672), abs_sum=18113.96, rows=[0, 300, 352], values=np.array([
        [1.307269, 0.8796071, -0.5080371, -0.1514911],
        [0.1538854, 0.3837893, 0.1496571, 0.3634996],
        [2.353276, 1.347728, -0.3971657, -0.7183967],
    ])),
    "coffee_300x200.jpg": dict(n=656, best=(224, 448), abs_sum=30726.26, rows=[0, 300, 654], values=np.array([
        [1.928764, 1.581506, -0.07179713, -0.03675386],
        [1.535969, 1.753101, -0.2430102, -0.8979994],
        [2.387508, 1.729728, -1.067946, -0.1375552],
    ])),
    "camera_gray_128.png": dict(n=528, best=(224, 448), abs_sum=25351.02, rows=[0, 300, 526], values=np.array([
        [-0.2803625, -0.7613769, -0.3601552, 0.3094213],
        [-0.3742861, -0.4341872, 0.01477546, 0.3607389],
        [0.04879679, -0.3616556, 0.5542244, -0.4752697],
    ])),
}


# ---------------------------------------------------------------- LLaVA-1.6 (anyres) on a derived mmproj


@needs_fixtures
def test_next_preprocess_tiles(next_vision):
    s = 224
    image = open_image("images/chelsea_451x300.png").convert("RGB")
    p = next_vision.preprocess(image, ImageOptions())
    assert p.extra["best_resolution"] == (448, 448) and p.extra["grid"] == (2, 2)
    assert tuple(p.pixel_values.shape) == (5, 3, s, s)
    assert p.n_tokens == 982
    mean = torch.tensor(next_vision.cfg.image_mean).view(3, 1, 1)
    std = torch.tensor(next_vision.cfg.image_std).view(3, 1, 1)
    to_u8 = lambda t: torch.round((t * std + mean) * 255).clamp(0, 255).to(torch.uint8)  # noqa: E731
    # base tile: the whole image stretched (bicubic) to S x S
    base = torch.from_numpy(np.asarray(image.resize((s, s), Image.Resampling.BICUBIC))).permute(2, 0, 1)
    assert torch.equal(to_u8(p.pixel_values[0]), base)
    # tiles reassemble into the 448 x 448 canvas: image resized to 448 x 299, centred (74 black rows above)
    canvas = torch.cat([torch.cat([to_u8(p.pixel_values[1 + r * 2 + c]) for c in range(2)], dim=2) for r in range(2)],
                       dim=1)
    resized = torch.from_numpy(np.asarray(image.resize((448, 299), Image.Resampling.BICUBIC))).permute(2, 0, 1)
    assert torch.equal(canvas[:, 74 : 74 + 299], resized)
    assert int(canvas[:, :74].max()) == 0 and int(canvas[:, 74 + 299 :].max()) == 0


@needs_fixtures
def test_next_encode_matches_hf(next_vision):
    with torch.inference_mode():
        for name, want in HF_NEXT.items():
            p = next_vision.preprocess(open_image(f"images/{name}"), ImageOptions())
            feats = next_vision.encode(p).numpy()
            assert feats.shape == (want["n"], 64) == (p.n_tokens, 64)
            assert p.extra["best_resolution"] == want["best"]
            scale = np.abs(feats).max()
            np.testing.assert_allclose(np.abs(feats).sum(), want["abs_sum"], rtol=1e-4)
            np.testing.assert_allclose(feats[want["rows"], :4], want["values"], rtol=0, atol=1e-4 * scale)


@needs_fixtures
def test_next_newline_layout(next_vision):
    """After the g² base rows, each kept grid row is W' feature rows + the newline embedding."""
    image = open_image("images/chelsea_451x300.png")
    with torch.inference_mode():
        p = next_vision.preprocess(image, ImageOptions())
        feats = next_vision.encode(p)
    g = 16
    r0, r1, c0, c1 = unpad_bounds((300, 451), (2 * g, 2 * g))
    width = c1 - c0 + 1
    body = feats[g * g :].reshape(r1 - r0, width, -1)
    newline = torch.from_numpy(np.linspace(-1.0, 1.0, 64, dtype=np.float32))
    assert torch.equal(body[:, -1], newline.expand(r1 - r0, -1))
    assert not torch.isclose(body[:, :-1], newline).all(dim=-1).any()


@needs_fixtures
def test_next_token_budget(next_vision):
    """Budgets restrict the pinpoints before HF's best-fit choice. chelsea (300 x 451) costs
    [656, 426, 982, 426, 656] tokens on PINS_224; HF's default pick is (448, 448) = 982."""
    image = open_image("images/chelsea_451x300.png")

    def run(**kw):
        p = next_vision.preprocess(image, ImageOptions(**kw))
        assert p.pixel_values.shape[0] == 1 + p.extra["grid"][0] * p.extra["grid"][1]
        return p.extra["best_resolution"], p.n_tokens

    assert run() == ((448, 448), 982)
    assert run(max_tokens=982) == ((448, 448), 982)
    assert run(max_tokens=700) == ((224, 448), 656)
    assert run(max_tokens=500) == ((448, 224), 426)
    assert run(max_tokens=10) == ((448, 224), 426)  # nothing fits: the fewest tokens
    assert run(min_tokens=900) == ((448, 448), 982)
    assert run(min_tokens=5000) == ((448, 448), 982)  # nothing reaches it: the most tokens
    assert run(min_tokens=600, max_tokens=700) == ((224, 448), 656)
    assert run(min_tokens=900, max_tokens=700) == ((224, 448), 656)  # conflict: the ceiling wins
    with torch.inference_mode():
        p = next_vision.preprocess(image, ImageOptions(max_tokens=500))
        assert next_vision.encode(p).shape[0] == p.n_tokens == 426
