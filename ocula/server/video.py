"""Video parts of a chat request: `video_url` (data URI, http(s), file:// under --allowed-media-path), llama.cpp's
`input_video` ({"data": <base64>} or a base64 string) and `video`; loaded (demuxed) off the event loop under the media
policy and the video caps, with per-request `video_options` over the server's defaults."""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from starlette.concurrency import run_in_threadpool

from ocula.engine.video_prompt import FRAME_OPTION_NAMES, frames_as_images, is_video_part, prepare_video
from ocula.errors import MediaError, OculaError
from ocula.media.policy import short
from ocula.media.video import VideoLimits, open_video, probe_bytes
from ocula.server.errors import APIError
from ocula.server.media_loader import is_http_url


def server_video_options(config) -> dict:
    """The server's default video options (--video-fps, --video-max-frames, --video-max-tokens)."""
    out: dict[str, Any] = {}
    if config.video_fps is not None:
        out.update(do_sample_frames=True, fps=config.video_fps)
    if config.video_max_frames is not None:
        out.update(do_sample_frames=True, max_frames=config.video_max_frames)
    if config.video_max_tokens is not None:
        out["max_tokens"] = config.video_max_tokens
    return out


def check_options(model, options: dict, param: str) -> None:
    """Refuse unknown or out-of-range options now, with a 400, rather than while building the prompt."""
    try:
        if model.supports_native_video:
            from ocula.models.vision.qwen_video import settings

            settings(model.vision.vision.version, options)
        else:
            unknown = sorted(set(options) - set(FRAME_OPTION_NAMES))
            if unknown:
                raise OculaError(f"unknown video option(s): {', '.join(unknown)}")
    except OculaError as e:
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_value") from None


async def prepare_videos(model, config, policy, messages: list[dict], request_options, n_ctx: int, media=None):
    """(messages with every video part loaded, the video options for this request). All the work before the vision
    encoder happens here, off the event loop and off the scheduler thread: http(s) clips are fetched on the media
    loader's fetch pool (with the video byte cap), clips demuxed, and their sampled frames decoded and preprocessed
    (Qwen-VL: resized and patched; other families: turned into frame images with timestamps)."""
    found = [(i, j) for i, m in enumerate(messages) if isinstance(m, dict) and isinstance(m.get("content"), list)
             for j, p in enumerate(m["content"]) if is_video_part(p)]
    if not found:
        return messages, None
    i, j = found[0]
    if not model.supports_images:
        raise APIError(400, "this model does not take video (the server was started without --mmproj); send text "
                            "only", param=f"messages[{i}].content[{j}]", code="video_input_not_supported")
    if len(found) > config.max_videos:
        raise APIError(400, f"{len(found)} videos sent but at most {config.max_videos} are allowed per request",
                       param="messages", code="too_many_videos")
    if request_options is not None and not isinstance(request_options, dict):
        raise APIError(400, "video_options must be an object", param="video_options", code="invalid_type")
    options = {"max_tokens": n_ctx, **server_video_options(config), **(request_options or {})}
    check_options(model, options, "video_options")
    limits = VideoLimits(max_bytes=config.max_video_bytes, max_duration=config.max_video_seconds)
    video_policy = dataclasses.replace(policy, max_bytes=config.max_video_bytes)

    async def load(i, j):
        part = messages[i]["content"][j]
        where = f"messages[{i}].content[{j}]"
        try:
            source = _source(part)
            if media is not None and is_http_url(source):
                data, final_url = await media.fetch(source.strip(), video_policy)
                clip = await run_in_threadpool(probe_bytes, data, "video URL", limits, short(final_url))
            else:
                clip = await run_in_threadpool(open_video, part, policy, limits)
            if model.supports_native_video:
                return await run_in_threadpool(prepare_video, model.vision, clip, options)
            return clip
        except MediaError as e:
            raise APIError(400, f"invalid video at {where}: {e}", param=where, code="invalid_video") from None
        except OculaError as e:
            raise APIError(400, f"video at {where}: {e}", param="video_options", code="invalid_value") from None

    loaded = await asyncio.gather(*(load(i, j) for i, j in found))
    out = [dict(m) for m in messages]
    for (i, j), clip in zip(found, loaded):
        content = out[i]["content"] = list(out[i]["content"])
        content[j] = {"type": "video", "video": clip}
    if not model.supports_native_video:
        try:
            out = await run_in_threadpool(frames_as_images, out, policy, options, limits)
        except OculaError as e:
            raise APIError(400, f"video_options: {e}", param="video_options", code="invalid_value") from None
    return out, options


def _source(part: dict):
    """The URL / data / path string a video part names (None for other kinds of source)."""
    from ocula.media.video import _unwrap_part

    source, _ = _unwrap_part(part)
    return source if isinstance(source, str) else None
