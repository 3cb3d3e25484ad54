"""What an image source may be: the size, pixel, URL and local-file limits, and the error helpers."""
from __future__ import annotations

from dataclasses import dataclass

from ocula.errors import MediaError


@dataclass
class MediaPolicy:
    max_bytes: int = 20 * 1024 * 1024        # encoded size cap (files, URLs, base64)
    max_pixels: int = 50_000_000             # decoded width*height cap (decompression bombs)
    url_timeout: float = 10.0                # seconds for the whole fetch (resolve, connect, headers, body)
    max_redirects: int = 3
    allow_urls: bool = True
    allow_private_urls: bool = False         # refuse loopback/private/link-local/reserved targets
    # link-local (169.254.0.0/16, fe80::/10: the cloud metadata services) stays refused under
    # allow_private_urls unless this is set as well
    allow_link_local_urls: bool = False
    allow_local_files: bool = True           # library default True; the server passes False or a root
    allowed_local_root: str | None = None    # when set, file paths / file:// URLs must resolve inside it


DEFAULT_POLICY = MediaPolicy()


def fail(kind: str, problem: str) -> MediaError:
    return MediaError(f"{kind}: {problem}")


def short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
