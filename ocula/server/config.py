"""Server settings (from `ocula serve` flags) and the media policy they imply."""
from __future__ import annotations

from dataclasses import dataclass, field

from ocula.media import MediaPolicy


@dataclass
class ServerConfig:
    model_id: str | None = None  # id in /v1/models and responses (default: the GGUF file name)
    model_aliases: list[str] = field(default_factory=list)  # --alias a,b,c: every name the model answers to
    model_tags: list[str] = field(default_factory=list)  # --tags: free labels listed in /v1/models
    api_key: str | None = None  # when set, every route but /health needs "Authorization: Bearer <key>"
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers
    verbose: bool = False  # every chat/completions answer carries __verbose (as with "verbose": true)
    web_ui: bool = True  # the chat page at / (off: --no-ui, as llama-server)
    # scheduler
    max_batch: int = 8  # sequences decoded together
    max_queue: int = 64  # waiting requests beyond that → 503
    prefill_chunk: int = 512
    prefix_cache_bytes: int = 512 * 1024 * 1024
    default_max_tokens: int | None = None  # when a request gives none; None: until the context is full
    sampling_defaults: dict = field(default_factory=dict)  # SamplingParams fields set by --temp, --seed, ...
    pooling: str | None = None  # embeddings: none/mean/cls/last (default: the GGUF's pooling_type, else last)
    # media
    allowed_media_path: str | None = None  # file:// and paths only inside this directory (default: none)
    allow_private_media: bool = False  # URLs resolving to loopback/private addresses
    allow_link_local_media: bool = False  # ... and to link-local ones (cloud metadata): a separate switch
    allow_remote_media: bool = True  # http(s) URLs at all
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_images: int = 8  # per request
    media_timeout: float = 10.0  # seconds for a whole image URL fetch, waiting for a fetch slot included
    max_media_fetches: int = 8  # image URLs fetched at once (over all requests)
    image_min_tokens: int | None = None
    image_max_tokens: int | None = None  # per image; None: image_budget.DEFAULT_IMAGE_MAX_TOKENS as a cap
    max_image_tokens_per_request: int | None = 16384  # all images of a request; None: only the context
    image_threads: int | None = None  # torch threads per image worker (default: half of -t, >= 1)
    image_workers: int = 2  # prompts with images built at once, beside decoding
    max_body_bytes: int | None = None  # default: body_limit()'s room for a context's text and the inline media
    max_request_media_bytes: int = 32 * 1024 * 1024  # inline (base64) images and videos of one request, decoded
    # video
    max_videos: int = 2  # per request
    max_video_bytes: int = 100 * 1024 * 1024
    max_video_seconds: float = 600.0
    video_fps: float | None = None  # default sampling rate (None: each model processor's default)
    video_max_frames: int | None = None
    video_max_tokens: int | None = None  # default: the context size

    def media_policy(self) -> MediaPolicy:
        return MediaPolicy(
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            url_timeout=self.media_timeout,
            allow_urls=self.allow_remote_media,
            allow_private_urls=self.allow_private_media,
            allow_link_local_urls=self.allow_link_local_media,
            allow_local_files=self.allowed_media_path is not None,
            allowed_local_root=self.allowed_media_path,
        )

    def body_limit(self, context_text_bytes: int) -> int:
        """The largest request body: --max-request-bytes, else room for the text a context can hold
        (`context_text_bytes`: its tokens × the longest token's bytes), JSON-escaped at worst (6 bytes a
        byte, \\u00XX), plus max_request_media_bytes of base64 media and 1 MiB for everything else."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return 6 * context_text_bytes + self.max_request_media_bytes * 4 // 3 + 1024 * 1024
