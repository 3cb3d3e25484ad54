"""Video clips: open a clip from any accepted source, read its real frame timestamps, decode only chosen frames.

``open_video(source, policy, limits)`` accepts a path, a ``file://`` URL, an ``http(s)://`` URL (fetched with the
image URL rules of ``ocula.media.url_fetch``), a ``data:video/...;base64,...`` URI, a raw base64 string, ``bytes``,
already decoded frames (a uint8 array [T, H, W, 3], or a list of PIL images / uint8 HWC arrays), or a content part
(``{"type": "video", "video": ...}``, ``{"type": "video_url", "video_url": {"url": ...}}``, llama.cpp's
``{"type": "input_video", "input_video": {"data": <base64>, "format": "mp4"}}`` or its string form).

Decoding uses PyAV (FFmpeg: libavcodec + libswscale, ``to_ndarray(format="rgb24")`` honouring the frame's colour
tags), the backend transformers' ``load_video`` defaults to. Opening a clip only demuxes it: the packets' presentation
timestamps give the exact frame count and every frame's time in display order (the container header's count is
unreliable: WebM stores none). ``VideoClip.frames(indices)`` then decodes just those frames, seeking to the keyframe
before each run of wanted frames instead of decoding the whole clip; runs of GOPs are decoded on parallel threads,
each with its own demuxer and decoder (FFmpeg releases the GIL), as many as torch's thread count.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import io
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ocula.errors import MediaError
from ocula.media.policy import DEFAULT_POLICY, MediaPolicy, fail, short
from ocula.media.sources import _SCHEME_RE, _WS_RE

DEFAULT_FRAMES_FPS = 24.0  # fps assumed for frames given without a rate (transformers assumes 24 as well)


@dataclass
class VideoLimits:
    """Caps on one clip: encoded bytes, duration, total frames (in the container) and frame size."""

    max_bytes: int = 100 * 1024 * 1024
    max_duration: float = 600.0  # seconds
    max_frames: int = 36_000  # frames in the clip (not sampled frames: the processor caps those)
    max_pixels: int = 8_294_400  # width * height of one frame (4K UHD)


DEFAULT_LIMITS = VideoLimits()


def _av():
    try:
        import av
    except ImportError:
        raise MediaError("video input needs PyAV: pip install 'ocula[video]'") from None
    return av


class VideoClip:
    """One clip: its frame times (display order), rate, size and a content digest; frames decoded on demand."""

    def __init__(self, *, data: bytes | None, frames: np.ndarray | None, timestamps: list[float], fps: float,
                 width: int, height: int, digest: str, kind: str, pts: list[int] | None = None,
                 keyframes: list[int] | None = None):
        self._data, self._frames = data, frames
        self.timestamps = timestamps  # seconds, one per frame in display order
        self.fps = fps  # the stream's average frame rate (transformers' VideoMetadata.fps)
        self.width, self.height = width, height
        self.digest = digest
        self.kind = kind
        self._pts = pts  # display-order pts of every frame (stream time base)
        self._keyframes = keyframes  # display-order indices of keyframes

    @property
    def total_frames(self) -> int:
        return len(self.timestamps)

    @property
    def duration(self) -> float:
        """transformers' VideoMetadata.duration: frames / fps."""
        return self.total_frames / self.fps

    def frames(self, indices) -> np.ndarray:
        """uint8 [len(indices), H, W, 3] RGB frames at these display-order indices (repeats allowed)."""
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < self.total_frames]
        if bad:
            raise MediaError(f"{self.kind}: frame index {bad[0]} is outside the clip's {self.total_frames} frames")
        if self._frames is not None:
            return self._frames[indices]
        wanted = sorted(set(indices))
        groups: dict[int, list[int]] = {}  # keyframe → the wanted frames decoded from it
        for i in wanted:
            groups.setdefault(self._keyframes[max(0, bisect.bisect_right(self._keyframes, i) - 1)], []).append(i)
        n = min(len(groups), decode_threads())
        if n < 2:
            got = self._decode(groups, threaded=True)
        else:  # runs of GOPs on threads of their own, each with its own demuxer and decoder
            keys = sorted(groups)
            cuts = [len(keys) * k // n for k in range(n + 1)]
            parts = [{key: groups[key] for key in keys[a:b]} for a, b in zip(cuts, cuts[1:])]
            got = {}
            for part in _decode_pool().map(lambda g: self._decode(g, threaded=False), parts):
                got.update(part)
        return np.stack([got[i] for i in indices])

    def _decode(self, groups: dict[int, list[int]], threaded: bool) -> dict[int, np.ndarray]:
        """Decode the wanted display-order frames, grouped by the keyframe they decode from: one seek per group.
        Frames a seek did not reach (a container whose index disagrees with its packets) come from a plain pass."""
        av = _av()
        index_of_pts = {p: i for i, p in enumerate(self._pts)}
        wanted = [i for g in groups.values() for i in g]
        out: dict[int, np.ndarray] = {}
        try:
            with av.open(io.BytesIO(self._data), mode="r") as container:
                stream = container.streams.video[0]
                if threaded:
                    stream.thread_type = "AUTO"
                for n, key in enumerate(sorted(groups)):
                    if n or key:
                        container.seek(self._pts[key], stream=stream, backward=True, any_frame=False)
                    self._collect(container.decode(stream), index_of_pts, set(groups[key]), out)
            missing = set(wanted) - set(out)
            if missing:
                with av.open(io.BytesIO(self._data), mode="r") as container:
                    stream = container.streams.video[0]
                    self._collect(container.decode(stream), index_of_pts, missing, out)
        except av.error.FFmpegError as e:
            raise fail(self.kind, f"decoding failed: {e}") from None
        missing = set(wanted) - set(out)
        if missing:
            raise fail(self.kind, f"frames {sorted(missing)[:4]} could not be decoded")
        return out

    @staticmethod
    def _collect(frames, index_of_pts: dict, need: set, out: dict) -> None:
        for frame in frames:
            i = index_of_pts.get(frame.pts)
            if i in need:
                out[i] = frame.to_ndarray(format="rgb24")
                need.discard(i)
                if not need:
                    return


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def decode_threads() -> int:
    """How many runs of GOPs are decoded at once: torch's thread count (what `threads=` / `-t` sets)."""
    import torch

    return max(1, torch.get_num_threads())


def _decode_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < decode_threads():
            _pool = ThreadPoolExecutor(decode_threads(), thread_name_prefix="ocula-video")
        return _pool


# ------------------------------------------------------------------------------------------------ sources


def open_video(source, policy: MediaPolicy | None = None, limits: VideoLimits | None = None,
               fps: float | None = None) -> VideoClip:
    """A VideoClip from any accepted source (module docstring); `fps` is the rate of frames given as arrays."""
    policy = policy or DEFAULT_POLICY
    limits = limits or DEFAULT_LIMITS
    if isinstance(source, VideoClip):
        return source
    if isinstance(source, dict):
        source, part_fps = _unwrap_part(source)
        fps = fps or part_fps
        if isinstance(source, dict):
            raise MediaError("video content part: nested parts are not accepted")
        if isinstance(source, VideoClip):
            return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return probe_bytes(bytes(source), "video bytes", limits)
    if isinstance(source, os.PathLike):
        return probe_bytes(_read_path(os.fspath(source), policy, limits, "video file"), "video file", limits,
                           where=short(os.fspath(source)))
    if isinstance(source, str):
        return _open_str(source, policy, limits)
    if isinstance(source, np.ndarray) or isinstance(source, (list, tuple)) or _is_tensor(source):
        return from_frames(source, fps or DEFAULT_FRAMES_FPS, limits)
    raise MediaError(f"unsupported video source type {type(source).__name__}: expected a path, URL, data URI, "
                     "base64 string, bytes, frames (uint8 [T, H, W, 3] or a list of images) or a video part")


def _unwrap_part(part: dict):
    kind = part.get("type")
    fps = part.get("fps")
    if kind == "video_url" or (kind is None and "video_url" in part):
        value = part.get("video_url")
        if isinstance(value, dict):
            value = value.get("url")
        if not isinstance(value, str):
            raise MediaError("content part 'video_url': video_url must be a string or {'url': ...}")
        return value, fps
    if kind == "input_video" or (kind is None and "input_video" in part):
        value = part.get("input_video")
        if isinstance(value, dict):
            data = value.get("data") if value.get("data") is not None else value.get("url")
            if not isinstance(data, str):
                raise MediaError("content part 'input_video': expected {'data': <base64>, 'format': ...}")
            return data, fps
        if not isinstance(value, str):
            raise MediaError("content part 'input_video': expected a base64 string or {'data': ..., 'format': ...}")
        return value, fps
    if kind == "video" or (kind is None and "video" in part):
        for key in ("video", "url", "path"):
            if part.get(key) is not None:
                return part[key], fps
        raise MediaError("content part 'video': no video")
    raise MediaError(f"content part: unsupported type {kind!r} (expected 'video', 'video_url' or 'input_video')")


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "numpy")


def _open_str(source: str, policy: MediaPolicy, limits: VideoLimits) -> VideoClip:
    from ocula.media.sources import _could_be_path, _file_url_path
    from ocula.media.url_fetch import fetch_url

    s = source.strip()
    if not s:
        raise MediaError("video source: empty string")
    m = _SCHEME_RE.match(s)
    scheme = m.group(1).lower() if m else None
    if scheme == "data":
        return probe_bytes(_data_uri_bytes(s, limits), "video data URI", limits)
    if scheme == "file":
        return probe_bytes(_read_path(_file_url_path(s, policy), policy, limits, "video file URL"), "video file URL", limits)
    if scheme in ("http", "https"):
        data, final_url = fetch_url(s, dataclasses.replace(policy, max_bytes=limits.max_bytes))
        return probe_bytes(data, "video URL", limits, where=short(final_url))
    if scheme is not None and s[len(scheme) + 1:].startswith("//"):
        raise fail("video URL", f"scheme {scheme!r} is not allowed (only http, https, file and data): {short(s)}")
    if _could_be_path(s) and os.path.exists(os.path.expanduser(s)):
        return probe_bytes(_read_path(s, policy, limits, "video file"), "video file", limits, where=short(s))
    compact = _WS_RE.sub("", s)
    if len(compact) >= 64 and re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", compact):
        return probe_bytes(_b64(compact, limits, "video base64"), "video base64", limits)
    raise fail("video file", f"file not found: {short(s)!r}")


def _b64(compact: str, limits: VideoLimits, kind: str) -> bytes:
    from ocula.media.sources import _try_b64decode

    if len(compact) > (limits.max_bytes + 2) // 3 * 4 + 4:
        raise fail(kind, f"too many bytes: about {len(compact) * 3 // 4} > max_bytes {limits.max_bytes}")
    data, err = _try_b64decode(compact)
    if data is None:
        raise fail(kind, f"base64 does not decode ({err})")
    return data


def _data_uri_bytes(s: str, limits: VideoLimits) -> bytes:
    kind = "video data URI"
    header, comma, payload = s[5:].partition(",")
    if not comma:
        raise fail(kind, "malformed (no ',' separating the header from the data)")
    params = [p.strip() for p in header.split(";")]
    media_type = params[0].lower()
    if not (media_type.startswith("video/") or media_type == "application/octet-stream"):
        raise fail(kind, f"not a video (media type {media_type or 'text/plain (default)'!r})")
    if not any(p.lower() == "base64" for p in params[1:]):
        raise fail(kind, "only base64 data URIs are accepted for video")
    compact = _WS_RE.sub("", payload)
    if not compact:
        raise fail(kind, "empty data")
    return _b64(compact, limits, kind)


def _read_path(path: str, policy: MediaPolicy, limits: VideoLimits, kind: str) -> bytes:
    """The file's bytes under the media policy's local-file rules and the video byte cap."""
    from ocula.media.sources import read_local_file

    return read_local_file(path, policy, kind, limits.max_bytes, "a video file")[0]


# ------------------------------------------------------------------------------------------------ probing


def probe_bytes(data: bytes, kind: str, limits: VideoLimits | None = None, where: str | None = None) -> VideoClip:
    """Demux an encoded clip (no decoding): frame count, display-order timestamps, keyframes, rate and size."""
    av = _av()
    limits = limits or DEFAULT_LIMITS
    suffix = f" ({where!r})" if where else ""
    if not data:
        raise fail(kind, f"empty data{suffix}")
    if len(data) > limits.max_bytes:
        raise fail(kind, f"too many bytes: {len(data)} > max_bytes {limits.max_bytes}{suffix}")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.error.EOFError:
        raise fail(kind, f"zero-length or truncated clip: the data ends before any frame{suffix}") from None
    except av.error.FFmpegError:
        raise fail(kind, f"not a video file (no container format recognised){suffix}") from None
    try:
        fmt = container.format.name or ""
        if fmt.endswith("_pipe") or fmt in ("image2", "webp"):  # FFmpeg reads still images as 1-frame videos
            raise fail(kind, f"is a still image ({fmt.removesuffix('_pipe')}), not a video: send it as an "
                             f"image part{suffix}")
        if not container.streams.video:
            raise fail(kind, f"has no video stream{suffix}")
        stream = container.streams.video[0]
        name = stream.codec_context.name if stream.codec_context is not None else None
        if stream.codec_context is None or not _can_decode(av, name):
            raise fail(kind, f"the video codec {name or 'unknown'!r} cannot be decoded{suffix}")
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise fail(kind, f"the video stream has no frame size{suffix}")
        if width * height > limits.max_pixels:
            raise fail(kind, f"frames of {width}x{height} exceed max_pixels {limits.max_pixels}{suffix}")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or float(rate) <= 0:
            raise fail(kind, f"the video stream has no frame rate{suffix}")
        fps = float(rate)
        pts, keys = [], set()
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the demuxer's flush packet
            if packet.pts is None:  # e.g. a raw elementary stream: count and keep the frames by decoding once
                return _decoded_clip(data, fps, kind, limits, suffix)
            pts.append(packet.pts)
            if packet.is_keyframe:
                keys.add(packet.pts)
            if len(pts) > limits.max_frames:
                raise fail(kind, f"more than max_frames {limits.max_frames} frames{suffix}")
        base = stream.time_base
    except av.error.FFmpegError as e:
        raise fail(kind, f"cannot be read as a video: {e}{suffix}") from None
    finally:
        container.close()
    if not pts:
        raise fail(kind, f"zero-length clip: the video stream has no frames{suffix}")
    pts.sort()
    start = pts[0]
    timestamps = [float((p - start) * base) for p in pts]
    if len(pts) / fps > limits.max_duration:
        raise fail(kind, f"{len(pts) / fps:.1f} s long, more than max_duration {limits.max_duration:g} s{suffix}")
    keyframes = [i for i, p in enumerate(pts) if p in keys] or [0]
    if keyframes[0] != 0:
        keyframes.insert(0, 0)
    digest = hashlib.sha256(data).hexdigest()
    return VideoClip(data=data, frames=None, timestamps=timestamps, fps=fps, width=width, height=height,
                     digest=digest, kind=kind, pts=pts, keyframes=keyframes)


def _decoded_clip(data: bytes, fps: float, kind: str, limits: VideoLimits, suffix: str) -> VideoClip:
    """A clip whose packets carry no timestamps: every frame decoded now, in output order, at the stream's rate."""
    frames = []
    with _av().open(io.BytesIO(data), mode="r") as container:
        for frame in container.decode(container.streams.video[0]):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) > limits.max_frames or len(frames) / fps > limits.max_duration:
                raise fail(kind, f"longer than max_frames {limits.max_frames} / max_duration "
                                 f"{limits.max_duration:g} s{suffix}")
    if not frames:
        raise fail(kind, f"zero-length clip: the video stream has no frames{suffix}")
    h, w = frames[0].shape[:2]
    return VideoClip(data=None, frames=np.stack(frames), timestamps=[i / fps for i in range(len(frames))], fps=fps,
                     width=w, height=h, digest=hashlib.sha256(data).hexdigest(), kind=kind)


def _can_decode(av, name: str | None) -> bool:
    if not name:
        return False
    try:
        av.codec.Codec(name, "r")
    except Exception:  # noqa: BLE001 - PyAV raises UnknownCodecError / ValueError depending on version
        return False
    return True


def from_frames(frames, fps: float, limits: VideoLimits | None = None) -> VideoClip:
    """Already decoded frames (uint8 [T, H, W, 3], or a list of PIL images / uint8 HWC arrays) as a clip."""
    limits = limits or DEFAULT_LIMITS
    kind = "video frames"
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not fps > 0:
        raise fail(kind, f"fps must be a positive number, got {fps!r}")
    if _is_tensor(frames):
        frames = frames.detach().cpu().numpy()
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise fail(kind, "zero-length clip: no frames")
        arrays = []
        for i, f in enumerate(frames):
            if hasattr(f, "convert") and hasattr(f, "size"):  # PIL image
                f = np.asarray(f.convert("RGB"))
            f = np.asarray(f)
            if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
                raise fail(kind, f"frame {i} must be a uint8 [H, W, 3] array or an image, got {f.dtype} {f.shape}")
            arrays.append(f)
        if len({a.shape for a in arrays}) != 1:
            raise fail(kind, "frames differ in size")
        frames = np.stack(arrays)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise fail(kind, f"expected uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t == 0 or h == 0 or w == 0:
        raise fail(kind, f"zero-length or empty clip {frames.shape}")
    if t > limits.max_frames:
        raise fail(kind, f"{t} frames, more than max_frames {limits.max_frames}")
    if h * w > limits.max_pixels:
        raise fail(kind, f"frames of {w}x{h} exceed max_pixels {limits.max_pixels}")
    frames = np.ascontiguousarray(frames)
    digest = hashlib.sha256(f"{frames.shape}:{float(fps)!r}".encode() + frames.tobytes()).hexdigest()
    return VideoClip(data=None, frames=frames, timestamps=[i / float(fps) for i in range(t)], fps=float(fps),
                     width=w, height=h, digest=digest, kind=kind)
