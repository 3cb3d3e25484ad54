"""One test per case of the video fixtures (../shared/fixtures/video, or $OCULA_FIXTURES/video), through the public
API: decoded and sampled frames, resized frames and pixel values bit for bit (sha256), grid, prompt ids, M-RoPE
positions (prompt and generated) exactly; video features (and Qwen3-VL deepstack) within rtol 1e-4; last logits
within atol 1e-3 with the same argmax; greedy tokens equal up to the first HF step whose margin is below 1e-3."""
import hashlib
import json
from functools import lru_cache

import numpy as np
import pytest
from parity import FIXTURES, greedy_checkable, load_model, rel_err

VIDEO = FIXTURES / "video"
av = pytest.importorskip("av", reason="video input needs PyAV (pip install 'ocula[video]')")


@lru_cache(maxsize=None)
def video_manifest() -> dict:
    path = VIDEO / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {"models": {}, "cases": [], "clips": {}}


CASES = video_manifest()["cases"]


def sha(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def model_of(case):
    files = video_manifest()["models"][case["model"]]["gguf"]
    text, mmproj = (VIDEO / files["text"]).resolve(), (VIDEO / files["mmproj"]).resolve()
    if not text.exists() or not mmproj.exists():
        pytest.skip(f"fixture model {case['model']} absent")
    return load_model(str(text), str(mmproj))


def _part(part):
    if isinstance(part, dict) and part.get("type") == "video" and "path" in part:
        return {"type": "video", "video": str(VIDEO / part["path"])}
    return part


def messages_of(case):
    """The case's chat as recorded (video parts name their clip by path), else system + [clip, question]."""
    if case.get("messages"):
        return [{**m, "content": m["content"] if isinstance(m["content"], str) else [_part(p) for p in m["content"]]}
                for m in case["messages"]]
    messages = [{"role": "system", "content": case["system"]}] if case.get("system") else []
    return messages + [{"role": "user", "content": [{"type": "video", "video": str(VIDEO / case["clip"])},
                                                    {"type": "text", "text": case["question"]}]}]


def clip_info(case) -> dict:
    clips = video_manifest()["clips"]
    name = case["clip"].split("/")[-1]
    return clips.get(name) or clips.get(case["clip"]) or next(c for c in clips.values() if c.get("file") == name)


@pytest.mark.skipif(not CASES, reason=f"no video fixture manifest at {VIDEO} (shared fixtures absent)")
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_video_case_matches_hf(case):
    from ocula.media.video import open_video
    from ocula.models.vision.qwen_video import process_video

    model = model_of(case)
    ref = np.load(VIDEO / case["reference_npz"])
    options = case["processor_call_kwargs"]
    info = clip_info(case)
    clip = open_video(VIDEO / case["clip"])
    assert clip.total_frames == info["metadata"]["total_num_frames"]
    assert clip.fps == info["metadata"]["fps"]
    assert sha(clip.frames(range(clip.total_frames))) == info["decoded_rgb_sha256"]
    video = process_video(model.vision.vision, clip, options)
    assert video.indices == ref["frame_indices"].tolist()
    assert sha(clip.frames(video.indices)) == case["sampled_rgb_sha256"]
    assert sha(video.resized) == case["resized_rgb_sha256"]
    assert sha(video.processed.pixel_values.numpy()) == case["pixel_values_videos_sha256"]
    assert list(video.processed.grid_thw) == case["video_grid_thw"]

    messages = messages_of(case)
    prompt = model.build_prompt(messages, video_options=options)
    assert prompt.token_ids == ref["input_ids"].tolist()
    assert prompt.positions.tolist() == ref["position_ids"].tolist()
    L = len(prompt.token_ids)
    assert prompt.next_position == L + int(ref["rope_delta"])

    feats, deep = model.encode_video(VIDEO / case["clip"], video_options=options, deepstack=True)
    assert rel_err(feats.numpy(), ref["video_features"]) <= 1e-4
    if "deepstack_features" in ref.files:
        assert rel_err(np.stack([d.numpy() for d in deep]), ref["deepstack_features"]) <= 1e-4

    logits, want = model.logits(messages, video_options=options).numpy(), ref["logits_last"]
    assert float(np.abs(logits - want).max()) <= 1e-3
    assert logits.argmax() == want.argmax()
    want = ref["greedy_tokens"].tolist()
    got = model.chat(messages, video_options=options, max_tokens=len(want), temperature=0, ignore_eos=True).token_ids
    prefix = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert prefix >= greedy_checkable(case, len(want)), (got, want)
    gen = ref["generated_position_ids"]
    assert gen[0].tolist() == list(range(prompt.next_position, prompt.next_position + gen.shape[1]))
    assert (gen == gen[0]).all()
