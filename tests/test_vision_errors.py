"""Vision bad input: missing or mismatched mmproj, unknown projector, images a model cannot take, broken images."""
import gguf
import pytest
import torch
from conftest import needs_shared
from tiny import FIXTURES

import ocula
from ocula.models.vision import build_vision_model

QWEN = FIXTURES / "models/qwen2vl"
IMAGE = FIXTURES / "images/astronaut_224.png"


def ask(image, text="What is this?"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def test_image_to_text_only_model(tiny_llama):
    model = ocula.load(tiny_llama)
    with pytest.raises(ocula.RequestError, match="text-only model: images( and videos)? need a vision projector"):
        model.chat(ask(b"whatever"), max_tokens=1)
    with pytest.raises(ocula.RequestError, match="no vision projector"):
        model.encode_image(b"whatever")


def test_unknown_projector_type(tmp_path):
    p = tmp_path / "mmproj-odd.gguf"
    w = gguf.GGUFWriter(str(p), "clip")
    w.add_string("clip.projector_type", "hologram")
    for key, value in (("image_size", 224), ("patch_size", 14), ("embedding_length", 8),
                       ("block_count", 1), ("attention.head_count", 1)):
        w.add_uint32(f"clip.vision.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ocula.UnsupportedError, match="projector type 'hologram' is not supported; supported: .*gemma3.*idefics3.*internvl.*mlp.*qwen2vl_merger"):
        build_vision_model(p, 8)


def test_missing_mmproj_file(tiny_llama, tmp_path):
    with pytest.raises(ocula.GGUFError, match="no such file"):
        ocula.load(tiny_llama, mmproj=tmp_path / "absent.gguf")


@needs_shared
def test_mismatched_mmproj_names_both_widths():
    with pytest.raises(ocula.GGUFError, match="projects images to width 32 but the text model's embedding width is 64"):
        ocula.load(FIXTURES / "models/llava/llava-f16.gguf", mmproj=QWEN / "mmproj-qwen2vl-f16.gguf")


@needs_shared
def test_text_model_passed_as_mmproj():
    with pytest.raises(ocula.GGUFError, match="expected an mmproj"):
        ocula.load(QWEN / "qwen2vl-f16.gguf", mmproj=QWEN / "qwen2vl-f16.gguf")


@pytest.fixture(scope="module")
def qwen():
    if not FIXTURES.exists():
        pytest.skip("shared fixtures absent")
    return ocula.load(QWEN / "qwen2vl-f16.gguf", mmproj=QWEN / "mmproj-qwen2vl-f16.gguf")


def test_broken_and_non_images(qwen, tmp_path):
    with pytest.raises(ocula.MediaError, match="cannot identify image|not an image"):
        qwen.chat(ask(b"this is not an image"), max_tokens=1)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(IMAGE.read_bytes()[:300])
    with pytest.raises(ocula.MediaError, match="truncated|broken|cannot"):
        qwen.chat(ask(str(truncated)), max_tokens=1)
    with pytest.raises(ocula.MediaError):
        qwen.chat(ask(str(tmp_path / "missing.png")), max_tokens=1)


def test_literal_image_token_in_text_is_refused(qwen):
    with pytest.raises(ocula.RequestError, match="placed 2 image placeholder.*for 1 image.*must not contain that text literally"):
        qwen.chat(ask(str(IMAGE), "look <|image_pad|> here"), max_tokens=1)


def test_nan_guard(qwen, monkeypatch):
    vision = qwen.vision.vision
    monkeypatch.setattr(vision, "encode", lambda processed: torch.full((processed.n_tokens, 32), float("nan")))
    qwen.vision.cache = type(qwen.vision.cache)()  # nothing cached from earlier tests
    with pytest.raises(ocula.OculaError, match="NaN/Inf"):
        qwen.encode_image(str(IMAGE))


def test_multiple_images_keep_order_and_are_not_merged(qwen):
    small = FIXTURES / "images/tiny_8x8.png"
    prompt = qwen.build_prompt(ask(str(IMAGE)) + [{"role": "assistant", "content": "ok"}] + ask(str(small)))
    assert [img.features.shape[0] for img in prompt.images] == [64, 4]
    assert prompt.images[0].stop < prompt.images[1].start
