"""From any accepted source (path, URL, data URI, base64, bytes, PIL, numpy, torch, content part) to an image."""
from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import urllib.parse
import urllib.request

import numpy as np
from PIL import Image

from ocula.errors import MediaError
from ocula.media.arrays import from_numpy, from_torch, is_torch_tensor
from ocula.media.decode import decode_bytes, finish_pil
from ocula.media.policy import MediaPolicy, fail, short
from ocula.media.url_fetch import fetch_url

_MAX_PATH_CHARS = 4096
_MAX_NESTING = 4
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_B64_RE = re.compile(r"^[A-Za-z0-9+/\-_]+={0,2}$")
_WS_RE = re.compile(r"\s+")
# Base64 of the magic numbers of common image formats: a string starting like this is meant as base64.
_B64_IMAGE_PREFIXES = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR", "SUkqAA", "TU0AKg", "AAAAIGZ0eXBhdmlm",
                       "AAAAHGZ0eXBhdmlm", "AAAADGpQICAN")
_IMAGE_MAGICS = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
                 b"\x00\x00\x01\x00", b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51", b"qoif", b"P1", b"P2", b"P3",
                 b"P4", b"P5", b"P6")


def load_source(source, policy: MediaPolicy, depth: int) -> Image.Image:
    if isinstance(source, Image.Image):
        return finish_pil(source, policy, "PIL image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_bytes(bytes(source), policy, "bytes")
    if isinstance(source, os.PathLike):
        return _load_path(os.fspath(source), policy, "file")
    if isinstance(source, str):
        return _load_str(source, policy)
    if isinstance(source, np.ndarray):
        return from_numpy(source, policy)
    if is_torch_tensor(source):
        return from_torch(source, policy)
    if isinstance(source, dict):
        if depth >= _MAX_NESTING:
            raise MediaError("content part: nested too deeply")
        return load_source(_unwrap_part(source), policy, depth + 1)
    raise MediaError(
        f"unsupported image source type {type(source).__module__}.{type(source).__qualname__}: expected a path, "
        "URL, data URI, base64 string, bytes, PIL image, numpy array, torch tensor or an image content part"
    )


def _unwrap_part(part: dict):
    kind = part.get("type")
    if kind in ("image_url", "input_image") or (kind is None and "image_url" in part):
        value = part.get("image_url")
        if isinstance(value, dict):
            value = value.get("url")
        if value is None:
            raise MediaError(f"content part {kind or 'image_url'!r}: no image_url.url")
        if not isinstance(value, str):
            raise MediaError(f"content part {kind or 'image_url'!r}: image_url must be a string or {{'url': ...}}")
        return value
    if kind == "image" or (kind is None and "image" in part):
        for key in ("image", "url", "image_url"):
            if part.get(key) is not None:
                value = part[key]
                if key == "image_url" and isinstance(value, dict):
                    value = value.get("url")
                return value
        raise MediaError("content part 'image': no image")
    raise MediaError(f"content part: unsupported type {kind!r} (expected 'image_url', 'image' or 'input_image')")


def _load_str(source: str, policy: MediaPolicy) -> Image.Image:
    s = source.strip()
    if not s:
        raise MediaError("image source: empty string")
    m = _SCHEME_RE.match(s)
    scheme = m.group(1).lower() if m else None
    if scheme == "data":
        return _load_data_uri(s, policy)
    if scheme == "file":
        return _load_path(_file_url_path(s, policy), policy, "file URL")
    if scheme in ("http", "https"):
        data, final_url = fetch_url(s, policy)
        return decode_bytes(data, policy, "URL", where=short(final_url))
    if scheme is not None and s[len(scheme) + 1:].startswith("//"):
        raise fail("URL", f"scheme {scheme!r} is not allowed (only http, https, file and data): {short(s)}")

    # A path that exists wins; then base64; then it is a path that does not exist.
    if policy.allow_local_files and _could_be_path(s) and os.path.exists(os.path.expanduser(s)):
        return _load_path(s, policy, "file")
    compact = _WS_RE.sub("", s)
    if _B64_RE.match(compact) and len(compact) // 4 * 3 > policy.max_bytes + 3:
        raise fail("base64", f"too many bytes: about {len(compact) // 4 * 3} > max_bytes {policy.max_bytes}")
    data, b64_error = _try_b64decode(compact)
    if data is not None and _looks_like_image(data):
        return decode_bytes(data, policy, "base64")
    if _looks_base64(s):
        if b64_error is not None:
            raise fail("base64", f"does not decode ({b64_error})")
        return decode_bytes(data, policy, "base64")  # raises "cannot identify image file"
    return _load_path(s, policy, "file")


def _could_be_path(s: str) -> bool:
    return len(s) <= _MAX_PATH_CHARS and "\0" not in s


def _looks_base64(s: str) -> bool:
    """Meant as base64: starts like a base64-encoded image, or is long and all base64 characters."""
    compact = _WS_RE.sub("", s)
    if compact.startswith(_B64_IMAGE_PREFIXES):
        return True
    return len(compact) >= 64 and bool(_B64_RE.match(compact))


def _looks_like_image(data: bytes) -> bool:
    if data.startswith(_IMAGE_MAGICS):
        return True
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    if data[4:8] == b"ftyp":  # AVIF / HEIF
        return True
    return False


def _try_b64decode(s: str) -> tuple[bytes | None, str | None]:
    compact = _WS_RE.sub("", s)
    if not compact or not _B64_RE.match(compact):
        return None, "characters outside the base64 alphabet"
    body = compact.rstrip("=")
    if len(body) % 4 == 1:
        return None, "invalid length"
    padded = body + "=" * (-len(body) % 4)
    try:
        if "-" in padded or "_" in padded:
            if "+" in padded or "/" in padded:
                return None, "mixes the standard and URL-safe alphabets"
            return base64.urlsafe_b64decode(padded), None
        return base64.b64decode(padded, validate=True), None
    except (binascii.Error, ValueError) as e:
        return None, str(e)


# --------------------------------------------------------------------------------------------- data: URIs


def _load_data_uri(s: str, policy: MediaPolicy) -> Image.Image:
    kind = "data URI"
    header, comma, payload = s[5:].partition(",")
    if not comma:
        raise fail(kind, "malformed (no ',' separating the header from the data)")
    params = [p.strip() for p in header.split(";")]
    media_type = params[0].lower()
    is_b64 = any(p.lower() == "base64" for p in params[1:])
    if not media_type.startswith("image/"):
        raise fail(kind, f"not an image (media type {media_type or 'text/plain (default)'!r})")
    if is_b64:
        compact = _WS_RE.sub("", payload)
        if len(compact) > (policy.max_bytes + 2) // 3 * 4 + 4:
            raise fail(kind, f"too many bytes: about {len(compact) * 3 // 4} > max_bytes {policy.max_bytes}")
        if not compact:
            raise fail(kind, "empty data")
        data, err = _try_b64decode(compact)
        if data is None:
            raise fail(kind, f"base64 does not decode ({err})")
    else:
        if len(payload) > 3 * policy.max_bytes + 16:
            raise fail(kind, f"too many bytes (> max_bytes {policy.max_bytes})")
        data = urllib.parse.unquote_to_bytes(payload)
    return decode_bytes(data, policy, kind)


# --------------------------------------------------------------------------------------------- local files


def _file_url_path(url: str, policy: MediaPolicy | None = None) -> str:
    """The local path of a file URL. With an allowed root, llama-server's relative form is understood too:
    file://dir/img.png (and file:////dir//img.png) name dir/img.png inside the root (still checked to stay
    inside it); an absolute file:///path inside the root keeps its meaning."""
    parts = urllib.parse.urlsplit(url)
    if parts.query or parts.fragment:
        raise fail("file URL", f"query strings and fragments are not allowed: {short(url)}")
    root = policy.allowed_local_root if policy is not None and policy.allow_local_files else None
    if parts.netloc not in ("", "localhost"):
        if root is None:
            raise fail("file URL", f"remote host {parts.netloc!r} is not allowed: {short(url)}")
        return os.path.join(root, urllib.request.url2pathname(parts.netloc + parts.path))
    path = urllib.request.url2pathname(parts.path)
    if root is not None and parts.netloc == "":
        relative = os.path.join(root, path.lstrip("/"))
        if not _inside(root, path) and os.path.exists(relative):
            return relative
    return path


def _inside(root: str, path: str) -> bool:
    try:
        root = os.path.realpath(os.path.expanduser(root))
        return os.path.commonpath([root, os.path.realpath(path)]) == root
    except (OSError, ValueError):
        return False


def _load_path(path: str, policy: MediaPolicy, kind: str) -> Image.Image:
    data, shown = read_local_file(path, policy, kind, policy.max_bytes, "an image file")
    return decode_bytes(data, policy, kind, where=shown)


def read_local_file(path: str, policy: MediaPolicy, kind: str, max_bytes: int, what: str) -> tuple[bytes, str]:
    """(the bytes of a local file, its shortened name) under the media policy's local-file rules (allowed at
    all, inside allowed_local_root after resolving links) and a byte cap; `what` names the expected file."""
    if not policy.allow_local_files:
        raise fail(kind, "local files are not allowed by the media policy")
    if not _could_be_path(path):
        raise fail(kind, "not a valid path (too long or contains NUL)")
    shown = short(path)
    try:
        resolved = os.path.realpath(os.path.expanduser(path))
    except (OSError, ValueError) as e:
        raise fail(kind, f"cannot resolve path {shown!r}: {e}") from None
    if policy.allowed_local_root is not None:
        root = os.path.realpath(os.path.expanduser(policy.allowed_local_root))
        try:
            inside = os.path.commonpath([root, resolved]) == root
        except ValueError:
            inside = False
        if not inside:
            raise fail(kind, f"{shown!r} is outside the allowed local root")
    try:
        st = os.stat(resolved)
    except FileNotFoundError:
        raise fail(kind, f"file not found: {shown!r}") from None
    except OSError as e:
        raise fail(kind, f"cannot access {shown!r}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise fail(kind, f"{shown!r} is a directory, not {what}")
    if not stat.S_ISREG(st.st_mode):
        raise fail(kind, f"{shown!r} is not a regular file")
    if st.st_size > max_bytes:
        raise fail(kind, f"too many bytes: {st.st_size} > max_bytes {max_bytes} ({shown!r})")
    try:
        with open(resolved, "rb") as f:
            return f.read(max_bytes + 1), shown
    except OSError as e:
        raise fail(kind, f"cannot read {shown!r}: {e.strerror or e}") from None
