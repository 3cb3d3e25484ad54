"""Video parts in a conversation → prompt text, encoded features and prompt spans.

Qwen2-VL / Qwen2.5-VL / Qwen3-VL take a clip the way their Hugging Face video processors do
(`ocula.models.vision.qwen_video`): one run of `<|video_pad|>` (Qwen3-VL: one run per temporal slot behind its
`<x.y seconds>` text) whose embeddings come from the vision tower fed pairs of frames.

Every other vision family gets what llama.cpp gives them: the clip sampled to frames (default 1 frame per second,
at most 16; `fps` / `num_frames` / `max_frames` choose otherwise), each frame sent as an image preceded by its
timestamp as text, `[12.50s]`, after a `Video:` label.

Video parts are taken out of the messages before the chat template runs: each becomes a text part holding a private
marker, so templates without a video branch (and templates that have one) render the same text around it; the
marker is then replaced by the family's video prompt text.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ocula.engine.prompt import ImageSpan
from ocula.errors import RequestError
from ocula.media.video import VideoClip, VideoLimits, open_video
from ocula.models.vision.base import ProcessedImage

VIDEO_PART_TYPES = ("video", "video_url", "input_video")
MARKER = "\ue000ocula-video-{}\ue001"
FRAMES_FPS, FRAMES_MAX = 1.0, 16  # other families: frames per second and frame cap by default
FRAME_OPTION_NAMES = ("fps", "num_frames", "max_frames", "do_sample_frames", "min_frames", "size",
                      "min_pixels", "max_pixels", "max_tokens")


def is_video_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") in VIDEO_PART_TYPES


def has_video(messages) -> bool:
    return any(is_video_part(p) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
               for p in m["content"])


def replace_video_parts(messages: list[dict], replace) -> list[dict]:
    """Messages with each video part replaced by the list of parts `replace(part)` returns (in order)."""
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list) or not any(is_video_part(p) for p in content):
            out.append(m)
            continue
        out.append({**m, "content": [q for p in content for q in (replace(p) if is_video_part(p) else [p])]})
    return out


def take_video_parts(messages: list[dict]) -> tuple[list[dict], list]:
    """Messages with each video part replaced by a marker text part, and the parts in order."""
    parts = []

    def marker(part):
        parts.append(part)
        return [{"type": "text", "text": MARKER.format(len(parts) - 1)}]

    return replace_video_parts(messages, marker), parts


def frames_as_images(messages: list[dict], policy, options: dict | None, limits: VideoLimits | None) -> list[dict]:
    """Other families: each video part → 'Video:' text, then per sampled frame a '[t s]' text part and an image."""
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(FRAME_OPTION_NAMES))
    if unknown:
        raise RequestError(f"unknown video option(s): {', '.join(unknown)}; known: {', '.join(FRAME_OPTION_NAMES)}")

    def frames(part):
        clip = open_video(part, policy, limits)
        indices = frame_indices(clip, opts)
        new = [{"type": "text", "text": "Video:"}]
        for i, frame in zip(indices, clip.frames(indices)):
            new.append({"type": "text", "text": f"[{clip.timestamps[i]:.2f}s]"})
            new.append({"type": "image", "image": frame, "video_frame": True})
        return new

    return replace_video_parts(messages, frames)


def frame_indices(clip: VideoClip, opts: dict) -> list[int]:
    """Evenly spaced frames: `num_frames` of them, or `fps` per second (default 1), capped at `max_frames` (16)."""
    total = clip.total_frames
    cap = FRAMES_MAX if opts.get("max_frames") is None else opts["max_frames"]
    if opts.get("num_frames") is not None:
        n = opts["num_frames"]
    else:
        fps = FRAMES_FPS if opts.get("fps") is None else opts["fps"]
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or fps <= 0:
            raise RequestError(f"video option fps must be a positive number, got {fps!r}")
        n = max(1, int(clip.duration * fps))
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or not isinstance(cap, int) or cap < 1:
        raise RequestError("video options num_frames and max_frames must be positive integers")
    n = min(n, cap, total)
    return [min(total - 1, int((k + 0.5) * total / n)) for k in range(n)]


# ------------------------------------------------------------------------------------------------ Qwen-VL


@dataclass
class EncodedVideo:
    features: torch.Tensor
    deepstack: list[torch.Tensor] | None
    processed: ProcessedImage  # grid (t, h, w); extra["video"] holds the ProcessedVideo without its pixels
    encode_ms: float


@dataclass
class PreparedVideo:
    """A loaded clip, and (unless its embeddings were cached) its frames already sampled, resized and patched with
    the settings keyed `settings_key`: the server does this in its thread pool, leaving the encoder's work alone
    to the thread that builds the prompt."""

    clip: VideoClip
    settings_key: str | None = None
    video: object | None = None  # qwen_video.ProcessedVideo


def _cache_key(runtime, clip: VideoClip, settings_key: str) -> str:
    return f"{runtime.fingerprint}:video:{clip.digest}:{settings_key}"


def prepare_video(runtime, clip: VideoClip, options: dict | None) -> PreparedVideo:
    """Sample, decode and preprocess a clip for a Qwen-VL tower now, unless its embeddings are cached."""
    from ocula.models.vision.qwen_video import process_video, settings

    skey = settings(runtime.vision.version, options).key()
    if _cache_key(runtime, clip, skey) in runtime.cache:
        return PreparedVideo(clip)
    return PreparedVideo(clip, skey, process_video(runtime.vision, clip, options))


def encode_video(runtime, source, options: dict | None = None, policy=None,
                 limits: VideoLimits | None = None) -> tuple[str, EncodedVideo]:
    """Encode one clip with a Qwen-VL tower, through the runtime's embedding cache."""
    from ocula.engine.multimodal import Encoded, VisionEncodeError
    from ocula.models.vision.qwen_video import process_video, settings

    vision = runtime.vision
    if not getattr(vision, "version", None) or not hasattr(vision, "temporal"):
        raise RequestError(f"{vision.cfg.projector_type!r} has no native video path")
    if isinstance(source, dict) and isinstance(source.get("video"), PreparedVideo):
        source = source["video"]
    prepared = source if isinstance(source, PreparedVideo) else None
    clip = prepared.clip if prepared else open_video(source, policy, limits)
    skey = settings(vision.version, options).key()
    key = _cache_key(runtime, clip, skey)
    cached = runtime.cache.get(key)
    if cached is not None:
        return key, EncodedVideo(cached.features, cached.deepstack, cached.processed, 0.0)
    with torch.inference_mode():
        ready = prepared is not None and prepared.video is not None and prepared.settings_key == skey
        video = prepared.video if ready else process_video(vision, clip, options)
        if prepared is not None:
            prepared.video = None  # its pixels are not needed once encoded
        t0 = time.perf_counter()
        out = vision.encode(video.processed)
        features, deepstack = out if isinstance(out, tuple) else (out, None)
        ms = (time.perf_counter() - t0) * 1000
    if not bool(torch.isfinite(features).all()):
        raise VisionEncodeError("the vision encoder produced NaN/Inf values for the video (try dtype='float32')")
    if features.shape[0] != video.processed.n_tokens:
        raise VisionEncodeError(f"the projector returned {features.shape[0]} embeddings for a video that needs "
                                f"{video.processed.n_tokens}")
    video.resized = None
    slim = ProcessedImage(torch.empty(0), video.processed.n_tokens, video.processed.grid_thw,
                          {**video.processed.extra, "video": video})
    video.processed = slim
    runtime.cache.put(key, Encoded(features, deepstack, slim, ms))
    return key, EncodedVideo(features, deepstack, slim, ms)


def expand_markers(text: str, encoded: list[EncodedVideo]) -> str:
    from ocula.models.vision.qwen_video import prompt_text

    for i, enc in enumerate(encoded):
        marker = MARKER.format(i)
        if text.count(marker) != 1:
            raise RequestError("the chat template dropped or repeated a video part; it cannot take video here")
        text = text.replace(marker, prompt_text(enc.processed.extra["video"]))
    if MARKER.format(len(encoded)) in text:
        raise RequestError("the messages contain ocula's private video marker text")
    return text


def video_spans(ids: list[int], video_token_id: int, keyed: list[tuple[str, EncodedVideo]]):
    """One ImageSpan per contiguous run of video tokens (Qwen3-VL: per temporal slot), with the grid each run takes
    in M-RoPE: (t, h, w) and its temporal index for Qwen2/2.5-VL, (1, h, w) per slot for Qwen3-VL."""
    slots = [i for i, t in enumerate(ids) if t == video_token_id]
    want = sum(e.processed.n_tokens for _, e in keyed)
    if len(slots) != want:
        raise RequestError(f"the prompt has {len(slots)} video tokens but the videos need {want}: remove literal "
                           "'<|video_pad|>' text from the messages")
    spans, grids, at = [], [], 0
    for key, enc in keyed:
        video = enc.processed.extra["video"]
        t, h, w = enc.processed.grid_thw
        per_run = enc.processed.n_tokens if video.slot_texts is None else video.tokens_per_slot
        n_runs = enc.processed.n_tokens // per_run
        for r in range(n_runs):
            mine = slots[at : at + per_run]
            if mine[-1] - mine[0] != per_run - 1:
                raise RequestError("a video's placeholder tokens are not contiguous in the prompt")
            a, b = r * per_run, (r + 1) * per_run
            deep = None if enc.deepstack is None else [d[a:b] for d in enc.deepstack]
            spans.append(ImageSpan(mine[0], enc.features[a:b], key if n_runs == 1 else f"{key}#{r}", deep, False,
                                   enc.encode_ms if r == 0 else 0.0))
            grid = (t, h, w) if n_runs == 1 else (1, h, w)
            t_index = video.t_index if n_runs == 1 else [0]
            grids.append(ProcessedImage(torch.empty(0), per_run, grid, {"t_index": t_index}))
            at += per_run
    return spans, grids
