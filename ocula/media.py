"""Load an image from any source into one representation, a fully loaded ``PIL.Image.Image``, safely.

``load_image(source, policy)`` accepts:

* ``str`` / ``pathlib.Path`` local paths, ``file://`` URLs (subject to ``allow_local_files`` and
  ``allowed_local_root``);
* ``http://`` / ``https://`` URLs (subject to ``allow_urls`` / ``allow_private_urls``): the host is resolved,
  every resolved address is checked, the connection is pinned to a checked address (no DNS-rebinding window),
  redirects are followed by hand (bounded, re-checked on every hop), environment proxies are ignored, and the
  body is read with a byte cap and a total deadline of ``url_timeout`` seconds;
* ``data:image/...;base64,...`` URIs and raw base64 strings (a string that is not an existing file and decodes
  as base64 to image bytes);
* ``bytes`` / ``bytearray`` / ``memoryview`` holding an encoded image;
* ``PIL.Image.Image`` (loaded, EXIF orientation applied);
* numpy ``uint8`` arrays shaped (H, W), (H, W, 1) -> mode L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA;
* torch tensors, by this rule:
    - floating dtypes are channels-first in [0, 1]: (H, W) or (C, H, W) with C in {1, 3, 4}; values are scaled by
      255 and *rounded* (so a ``uint8 / 255`` round trip is exact);
    - ``uint8`` (H, W) is grayscale; ``uint8`` (A, B, C) is channels-last (HWC) when C is in {1, 3, 4}, otherwise
      channels-first (CHW) when A is in {1, 3, 4} (so an ambiguous shape like (3, 5, 3) is read as HWC);
    - any other dtype or shape is refused;
* OpenAI content-part dicts: ``{"type": "image_url", "image_url": {"url": ...}}``,
  ``{"type": "image_url", "image_url": "..."}``, ``{"type": "image", "image": <any of the above>}`` and
  ``{"type": "input_image", "image_url": ...}``.

The result is decoded and loaded (a ``PIL.Image`` input comes back as the same object unless its EXIF orientation
had to be applied), EXIF orientation applied (``PIL.ImageOps.exif_transpose``), in its original mode
(L, LA, P, RGB, RGBA, I;16, CMYK, ...). Conversion to RGB is a separate step, :func:`to_rgb`, done the way Hugging
Face image processors do it.

Every failure raises :class:`ocula.errors.MediaError` whose message names the problem and the kind of source.

Pixel limits: the width and height from the header are checked against ``policy.max_pixels`` before any pixel is
decoded. PIL's own guard (``PIL.Image.MAX_IMAGE_PIXELS``, a process-wide setting this module leaves alone) still
applies: its ``DecompressionBombWarning`` is silenced around the decode (our check replaces it) and its
``DecompressionBombError`` becomes a MediaError, so a ``max_pixels`` above twice PIL's limit is capped by PIL.
EPS is never decoded (PIL would hand it to Ghostscript).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import io
import ipaddress
import os
import re
import socket
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ocula.errors import MediaError

__all__ = ["MediaPolicy", "load_image", "to_rgb", "image_digest"]


@dataclass
class MediaPolicy:
    max_bytes: int = 20 * 1024 * 1024        # encoded size cap (files, URLs, base64)
    max_pixels: int = 50_000_000             # decoded width*height cap (decompression bombs)
    url_timeout: float = 10.0                # seconds: per socket operation and for the whole download
    max_redirects: int = 3
    allow_urls: bool = True
    allow_private_urls: bool = False         # refuse loopback/private/link-local/reserved targets
    allow_local_files: bool = True           # library default True; the server passes False or a root
    allowed_local_root: str | None = None    # when set, file paths / file:// URLs must resolve inside it


_DEFAULT_POLICY = MediaPolicy()
_CHUNK = 64 * 1024
_MAX_PATH_CHARS = 4096
_MAX_NESTING = 4
_REDIRECT_CODES = (301, 302, 303, 307, 308)
# Formats never decoded: EPS hands the data to Ghostscript (an interpreter), which no image input needs.
_BLOCKED_FORMATS = frozenset({"EPS"})
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_B64_RE = re.compile(r"^[A-Za-z0-9+/\-_]+={0,2}$")
_WS_RE = re.compile(r"\s+")
# Base64 of the magic numbers of common image formats: a string starting like this is meant as base64.
_B64_IMAGE_PREFIXES = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR", "SUkqAA", "TU0AKg", "AAAAIGZ0eXBhdmlm",
                       "AAAAHGZ0eXBhdmlm", "AAAADGpQICAN")
_IMAGE_MAGICS = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
                 b"\x00\x00\x01\x00", b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51", b"qoif", b"P1", b"P2", b"P3",
                 b"P4", b"P5", b"P6")


def _fail(kind: str, problem: str) -> MediaError:
    return MediaError(f"{kind}: {problem}")


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------- public API


def load_image(source, policy: MediaPolicy | None = None) -> Image.Image:
    """Load ``source`` (see the module docstring for every accepted kind) as a loaded, EXIF-oriented PIL image."""
    policy = policy or _DEFAULT_POLICY
    return _load(source, policy, 0)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert to RGB exactly like Hugging Face ``transformers.image_transforms.convert_to_rgb``.

    That function (used by both the PIL and the torchvision backends of the image processors when
    ``do_convert_rgb=True``) returns an RGB image unchanged and otherwise calls ``image.convert("RGB")``: the alpha of
    RGBA / LA / PA is dropped (no compositing over a background), L is replicated to three channels, P is looked up
    in its palette (its transparency ignored), I;16 / I / F are clipped to 0..255, CMYK uses PIL's naive conversion.
    """
    if not isinstance(image, Image.Image):
        raise MediaError(f"to_rgb: expected a PIL.Image.Image, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise MediaError(f"to_rgb: cannot convert a {image.mode} image to RGB: {e}") from None


def image_digest(image: Image.Image) -> str:
    """sha256 hex of mode, size, palette (for P/PA) and the decoded pixel bytes: a cache key for the pixels."""
    if not isinstance(image, Image.Image):
        raise MediaError(f"image_digest: expected a PIL.Image.Image, got {type(image).__name__}")
    h = hashlib.sha256()
    h.update(f"{image.mode}\0{image.size[0]}x{image.size[1]}\0".encode())
    if image.mode in ("P", "PA"):
        palette = image.getpalette()
        h.update(bytes(palette or b""))
        h.update(repr(image.info.get("transparency")).encode())
    h.update(b"\0")
    try:
        h.update(image.tobytes())
    except (OSError, ValueError) as e:
        raise MediaError(f"image_digest: cannot read the pixels: {e}") from None
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- dispatch


def _load(source, policy: MediaPolicy, depth: int) -> Image.Image:
    if isinstance(source, Image.Image):
        return _finish_pil(source, policy, "PIL image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), policy, "bytes")
    if isinstance(source, os.PathLike):
        return _load_path(os.fspath(source), policy, "file")
    if isinstance(source, str):
        return _load_str(source, policy)
    if isinstance(source, np.ndarray):
        return _from_numpy(source, policy)
    if _is_torch_tensor(source):
        return _from_torch(source, policy)
    if isinstance(source, dict):
        if depth >= _MAX_NESTING:
            raise MediaError("content part: nested too deeply")
        return _load(_unwrap_part(source), policy, depth + 1)
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
        return _load_path(_file_url_path(s), policy, "file URL")
    if scheme in ("http", "https"):
        return _load_url(s, policy)
    if scheme is not None and s[len(scheme) + 1:].startswith("//"):
        raise _fail("URL", f"scheme {scheme!r} is not allowed (only http, https, file and data): {_short(s)}")

    # A path that exists wins; then base64; then it is a path that does not exist.
    if policy.allow_local_files and _could_be_path(s) and os.path.exists(os.path.expanduser(s)):
        return _load_path(s, policy, "file")
    compact = _WS_RE.sub("", s)
    if _B64_RE.match(compact) and len(compact) // 4 * 3 > policy.max_bytes + 3:
        raise _fail("base64", f"too many bytes: about {len(compact) // 4 * 3} > max_bytes {policy.max_bytes}")
    data, b64_error = _try_b64decode(compact)
    if data is not None and _looks_like_image(data):
        return _decode_bytes(data, policy, "base64")
    if _looks_base64(s):
        if b64_error is not None:
            raise _fail("base64", f"does not decode ({b64_error})")
        return _decode_bytes(data, policy, "base64")  # raises "cannot identify image file"
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
        raise _fail(kind, "malformed (no ',' separating the header from the data)")
    params = [p.strip() for p in header.split(";")]
    media_type = params[0].lower()
    is_b64 = any(p.lower() == "base64" for p in params[1:])
    if not media_type.startswith("image/"):
        raise _fail(kind, f"not an image (media type {media_type or 'text/plain (default)'!r})")
    if is_b64:
        compact = _WS_RE.sub("", payload)
        if len(compact) > (policy.max_bytes + 2) // 3 * 4 + 4:
            raise _fail(kind, f"too many bytes: about {len(compact) * 3 // 4} > max_bytes {policy.max_bytes}")
        if not compact:
            raise _fail(kind, "empty data")
        data, err = _try_b64decode(compact)
        if data is None:
            raise _fail(kind, f"base64 does not decode ({err})")
    else:
        if len(payload) > 3 * policy.max_bytes + 16:
            raise _fail(kind, f"too many bytes (> max_bytes {policy.max_bytes})")
        data = urllib.parse.unquote_to_bytes(payload)
    return _decode_bytes(data, policy, kind)


# --------------------------------------------------------------------------------------------- local files


def _file_url_path(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise _fail("file URL", f"remote host {parts.netloc!r} is not allowed: {_short(url)}")
    if parts.query or parts.fragment:
        raise _fail("file URL", f"query strings and fragments are not allowed: {_short(url)}")
    return urllib.request.url2pathname(parts.path)


def _load_path(path: str, policy: MediaPolicy, kind: str) -> Image.Image:
    if not policy.allow_local_files:
        raise _fail(kind, "local files are not allowed by the media policy")
    if not _could_be_path(path):
        raise _fail(kind, "not a valid path (too long or contains NUL)")
    shown = _short(path)
    try:
        resolved = os.path.realpath(os.path.expanduser(path))
    except (OSError, ValueError) as e:
        raise _fail(kind, f"cannot resolve path {shown!r}: {e}") from None
    if policy.allowed_local_root is not None:
        root = os.path.realpath(os.path.expanduser(policy.allowed_local_root))
        try:
            inside = os.path.commonpath([root, resolved]) == root
        except ValueError:
            inside = False
        if not inside:
            raise _fail(kind, f"{shown!r} is outside the allowed local root")
    try:
        st = os.stat(resolved)
    except FileNotFoundError:
        raise _fail(kind, f"file not found: {shown!r}") from None
    except OSError as e:
        raise _fail(kind, f"cannot access {shown!r}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise _fail(kind, f"{shown!r} is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise _fail(kind, f"{shown!r} is not a regular file")
    if st.st_size > policy.max_bytes:
        raise _fail(kind, f"too many bytes: {st.st_size} > max_bytes {policy.max_bytes} ({shown!r})")
    try:
        with open(resolved, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except OSError as e:
        raise _fail(kind, f"cannot read {shown!r}: {e.strerror or e}") from None
    return _decode_bytes(data, policy, kind, where=shown)


# --------------------------------------------------------------------------------------------- URLs


def _address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "a non-global address"
    return None


def _resolve(host: str, port: int, policy: MediaPolicy, url: str) -> list[tuple]:
    """Resolve ``host`` and check every address; return getaddrinfo entries to connect to."""
    kind = "URL"
    bare = host.strip("[]").rstrip(".").lower()
    if not policy.allow_private_urls and (bare == "localhost" or bare.endswith(".localhost")):
        raise _fail(kind, f"host {host!r} is a loopback name, refused by the media policy: {_short(url)}")
    try:
        literal = ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        literal = None
    if literal is not None:
        family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
        infos = [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (bare, port))]
    else:
        try:
            infos = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError, OSError) as e:
            raise _fail(kind, f"cannot resolve host {host!r}: {e}") from None
        if not infos:
            raise _fail(kind, f"host {host!r} resolves to no address")
    if not policy.allow_private_urls:
        for info in infos:
            addr = info[4][0]
            try:
                ip = ipaddress.ip_address(addr.split("%", 1)[0])
            except ValueError:
                raise _fail(kind, f"host {host!r} resolves to an unparsable address {addr!r}") from None
            problem = _address_problem(ip)
            if problem is not None:
                raise _fail(kind, f"host {host!r} resolves to {addr}, {problem}, refused by the media policy "
                                  f"(allow_private_urls=False): {_short(url)}")
    return infos


def _pinned_connect(conn, infos) -> None:
    error: OSError | None = None
    for family, socktype, proto, _, sockaddr in infos:
        sock = socket.socket(family, socktype, proto)
        try:
            sock.settimeout(conn.timeout)
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sock = sock
            return
        except OSError as e:
            error = e
            sock.close()
    raise error or OSError("no address to connect to")


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, infos, **kwargs):
        super().__init__(*args, **kwargs)
        self._infos = infos

    def connect(self):
        _pinned_connect(self, self._infos)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, infos, **kwargs):
        super().__init__(*args, **kwargs)
        self._infos = infos

    def connect(self):
        _pinned_connect(self, self._infos)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


class _PinnedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, infos):
        super().__init__()
        self._infos = infos

    def http_open(self, req):
        infos = self._infos
        return self.do_open(lambda host, **kw: _PinnedHTTPConnection(host, infos=infos, **kw), req)


class _PinnedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, infos):
        super().__init__()
        self._infos = infos

    def https_open(self, req):
        infos = self._infos
        return self.do_open(lambda host, **kw: _PinnedHTTPSConnection(host, infos=infos, **kw), req,
                            context=self._context)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the 30x status; we follow by hand after re-checking


def _load_url(url: str, policy: MediaPolicy) -> Image.Image:
    kind = "URL"
    if not policy.allow_urls:
        raise _fail(kind, f"URLs are not allowed by the media policy: {_short(url)}")
    deadline = time.monotonic() + policy.url_timeout
    redirects = 0
    while True:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise _fail(kind, f"scheme {scheme!r} is not allowed (only http and https): {_short(url)}")
        if parts.username is not None or parts.password is not None:
            raise _fail(kind, f"credentials in URLs are not supported: {_short(url.split('@')[-1])}")
        host = parts.hostname
        if not host:
            raise _fail(kind, f"no host in {_short(url)}")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise _fail(kind, f"invalid port in {_short(url)}") from None
        infos = _resolve(host, port, policy, url)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _fail(kind, f"timed out after {policy.url_timeout:g} s: {_short(url)}")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _PinnedHTTPHandler(infos),
                                             _PinnedHTTPSHandler(infos), _NoRedirect())
        req = urllib.request.Request(url, headers={"User-Agent": "ocula", "Accept": "image/*,*/*;q=0.5"})
        try:
            resp = opener.open(req, timeout=remaining)
        except urllib.error.HTTPError as e:
            location = e.headers.get("Location") if e.headers is not None else None
            e.close()
            if e.code in _REDIRECT_CODES and location:
                redirects += 1
                if redirects > policy.max_redirects:
                    raise _fail(kind, f"too many redirects (more than {policy.max_redirects}): {_short(url)}") \
                        from None
                url = urllib.parse.urljoin(url, location.strip())
                continue
            raise _fail(kind, f"HTTP error {e.code} {e.reason}: {_short(url)}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                raise _fail(kind, f"timed out after {policy.url_timeout:g} s: {_short(url)}") from None
            raise _fail(kind, f"cannot fetch {_short(url)}: {e.reason}") from None
        except (socket.timeout, TimeoutError):
            raise _fail(kind, f"timed out after {policy.url_timeout:g} s: {_short(url)}") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise _fail(kind, f"cannot fetch {_short(url)}: {e}") from None
        with resp:
            data = _read_capped(resp, policy, deadline, url)
        return _decode_bytes(data, policy, kind, where=_short(url))


def _read_capped(resp, policy: MediaPolicy, deadline: float, url: str) -> bytes:
    kind = "URL"
    length = resp.headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > policy.max_bytes:
        raise _fail(kind, f"too many bytes: Content-Length {int(length)} > max_bytes {policy.max_bytes}: "
                          f"{_short(url)}")
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _fail(kind, f"timed out after {policy.url_timeout:g} s: {_short(url)}")
            sock = getattr(getattr(resp, "fp", None), "raw", None)
            sock = getattr(sock, "_sock", None)
            if sock is not None:
                sock.settimeout(remaining)
            chunk = resp.read(min(_CHUNK, policy.max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > policy.max_bytes:
                raise _fail(kind, f"too many bytes: more than max_bytes {policy.max_bytes}: {_short(url)}")
    except (socket.timeout, TimeoutError):
        raise _fail(kind, f"timed out after {policy.url_timeout:g} s: {_short(url)}") from None
    except (OSError, http.client.HTTPException) as e:
        raise _fail(kind, f"error while reading {_short(url)}: {e}") from None
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------- decoding


def _allowed_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in Image.ID if f not in _BLOCKED_FORMATS)


def _check_pixels(size: tuple[int, int], policy: MediaPolicy, kind: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise _fail(kind, f"empty image ({w}x{h})")
    if w * h > policy.max_pixels:
        raise _fail(kind, f"too many pixels: {w}x{h} = {w * h} > max_pixels {policy.max_pixels}")


def _decode_bytes(data: bytes, policy: MediaPolicy, kind: str, where: str | None = None) -> Image.Image:
    suffix = f" ({where!r})" if where else ""
    if len(data) > policy.max_bytes:
        raise _fail(kind, f"too many bytes: {len(data)} > max_bytes {policy.max_bytes}{suffix}")
    if not data:
        raise _fail(kind, f"empty data{suffix}")
    try:
        with warnings.catch_warnings():
            # PIL warns above Image.MAX_IMAGE_PIXELS; our own limit (policy.max_pixels) is checked just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_allowed_formats())
    except Image.DecompressionBombError as e:
        raise _fail(kind, f"too many pixels (decompression bomb): {e}{suffix}") from None
    except UnidentifiedImageError:
        raise _fail(kind, f"not an image: cannot identify image file{suffix}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, MemoryError) as e:
        raise _fail(kind, _broken(e) + suffix) from None
    # Dimensions come from the header: refuse before any pixel is decoded.
    _check_pixels(img.size, policy, kind)
    return _finish_pil(img, policy, kind, suffix)


def _broken(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, EOFError) or "truncat" in text.lower():
        return f"truncated image: {text}"
    return f"unreadable image data: {text}"


def _finish_pil(img: Image.Image, policy: MediaPolicy, kind: str, suffix: str = "") -> Image.Image:
    _check_pixels(img.size, policy, kind)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Image.DecompressionBombError as e:
        raise _fail(kind, f"too many pixels (decompression bomb): {e}{suffix}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, MemoryError) as e:
        raise _fail(kind, _broken(e) + suffix) from None
    return _apply_exif_orientation(img)


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # broken EXIF: keep the pixels as stored
        return img
    if orientation in (None, 1) or orientation not in range(2, 9):
        return img
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:  # pragma: no cover - broken EXIF: keep the pixels as stored
        return img
    if out is None:  # pragma: no cover - in_place variants
        return img
    out.load()
    return out


# --------------------------------------------------------------------------------------------- arrays


_NUMPY_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _from_numpy(arr: np.ndarray, policy: MediaPolicy, kind: str = "numpy array") -> Image.Image:
    if arr.dtype != np.uint8:
        raise _fail(kind, f"wrong dtype {arr.dtype} (expected uint8 with shape (H, W), (H, W, 1), (H, W, 3) "
                          f"or (H, W, 4))")
    if arr.ndim == 2:
        mode = "L"
    elif arr.ndim == 3 and arr.shape[2] in _NUMPY_MODES:
        mode = _NUMPY_MODES[arr.shape[2]]
        if arr.shape[2] == 1:
            arr = arr[:, :, 0]
    else:
        raise _fail(kind, f"wrong shape {tuple(arr.shape)} (expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4))")
    h, w = arr.shape[:2]
    _check_pixels((w, h), policy, kind)
    img = Image.fromarray(np.ascontiguousarray(arr))  # uint8 (H, W) -> L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA
    if img.mode != mode:  # pragma: no cover - fromarray's inference is stable for uint8
        raise _fail(kind, f"unexpected mode {img.mode} for shape {tuple(arr.shape)}")
    return img


def _is_torch_tensor(obj) -> bool:
    mod = type(obj).__module__
    if not mod.startswith("torch"):
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, torch.Tensor)


_CHANNELS = (1, 3, 4)


def _from_torch(t, policy: MediaPolicy) -> Image.Image:
    import torch

    kind = "torch tensor"
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    shape = tuple(t.shape)
    if t.is_floating_point():
        # Channels-first float in [0, 1] (torchvision's convention).
        if t.ndim == 2:
            chw = t.unsqueeze(0)
        elif t.ndim == 3 and shape[0] in _CHANNELS:
            chw = t
        else:
            raise _fail(kind, f"wrong shape {shape} for a float tensor (expected (C, H, W) with C in 1, 3, 4, "
                              f"or (H, W), values in [0, 1])")
        _check_pixels((chw.shape[2], chw.shape[1]), policy, kind)
        x = chw.to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise _fail(kind, "float tensor has NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise _fail(kind, f"float tensor values must be in [0, 1], got [{lo:g}, {hi:g}]")
        hwc = (x * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        return _from_numpy(hwc, policy, kind)
    if t.dtype != torch.uint8:
        raise _fail(kind, f"wrong dtype {t.dtype} (expected uint8 HWC/CHW, or a float CHW tensor in [0, 1])")
    if t.ndim == 2:
        return _from_numpy(t.contiguous().numpy(), policy, kind)
    if t.ndim == 3:
        if shape[2] in _CHANNELS:
            return _from_numpy(t.contiguous().numpy(), policy, kind)
        if shape[0] in _CHANNELS:
            return _from_numpy(t.permute(1, 2, 0).contiguous().numpy(), policy, kind)
    raise _fail(kind, f"wrong shape {shape} (expected uint8 (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4)")
