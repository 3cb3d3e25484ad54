"""Video parts of a chat request: `video_url` (data URI, http(s), file:// under --allowed-media-path), llama.cpp's
`input_video` ({"data": <base64>} or a base64 string) and `video`; loaded (demuxed) off the event loop under the media
policy and the video caps, with per-request `video_options` over the server's defaults."""
from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from ocula.engine.video_prompt import FRAME_OPTION_NAMES, is_video_part
from ocula.errors import MediaError, OculaError
from ocula.media.video import VideoLimits, open_video
from ocula.server.errors import APIError


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


async def prepare_videos(model, config, policy, messages: list[dict], request_options, n_ctx: int):
    """(messages with every video part loaded as a VideoClip, the video options for this request)."""
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

    def load_all():
        out = [dict(m) for m in messages]
        for i, j in found:
            where = f"messages[{i}].content[{j}]"
            try:
                clip = open_video(messages[i]["content"][j], policy, limits)
            except MediaError as e:
                raise APIError(400, f"invalid video at {where}: {e}", param=where, code="invalid_video") from None
            content = out[i]["content"] = list(out[i]["content"])
            content[j] = {"type": "video", "video": clip}
        return out

    return await run_in_threadpool(load_all), options
