"""The server's image-token budget: a default cap per image and a total per request.

The library follows each processor's defaults (Qwen-VL: up to 16,384 tokens for one image, which took ~110 s
to encode on a CPU); a server answering many clients caps an image at DEFAULT_IMAGE_MAX_TOKENS unless its
operator (`--image-max-tokens`) or the request (`image_max_tokens`) says otherwise, as llama-server caps
Qwen-VL at 4096. The cap never raises a family's own default (InternVL's 12 tiles stay 12). A request's
images in all may not need more than `--max-image-tokens-per-request` tokens nor fill the context: both are
checked after preprocessing, before any image is encoded, and refused with a 400 naming the numbers.
"""
from __future__ import annotations

from ocula.text.chat import image_parts
from ocula.engine.multimodal import ImageTokenLimit
from ocula.engine.video_prompt import has_video

DEFAULT_IMAGE_MAX_TOKENS = 4096
DEFAULT_IMAGE_TOKENS_PER_REQUEST = 16384


def image_max_tokens(model, configured: int | None, requested: int | None) -> int | None:
    """The per-image cap a request gets: its own image_max_tokens, else the server's, else the default cap."""
    if requested is not None:
        return requested
    if configured is not None:
        return configured
    vision = getattr(model, "vision", None)
    if vision is None:
        return None
    own = vision.vision.default_max_tokens
    return DEFAULT_IMAGE_MAX_TOKENS if own is None else min(DEFAULT_IMAGE_MAX_TOKENS, own)


def image_token_limit(per_request: int | None, n_ctx: int) -> ImageTokenLimit:
    return ImageTokenLimit(per_request, n_ctx)


def has_media(messages: list[dict]) -> bool:
    """Images or videos to encode: the request's prompt is built on the scheduler's image workers."""
    return bool(image_parts(messages)) or has_video(messages)
