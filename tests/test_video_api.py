"""Video through the library API with the fixture models: every part form gives the same prompt and logits, the
embedding cache spares a second decode and encode, options are checked, images and videos mix with the release
M-RoPE rule, and other families get sampled frames as images with their timestamps."""
import base64

import numpy as np
import pytest
import torch
from parity import FIXTURES, load_model

import ocula
from ocula.media.video import VideoClip, open_video

pytest.importorskip("av", reason="video input needs PyAV (pip install 'ocula[video]')")

CLIP = FIXTURES / "video" / "clips" / "a_coffee_zoom_30fps.mp4"
WEBM = FIXTURES / "video" / "clips" / "a_chelsea_panzoom_25fps.webm"
IMAGE = FIXTURES / "images" / "astronaut_224.png"
OPTIONS = {"do_sample_frames": True, "fps": 2}


def model(name: str) -> ocula.Model:
    text, mmproj = FIXTURES / "models" / name / f"{name}-f16.gguf", FIXTURES / "models" / name / f"mmproj-{name}-f16.gguf"
    if not (text.exists() and mmproj.exists() and CLIP.exists()):
        pytest.skip(f"fixture model {name} or the video clips absent")
    return load_model(str(text), str(mmproj))


def ask(video, text="What happens in this clip?", **part) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "video": video, **part}, {"type": "text", "text": text}]}]


def test_every_form_gives_the_same_prompt_and_logits():
    m = model("qwen25vl")
    frames = open_video(CLIP).frames(range(45))
    b64 = base64.b64encode(CLIP.read_bytes()).decode()
    forms = [ask(str(CLIP)), ask(CLIP.read_bytes()), ask(f"data:video/mp4;base64,{b64}"), ask(frames, fps=30.0),
             [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": CLIP.as_uri()}},
                                           {"type": "text", "text": "What happens in this clip?"}]}]]
    prompts = [m.build_prompt(f, video_options=OPTIONS) for f in forms]
    for p in prompts[1:]:
        assert p.token_ids == prompts[0].token_ids
        assert torch.equal(p.positions, prompts[0].positions)
    want = m.logits(forms[0], video_options=OPTIONS)
    assert torch.allclose(m.logits(forms[3], video_options=OPTIONS), want, atol=1e-5)
    # the frames' rate sets Qwen2.5-VL's temporal positions: the same frames at another rate differ
    slower = m.build_prompt(ask(frames, fps=15.0), video_options=OPTIONS)
    assert not torch.equal(slower.positions, prompts[0].positions)


def test_second_use_is_cached_without_decoding(monkeypatch):
    m = model("qwen2vl")
    options = {"do_sample_frames": True, "num_frames": 6}
    first = m.prompt_token_ids(ask(str(CLIP)), video_options=options)
    decodes = []
    original = VideoClip.frames
    monkeypatch.setattr(VideoClip, "frames", lambda self, idx: decodes.append(idx) or original(self, idx))
    hits = m.vision.cache.hits
    assert m.prompt_token_ids(ask(str(CLIP)), video_options=options) == first
    assert m.vision.cache.hits == hits + 1 and decodes == []
    m.prompt_token_ids(ask(str(CLIP)), video_options={"do_sample_frames": True, "num_frames": 8})
    assert len(decodes) == 1  # other options: a new sampling, decoded and encoded again


@pytest.mark.parametrize("options, message", [
    ({"frames_per_second": 2}, "unknown video option"),
    ({"fps": 0}, "fps must be a positive number"),
    ({"fps": 2, "num_frames": 4}, "mutually exclusive"),
    ({"size": {"shortest_edge": 10}, "max_pixels": 5}, "pixel budget is empty"),
    ({"size": [1, 2]}, "size must be"),
    ({"do_sample_frames": "yes"}, "true or false"),
    ({"do_sample_frames": True, "num_frames": 200}, "only 45"),
    ({"max_tokens": 8}, "more than max_tokens 8"),
])
def test_bad_options_are_named(options, message):
    m = model("qwen2vl")
    with pytest.raises(ocula.RequestError, match=message):
        m.prompt_token_ids(ask(str(CLIP)), video_options=options)


def test_literal_video_pad_text_is_refused():
    m = model("qwen2vl")
    with pytest.raises(ocula.RequestError, match="video tokens"):
        m.prompt_token_ids(ask(str(CLIP), text="<|video_pad|> hello"), video_options=OPTIONS)


@pytest.mark.parametrize("name", ["qwen2vl", "qwen25vl", "qwen3vl"])
def test_image_and_video_in_one_turn_follow_the_release_positions(name):
    m = model(name)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(IMAGE)},
                                             {"type": "video", "video": str(WEBM)},
                                             {"type": "text", "text": "Compare them."}]}]
    prompt = m.build_prompt(messages, video_options={"do_sample_frames": True, "fps": 2})
    spans = prompt.images
    assert len(spans) == (3 if name == "qwen3vl" else 2)  # Qwen3-VL: one run per temporal slot
    assert [s.start for s in spans] == sorted(s.start for s in spans)
    pos = prompt.positions
    for s in spans:  # the text after every vision group continues after the group's largest position
        assert (pos[:, s.stop] == pos[0, s.stop]).all()  # a text token: the same position in all three rows
        assert int(pos[0, s.stop]) == int(pos[:, s.start : s.stop].max()) + 1
    assert prompt.next_position == int(pos.max()) + 1
    feats, deep = m.encode_video(str(WEBM), video_options={"do_sample_frames": True, "fps": 2}, deepstack=True)
    assert sum(s.features.shape[0] for s in spans[1:]) == feats.shape[0]
    assert len(deep) == (2 if name == "qwen3vl" else 0)


def test_other_families_get_frames_as_images_with_timestamps():
    m = model("gemma3")
    messages = ask(str(WEBM), text="What animal is this?")
    prompt = m.build_prompt(messages, video_options={"fps": 1})
    text = m.detokenize(prompt.token_ids)
    assert "Video:" in text and "[0.60s]" in text and "[1.80s]" in text  # 2.4 s at 1 fps: frames 15 and 45
    assert len(prompt.images) == 2
    frames = open_video(WEBM).frames([15, 45])
    want = [m.encode_image(f) for f in frames]
    for span, w in zip(prompt.images, want):
        assert torch.equal(span.features, w)
    assert len(m.build_prompt(messages, video_options={"num_frames": 5}).images) == 5
    # a clip's frames are not images sent: max_images still counts only the images
    assert len(m.build_prompt(messages, max_images=0, video_options={"num_frames": 5}).images) == 5
    assert len(m.build_prompt(messages, video_options={"fps": 10, "max_frames": 3}).images) == 3
    with pytest.raises(ocula.RequestError, match="no video encoder"):
        m.encode_video(str(WEBM))
    with pytest.raises(ocula.RequestError, match="unknown video option"):
        m.build_prompt(messages, video_options={"frames": 3})
    with pytest.raises(ocula.RequestError, match="fps must be a positive number"):
        m.build_prompt(messages, video_options={"fps": 0})
    with pytest.raises(ocula.RequestError, match="must be positive integers"):
        m.build_prompt(messages, video_options={"max_frames": 0})
    assert np.asarray(frames).shape == (2, 150, 200, 3)


def test_a_clip_longer_than_the_context_is_refused_before_decoding(monkeypatch):
    model("qwen2vl")  # skips without the fixtures
    small = ocula.load(FIXTURES / "models/qwen2vl/qwen2vl-f16.gguf",
                       mmproj=FIXTURES / "models/qwen2vl/mmproj-qwen2vl-f16.gguf", n_ctx=128)
    monkeypatch.setattr(VideoClip, "frames", lambda self, idx: pytest.fail("frames decoded"))
    with pytest.raises(ocula.RequestError, match="more than max_tokens 128"):
        small.prompt_token_ids(ask(str(CLIP)))  # every frame (the processor's default): 23 slots x 35 tokens


@pytest.mark.parametrize("name", ["internvl", "smolvlm", "llava"])
def test_frames_as_images_in_every_other_family(name):
    m = model(name)
    prompt = m.build_prompt(ask(str(CLIP)), video_options={"num_frames": 2})
    text = m.detokenize(prompt.token_ids)
    assert "Video:" in text and "[0.37s]" in text and "[1.10s]" in text  # frames 11 and 33 of 45 at 30 fps
    want = sum(m.encode_image(f).shape[0] for f in open_video(CLIP).frames([11, 33]))
    assert sum(s.features.shape[0] for s in prompt.images) == want
