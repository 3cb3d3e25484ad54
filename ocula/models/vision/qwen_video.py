"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL video: the Hugging Face video processors' sampling, resize and patches, the
prompt expansion and the M-RoPE temporal index of the Qwen release code.

Numerical reference: transformers 5.24 `Qwen2VLVideoProcessor` / `Qwen3VLVideoProcessor`, with the Qwen release
rules where 5.24 departs from them (text after a video continues after its largest position; Qwen3-VL's
`<|vision_start|><|video_pad|><|vision_end|>` is replaced as a whole by the per-slot blocks; Qwen2.5-VL's
tokens_per_second is the released 2: the GGUF carries none).

- Sampling. Qwen2/2.5-VL (default: every frame): with `do_sample_frames`, `num_frames` k → round(k/2)*2 frames,
  `fps` f → total/video_fps*f clamped to [min_frames, floor(min(max_frames, total)/2)*2] and total, floored to even;
  indices `arange(0, total, total/n)` truncated. Qwen3-VL (default fps 2): n = int(total/video_fps*fps) clamped to
  [min_frames, min(max_frames, total)], indices `linspace(0, total-1, n)` rounded half to even.
- Resize: torch's antialiased bicubic on the uint8 frames (what torchvision's resize runs on CPU), to
  `smart_resize` per frame (factor 28) for Qwen2/2.5-VL, over the whole clip (T·H·W, factor 32) for Qwen3-VL.
- Pixels: (float32(u8) - float32(mean)*255) / (float32(std)*255) in float32, an odd frame count padded by repeating
  the last frame, pairs of frames as temporal patches (rows ordered slot, merged row, merged column, row and column
  in the merge block; features channel, frame, y, x) — the layout the 3-D patch embedding expects.
- Positions: Qwen2-VL t = slot; Qwen2.5-VL t = floor(slot * float32(2 / sampled_fps) * 2) in float32; Qwen3-VL
  every slot is its own group of t = 1 behind its `<x.y seconds>` text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from ocula.errors import MediaError, RequestError
from ocula.models.vision.base import ProcessedImage

VIDEO_PAD = "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
TEMPORAL = 2  # temporal_patch_size of every released Qwen-VL
QWEN25_TOKENS_PER_SECOND = 2  # released Qwen2.5-VL models; absent from the GGUF
MAX_ASPECT = 200
OPTION_NAMES = ("fps", "num_frames", "do_sample_frames", "min_frames", "max_frames", "size", "min_pixels",
                "max_pixels", "cap_pixels_per_frame", "max_tokens")
# cap_pixels_per_frame budgets (the processors' max_video_tokens, which a call cannot change)
CAP_TOTAL_TOKENS = {2: 128000, 3: 768}

# the processors' defaults (transformers 5.24; Qwen3-VL: the hub repos' video_preprocessor_config.json)
DEFAULTS = {
    2: dict(do_sample_frames=False, fps=None, num_frames=None, min_frames=4, max_frames=768,
            size={"shortest_edge": 3136, "longest_edge": 12845056}),
    3: dict(do_sample_frames=True, fps=2, num_frames=None, min_frames=4, max_frames=768,
            size={"shortest_edge": 4096, "longest_edge": 25165824}),
}


@dataclass
class VideoSettings:
    do_sample_frames: bool
    fps: float | None
    num_frames: int | None
    min_frames: int
    max_frames: int
    min_pixels: int
    max_pixels: int
    cap_pixels_per_frame: bool = False
    max_tokens: int | None = None  # ocula's own cap on the merged tokens of one clip

    def key(self) -> str:
        """What the embeddings depend on (max_tokens only refuses a clip, so it is left out)."""
        return (f"{self.do_sample_frames}:{self.fps!r}:{self.num_frames}:{self.min_frames}:{self.max_frames}:"
                f"{self.min_pixels}:{self.max_pixels}:{self.cap_pixels_per_frame}")


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestError(f"video option {name} must be a positive integer, got {value!r}")
    return value


def settings(version: int, options: dict | None) -> VideoSettings:
    """The processor's defaults for this family overridden by `options` (HF's keyword names)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise RequestError(f"unknown video option(s): {', '.join(unknown)}; known: {', '.join(OPTION_NAMES)}")
    d = dict(DEFAULTS[3 if version == 3 else 2])
    size = dict(d.pop("size"))
    options = {k: v for k, v in options.items() if v is not None}
    if "size" in options:
        given = options.pop("size")
        if not isinstance(given, dict) or set(given) - {"shortest_edge", "longest_edge"}:
            raise RequestError("video option size must be {'shortest_edge': min pixels, 'longest_edge': max pixels}")
        size.update(given)
    if "min_pixels" in options:
        size["shortest_edge"] = options.pop("min_pixels")
    if "max_pixels" in options:
        size["longest_edge"] = options.pop("max_pixels")
    lo = _positive_int("size.shortest_edge / min_pixels", size["shortest_edge"])
    hi = _positive_int("size.longest_edge / max_pixels", size["longest_edge"])
    if lo > hi:
        raise RequestError(f"video pixel budget is empty: min {lo} > max {hi}")
    for name in ("do_sample_frames", "cap_pixels_per_frame"):
        if name in options and not isinstance(options[name], bool):
            raise RequestError(f"video option {name} must be true or false, got {options[name]!r}")
    if "fps" in options:
        fps = options["fps"]
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0:
            raise RequestError(f"video option fps must be a positive number, got {fps!r}")
    for name in ("num_frames", "min_frames", "max_frames", "max_tokens"):
        if name in options:
            _positive_int(name, options[name])
    if "num_frames" in options and "fps" in options:
        raise RequestError("video options num_frames and fps are mutually exclusive")
    if "num_frames" in options:
        d["fps"] = None
    d.update(options)
    if d["min_frames"] > d["max_frames"]:
        raise RequestError(f"video min_frames {d['min_frames']} > max_frames {d['max_frames']}")
    if version == 3:  # Qwen3VLVideoProcessor.sample_frames reads its own min/max_frames, never the call's
        d["min_frames"], d["max_frames"] = DEFAULTS[3]["min_frames"], DEFAULTS[3]["max_frames"]
    return VideoSettings(d["do_sample_frames"], d["fps"], d["num_frames"], d["min_frames"], d["max_frames"],
                         lo, hi, bool(d.get("cap_pixels_per_frame", False)), d.get("max_tokens"))


# ------------------------------------------------------------------------------------------------ sampling


def sample_indices(version: int, total: int, video_fps: float, s: VideoSettings) -> list[int]:
    if version != 3:
        if not s.do_sample_frames or (s.num_frames is None and s.fps is None):
            return list(range(total))
        if s.num_frames is not None:
            n = round(s.num_frames / TEMPORAL) * TEMPORAL
        else:
            cap = math.floor(min(s.max_frames, total) / TEMPORAL) * TEMPORAL
            n = total / video_fps * s.fps
            n = min(max(n, s.min_frames), cap, total)
            n = math.floor(n / TEMPORAL) * TEMPORAL
        if n > total:
            raise RequestError(f"video: {n} frames requested but the clip has only {total}")
        if n < 1:
            raise RequestError(f"video: a clip of {total} frame(s) is too short to sample (fps {s.fps})")
        return torch.arange(0, total, total / n).int().tolist()
    if not s.do_sample_frames:
        return list(range(total))
    if s.num_frames is not None:
        n = s.num_frames
    else:
        n = int(total / video_fps * s.fps)
        n = min(max(n, s.min_frames), s.max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def qwen3_slot_timestamps(indices: list[int], video_fps: float) -> list[float]:
    idx = list(indices)
    if len(idx) % TEMPORAL:
        idx += [idx[-1]] * (TEMPORAL - len(idx) % TEMPORAL)
    ts = [i / video_fps for i in idx]
    return [(ts[i] + ts[i + TEMPORAL - 1]) / 2 for i in range(0, len(ts), TEMPORAL)]


# ------------------------------------------------------------------------------------------------ resize


def _check_aspect(height: int, width: int) -> None:
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise MediaError(f"video frames of {width}x{height}: aspect ratio too extreme (at most {MAX_ASPECT}:1)")


def frame_size(version: int, n_frames: int, height: int, width: int, factor: int, s: VideoSettings) -> tuple[int, int]:
    """Resized frame (height, width): per frame for Qwen2/2.5-VL, over all n_frames for Qwen3-VL."""
    max_pixels = s.max_pixels
    if s.cap_pixels_per_frame:  # qwen-vl-utils' bound on the whole clip, as the processors apply it
        if version == 3:
            per_frame = max(min(CAP_TOTAL_TOKENS[3] * factor * factor, max_pixels // n_frames),
                            int(s.min_pixels * 1.05))
            max_pixels = per_frame * n_frames
        else:
            total = int(CAP_TOTAL_TOKENS[2] * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, total * TEMPORAL // n_frames), int(s.min_pixels * 1.05))
    if version == 3 and (height < factor or width < factor):  # Qwen3-VL scales tiny frames up first
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    _check_aspect(height, width)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t = n_frames if version == 3 else 1
    t_bar = round(n_frames / TEMPORAL) * TEMPORAL if version == 3 else 1
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(t * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < s.min_pixels:
        beta = math.sqrt(s.min_pixels / (t * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [n, H, W, 3] → uint8 [n, height, width, 3] with torch's antialiased bicubic on uint8 (torchvision's
    CPU path for uint8 bicubic; interpolate's threads split the work)."""
    if frames.shape[1:3] == (height, width):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    y = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return y.permute(0, 2, 3, 1).contiguous().numpy()


def video_pixel_values(frames: np.ndarray, mean, std, patch: int, merge: int) -> torch.Tensor:
    """uint8 [n, H, W, 3] resized frames → float32 [t*gh*gw, 3*2*p*p] as the processor lays them out.

    The bytes are reordered first (torch's strided copy; numpy's is many times slower on 9-D transposes), then
    (float32(x) - float32(mean)*255) / (float32(std)*255) is computed in float32, element by element as HF does."""
    if len(frames) % TEMPORAL:
        frames = np.concatenate([frames, np.repeat(frames[-1:], TEMPORAL - len(frames) % TEMPORAL, axis=0)])
    n, h, w, _ = frames.shape
    gt, gh, gw, p, mm = n // TEMPORAL, h // patch, w // patch, patch, merge
    x = torch.from_numpy(np.ascontiguousarray(frames))
    # axes of [T, H, W, C] bytes → (slot, merged row, merged col, row in merge, col in merge, C, frame, py, px)
    x = x.view(gt, TEMPORAL, gh // mm, mm, p, gw // mm, mm, p, 3).permute(0, 2, 5, 3, 6, 8, 1, 4, 7)
    x = x.reshape(gt * gh * gw, 3, TEMPORAL * p * p).float()
    m = torch.tensor(np.asarray(mean, dtype=np.float32) * np.float32(255)).view(1, 3, 1)
    sd = torch.tensor(np.asarray(std, dtype=np.float32) * np.float32(255)).view(1, 3, 1)
    return x.sub_(m).div_(sd).view(gt * gh * gw, 3 * TEMPORAL * p * p)


# ------------------------------------------------------------------------------------------------ one clip


@dataclass
class ProcessedVideo:
    processed: ProcessedImage  # pixel values + grid (t, h, w) in patches, for the vision encoder
    indices: list[int]  # sampled display-order frame indices
    t_index: list[int]  # M-RoPE temporal index per temporal slot
    slot_texts: list[str] | None  # Qwen3-VL: the "<x.y seconds>" text before each slot
    second_per_grid_t: float | None  # Qwen2.5-VL (float32 value)
    resized: np.ndarray | None = None  # the resized sampled frames (before temporal padding)

    @property
    def tokens_per_slot(self) -> int:
        t, h, w = self.processed.grid_thw
        return self.processed.n_tokens // t


def process_video(vision, clip, options: dict | None) -> ProcessedVideo:
    """Sample, resize and patchify a VideoClip for a QwenVLVision tower, and work out its prompt positions."""
    version = vision.version
    s = settings(version, options)
    p, m = vision.cfg.patch_size, vision.merge_size
    if vision.temporal != TEMPORAL:
        raise RequestError("this mmproj has no second patch-embedding half (v.patch_embd.weight.1): it cannot "
                           "encode video")
    indices = sample_indices(version, clip.total_frames, clip.fps, s)
    if version == 3 and len(indices) < TEMPORAL:
        raise RequestError(f"video: Qwen3-VL needs at least {TEMPORAL} sampled frames, got {len(indices)}")
    h, w = frame_size(version, len(indices), clip.height, clip.width, p * m, s)
    n_slots = math.ceil(len(indices) / TEMPORAL)
    n_tokens = n_slots * (h // p // m) * (w // p // m)
    if s.max_tokens is not None and n_tokens > s.max_tokens:
        raise RequestError(f"video needs {n_tokens} tokens ({n_slots} temporal slots of {h}x{w} px), more than "
                           f"max_tokens {s.max_tokens}: lower fps / max_frames / max_pixels")
    resized = resize_frames(clip.frames(indices), h, w)  # decoded only once the token count is known to fit
    pixels = video_pixel_values(resized, vision.cfg.image_mean, vision.cfg.image_std, p, m)
    processed = ProcessedImage(pixel_values=pixels, n_tokens=n_tokens, grid_thw=(n_slots, h // p, w // p),
                               extra={"resized": (h, w), "video": True})
    spg = None
    slot_texts = None
    if version == 25:
        sampled_fps = len(indices) / clip.total_frames * clip.fps
        spg_t = torch.tensor([TEMPORAL / sampled_fps], dtype=torch.float32)
        t_index = (torch.arange(n_slots)[:, None] * spg_t * QWEN25_TOKENS_PER_SECOND).long()[:, 0].tolist()
        spg = float(spg_t[0])
    else:
        t_index = list(range(n_slots))
    if version == 3:
        slot_texts = [f"<{x:.1f} seconds>" for x in qwen3_slot_timestamps(indices, clip.fps)]
    return ProcessedVideo(processed, indices, t_index, slot_texts, spg, resized)


def prompt_text(video: ProcessedVideo) -> str:
    """What replaces the template's video placeholder: Qwen2/2.5-VL one block of pads; Qwen3-VL one
    `<x.y seconds><|vision_start|>pads<|vision_end|>` block per temporal slot."""
    if video.slot_texts is None:
        return VISION_START + VIDEO_PAD * video.processed.n_tokens + VISION_END
    per = VIDEO_PAD * video.tokens_per_slot
    return "".join(f"{ts}{VISION_START}{per}{VISION_END}" for ts in video.slot_texts)
