"""ocula.media: every input kind, EXIF orientation, every refusal, and to_rgb against Hugging Face's output."""
from __future__ import annotations

import base64
import http.server
import io
import ipaddress
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from ocula.media import url_fetch
from ocula.errors import MediaError
from ocula.media import MediaPolicy, image_digest, load_image, to_rgb

SHARED = Path(__file__).resolve().parents[2] / "shared"
IMAGES = SHARED / "fixtures" / "images"
REFERENCE = SHARED / "fixtures" / "reference"
needs_fixtures = pytest.mark.skipif(
    not (IMAGES.is_dir() and REFERENCE.is_dir()),
    reason=f"shared fixtures not found at {SHARED / 'fixtures'} (they sit beside the checkout)",
)


# --------------------------------------------------------------------------------------------- helpers


def _pattern(w: int = 12, h: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_bytes(w: int = 12, h: int = 8) -> bytes:
    return _encode(Image.fromarray(_pattern(w, h)))


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels but carries no pixel data: decoding it would fail as truncated."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _err(source, policy=None) -> str:
    with pytest.raises(MediaError) as info:
        load_image(source, policy)
    return str(info.value)


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything resolves a name or opens a connection."""
    def boom(*a, **k):
        raise AssertionError(f"network access attempted: {a!r}")
    monkeypatch.setattr(socket, "getaddrinfo", boom)
    monkeypatch.setattr(socket, "create_connection", boom)
    monkeypatch.setattr(socket.socket, "connect", boom)


@pytest.fixture
def loopback_only(monkeypatch):
    """Allow connections to 127.0.0.1 only."""
    real = socket.socket.connect

    def guarded(self, address):
        assert ipaddress.ip_address(address[0]).is_loopback, f"non-loopback connection attempted: {address!r}"
        return real(self, address)
    monkeypatch.setattr(socket.socket, "connect", guarded)


# --------------------------------------------------------------------------------------------- input kinds


def test_path_str_pathlib_and_file_url(tmp_path):
    arr = _pattern()
    p = tmp_path / "a b.png"
    p.write_bytes(_encode(Image.fromarray(arr)))
    for source in (str(p), p, p.as_uri(), f"  {p}  "):
        img = load_image(source)
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (12, 8)
        np.testing.assert_array_equal(np.asarray(img), arr)
    assert load_image("file://localhost" + p.as_uri()[len("file://"):]).size == (12, 8)


def test_bytes_bytearray_memoryview():
    data = _png_bytes()
    for source in (data, bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(np.asarray(load_image(source)), _pattern())


def test_data_uri_and_raw_base64():
    data = _png_bytes()
    b64 = base64.b64encode(data).decode()
    for source in (f"data:image/png;base64,{b64}", f"DATA:image/PNG;BASE64,{b64}",
                   f"data:image/png;base64,{b64[:40]}\n{b64[40:]}", b64, b64.rstrip("="),
                   base64.urlsafe_b64encode(data).decode()):
        np.testing.assert_array_equal(np.asarray(load_image(source)), _pattern())
    # the MIME type does not have to match the bytes: PIL identifies the content
    assert load_image(f"data:image/jpeg;base64,{b64}").format == "PNG"


def test_existing_path_wins_over_base64(tmp_path, monkeypatch):
    data = _png_bytes()
    name = "AAAA"  # valid base64 (3 zero bytes), but a file of that name exists
    (tmp_path / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    assert load_image(name).size == (12, 8)


def test_pil_image_is_loaded_and_mode_kept(tmp_path):
    for mode in ("L", "LA", "P", "RGB", "RGBA", "I;16", "CMYK", "1"):
        img = Image.new(mode, (5, 4))
        assert load_image(img).mode == mode
    # a lazily opened file comes back loaded: overwriting the file afterwards does not change the pixels
    p = tmp_path / "x.png"
    p.write_bytes(_png_bytes())
    with Image.open(p) as lazy:
        out = load_image(lazy)
        p.write_bytes(b"\0" * 4096)  # same inode, truncated and rewritten
        np.testing.assert_array_equal(np.asarray(out), _pattern())


def test_decoded_modes_are_original(tmp_path):
    cases = {
        "L": Image.fromarray(_pattern()[..., 0]),
        "LA": Image.fromarray(_pattern()[..., 0]).convert("LA"),
        "RGBA": Image.fromarray(np.dstack([_pattern(), _pattern()[..., :1]])),
        "P": Image.fromarray(_pattern()).convert("P"),
        "I;16": Image.fromarray(np.arange(96, dtype=np.uint16).reshape(8, 12) * 600),
    }
    for mode, img in cases.items():
        out = load_image(_encode(img))
        assert out.mode == mode, (mode, out.mode)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(img))
    cmyk = load_image(_encode(Image.new("CMYK", (4, 4), (0, 50, 100, 10)), "JPEG"))
    assert cmyk.mode == "CMYK"


def test_numpy_arrays():
    rgb = _pattern()
    assert load_image(rgb).mode == "RGB"
    np.testing.assert_array_equal(np.asarray(load_image(rgb)), rgb)
    np.testing.assert_array_equal(np.asarray(load_image(rgb[..., 0])), rgb[..., 0])
    gray1 = load_image(rgb[..., :1])
    assert gray1.mode == "L"
    np.testing.assert_array_equal(np.asarray(gray1), rgb[..., 0])
    rgba = np.dstack([rgb, rgb[..., :1]])
    assert load_image(rgba).mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), rgba)
    # non-contiguous views are fine
    np.testing.assert_array_equal(np.asarray(load_image(rgb[:, ::-1])), rgb[:, ::-1])


def test_torch_tensors():
    rgb = _pattern()
    hwc = torch.from_numpy(rgb)
    np.testing.assert_array_equal(np.asarray(load_image(hwc)), rgb)                      # HWC uint8
    np.testing.assert_array_equal(np.asarray(load_image(hwc.permute(2, 0, 1))), rgb)     # CHW uint8
    np.testing.assert_array_equal(np.asarray(load_image(hwc[..., 0])), rgb[..., 0])      # HW uint8
    chw_f = hwc.permute(2, 0, 1).float() / 255.0                                          # CHW float [0, 1]
    np.testing.assert_array_equal(np.asarray(load_image(chw_f)), rgb)                    # exact round trip
    np.testing.assert_array_equal(np.asarray(load_image(chw_f.double())), rgb)
    np.testing.assert_array_equal(np.asarray(load_image(chw_f[:1])), rgb[..., 0])        # 1-channel float
    np.testing.assert_array_equal(np.asarray(load_image(chw_f[0])), rgb[..., 0])         # HW float
    assert load_image(chw_f.requires_grad_()).size == (12, 8)
    # the documented tie-break: a uint8 (3, W, 3) is channels-last
    assert load_image(torch.zeros(3, 5, 3, dtype=torch.uint8)).size == (5, 3)


def test_content_parts():
    data = _png_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for part in ({"type": "image_url", "image_url": {"url": url}},
                 {"type": "image_url", "image_url": url},
                 {"type": "input_image", "image_url": url},
                 {"type": "input_image", "image_url": {"url": url}},
                 {"type": "image", "image": data},
                 {"type": "image", "image": Image.fromarray(_pattern())},
                 {"type": "image", "image": _pattern()},
                 {"type": "image", "image": {"type": "image_url", "image_url": {"url": url}}}):
        np.testing.assert_array_equal(np.asarray(load_image(part)), _pattern())


def test_exif_orientation_applied(tmp_path):
    # 40x20: left half red, right half blue; orientation 6 means "rotate 90 degrees clockwise to display"
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    p = tmp_path / "rotated.jpg"
    p.write_bytes(data)
    for img in (load_image(data), load_image(p), load_image(Image.open(io.BytesIO(data)))):
        assert img.size == (20, 40)
        px = np.asarray(img).astype(int)
        assert np.abs(px[8, 10] - (255, 0, 0)).max() < 40      # the left (red) half is now on top
        assert np.abs(px[32, 10] - (0, 0, 255)).max() < 40     # the right (blue) half is at the bottom
        assert img.getexif().get(0x0112, 1) == 1
    # orientation 3 (180 degrees): size kept, pixels flipped both ways
    exif[0x0112] = 3
    img = load_image(_encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95))
    assert img.size == (40, 20)
    assert np.abs(np.asarray(img).astype(int)[10, 5] - (0, 0, 255)).max() < 40


# --------------------------------------------------------------------------------------------- refusals


def test_not_an_image_and_truncated(tmp_path):
    assert "bytes: not an image: cannot identify image file" in _err(b"this is not an image at all")
    assert "cannot identify image file" in _err(np.zeros(1, np.uint8).tobytes())
    p = tmp_path / "notes.png"
    p.write_bytes(b"hello")
    msg = _err(p)
    assert msg.startswith("file:") and "cannot identify image file" in msg and "notes.png" in msg
    jpeg = _encode(Image.fromarray(_pattern(64, 64)), "JPEG")
    assert "bytes: truncated image" in _err(jpeg[: len(jpeg) // 2])
    png = _encode(Image.fromarray(_pattern(64, 64)))
    assert "truncated image" in _err(png[: len(png) // 2])
    assert "bytes: empty data" in _err(b"")


def test_file_errors(tmp_path):
    assert "file: file not found" in _err(tmp_path / "missing.png")
    assert "file not found" in _err(str(tmp_path / "missing.png"))
    assert "file URL: file not found" in _err((tmp_path / "missing.png").as_uri())
    assert "is a directory" in _err(tmp_path)
    assert "remote host" in _err("file://example.com/etc/passwd")


def test_too_many_bytes(tmp_path):
    data = _png_bytes(64, 64)
    small = MediaPolicy(max_bytes=len(data) - 1)
    p = tmp_path / "big.png"
    p.write_bytes(data)
    assert "file: too many bytes" in _err(p, small)
    assert "bytes: too many bytes" in _err(data, small)
    b64 = base64.b64encode(data).decode()
    assert "data URI: too many bytes" in _err("data:image/png;base64," + b64, small)
    assert "base64: too many bytes" in _err(b64, small)


def test_too_many_pixels_checked_before_decoding(monkeypatch):
    data = _png_bytes(100, 100)

    def no_decode(self):
        raise AssertionError("pixels decoded before the size check")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert "bytes: too many pixels: 100x100 = 10000 > max_pixels 9999" in _err(data, MediaPolicy(max_pixels=9999))
    # a header claiming 100000 x 100000 with no pixel data behind it: refused on the header alone
    bomb = _png_header_only(100_000, 100_000)
    assert "too many pixels" in _err(bomb)
    assert "too many pixels" in _err(bomb, MediaPolicy(max_pixels=10**12))  # PIL's own limit -> MediaError
    assert "numpy array: too many pixels" in _err(np.zeros((100, 100), np.uint8), MediaPolicy(max_pixels=99))


def test_pil_decompression_bomb_becomes_media_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _png_bytes(60, 60)  # 3600 > 2 * 1000: PIL raises DecompressionBombError
    msg = _err(data, MediaPolicy(max_pixels=10**9))
    assert "too many pixels" in msg and "decompression bomb" in msg
    with _no_warnings():  # 1500 px: PIL would only warn; no warning escapes
        assert load_image(_png_bytes(50, 30), MediaPolicy(max_pixels=10**9)).size == (50, 30)


class _no_warnings:
    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings(record=True)
        self._log = self._cm.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        assert not [w for w in self._log if issubclass(w.category, Image.DecompressionBombWarning)]


def test_local_file_policy(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    inside = root / "in.png"
    inside.write_bytes(_png_bytes())
    outside = tmp_path / "out.png"
    outside.write_bytes(_png_bytes())
    (root / "link.png").symlink_to(outside)
    policy = MediaPolicy(allowed_local_root=str(root))
    assert load_image(inside, policy).size == (12, 8)
    assert load_image(inside.as_uri(), policy).size == (12, 8)
    for source in (outside, str(root / ".." / "out.png"), root / "link.png", outside.as_uri(), "/etc/passwd",
                   str(tmp_path / "root2" / "x.png")):
        assert "is outside the allowed local root" in _err(source, policy), source
    # a missing file outside the root does not reveal whether it exists
    assert "outside the allowed local root" in _err(tmp_path / "nope.png", policy)
    off = MediaPolicy(allow_local_files=False)
    for source in (inside, str(inside), inside.as_uri(), "photo.jpg"):
        assert "local files are not allowed" in _err(source, off), source
    # base64 and bytes still work with local files off
    assert load_image(base64.b64encode(_png_bytes()).decode(), off).size == (12, 8)


def test_data_uri_and_base64_errors():
    assert "data URI: not an image (media type 'text/plain')" in _err("data:text/plain;base64,aGVsbG8=")
    assert "not an image" in _err("data:,hello")
    assert "data URI: base64 does not decode" in _err("data:image/png;base64,@@@@")
    assert "data URI: malformed" in _err("data:image/png;base64")
    assert "data URI: not an image: cannot identify image file" in _err("data:image/png;base64,aGVsbG8gd29ybGQ=")
    assert "base64: does not decode" in _err("iVBORw0KGgo!!!not-really")
    assert "base64: does not decode" in _err("iVBORw0KGgoAA")  # impossible length
    assert "base64: not an image: cannot identify image file" in _err(base64.b64encode(b"x" * 90).decode())


def test_array_errors():
    assert "numpy array: wrong dtype float32" in _err(np.zeros((4, 4, 3), np.float32))
    assert "numpy array: wrong dtype int64" in _err(np.zeros((4, 4), np.int64))
    assert "numpy array: wrong shape (4, 4, 2)" in _err(np.zeros((4, 4, 2), np.uint8))
    assert "numpy array: wrong shape (1, 4, 4, 3)" in _err(np.zeros((1, 4, 4, 3), np.uint8))
    assert "wrong shape (4,)" in _err(np.zeros(4, np.uint8))
    assert "empty image" in _err(np.zeros((0, 4, 3), np.uint8))
    assert "torch tensor: wrong dtype torch.int32" in _err(torch.zeros(4, 4, 3, dtype=torch.int32))
    assert "torch tensor: float tensor values must be in [0, 1], got [0, 255]" in _err(
        torch.full((3, 4, 4), 255.0).index_fill_(1, torch.tensor([0]), 0.0))
    assert "wrong shape (5, 5, 3) for a float tensor" in _err(torch.zeros(5, 5, 3))  # floats are CHW only
    assert load_image(torch.zeros(4, 4, 3)).size == (3, 4)                             # ... so this is C=4
    assert "NaN" in _err(torch.full((3, 2, 2), float("nan")))
    assert "torch tensor: wrong shape (5, 5, 5)" in _err(torch.zeros(5, 5, 5, dtype=torch.uint8))


def test_unsupported_types_and_parts():
    for source in (42, 3.5, None, ["x"], object()):
        assert "unsupported image source type" in _err(source)
    assert "content part: unsupported type 'text'" in _err({"type": "text", "text": "hi"})
    assert "no image_url.url" in _err({"type": "image_url", "image_url": {}})
    assert "content part 'image': no image" in _err({"type": "image"})
    assert "image source: empty string" in _err("   ")
    msg = _err("ftp://example.com/a.png")
    assert msg.startswith("URL: scheme 'ftp' is not allowed")


def test_to_rgb_and_digest_type_errors():
    with pytest.raises(MediaError, match="to_rgb: expected a PIL.Image.Image"):
        to_rgb(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(MediaError, match="image_digest: expected a PIL.Image.Image"):
        image_digest(b"")


# --------------------------------------------------------------------------------------------- URLs


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    png = b""

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, code, body=b"", headers=(), length=True):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path
        if path == "/img.png":
            self._send(200, self.png, [("Content-Type", "image/png")])
        elif path == "/img-no-length.png":
            self._send(200, self.png, [("Content-Type", "image/png")], length=False)
        elif path.startswith("/hop/"):
            n = int(path.rsplit("/", 1)[1])
            target = "/img.png" if n == 0 else f"/hop/{n - 1}"
            self._send(302, headers=[("Location", target)])
        elif path == "/to-file":
            self._send(302, headers=[("Location", "file:///etc/passwd")])
        elif path == "/to-metadata":
            self._send(307, headers=[("Location", "http://169.254.169.254/latest/meta-data/")])
        elif path == "/slow":
            time.sleep(1.0)
            try:
                self._send(200, self.png)
            except OSError:  # the client gave up, as it should
                pass
        elif path == "/text":
            self._send(200, b"<html>not an image</html>", [("Content-Type", "text/html")])
        else:
            self._send(404, b"nope")


@pytest.fixture(scope="module")
def server():
    _Handler.png = _png_bytes(64, 64)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


LOCAL = MediaPolicy(allow_private_urls=True, url_timeout=2.0)


def test_url_success_and_redirects(server, loopback_only):
    expected = np.asarray(Image.open(io.BytesIO(_Handler.png)))
    for url in (f"{server}/img.png", f"{server}/img-no-length.png", f"{server}/hop/2"):  # hop/n: n+1 redirects
        np.testing.assert_array_equal(np.asarray(load_image(url, LOCAL)), expected)
    part = {"type": "image_url", "image_url": {"url": f"{server}/img.png"}}
    assert load_image(part, LOCAL).size == (64, 64)


def test_url_errors(server, loopback_only):
    assert "URL: too many redirects (more than 3)" in _err(f"{server}/hop/3", LOCAL)
    assert "too many redirects (more than 0)" in _err(f"{server}/hop/0", MediaPolicy(allow_private_urls=True,
                                                                                     max_redirects=0))
    msg = _err(f"{server}/missing", LOCAL)
    assert msg.startswith("URL: HTTP error 404") and "/missing" in msg
    assert "URL: scheme 'file' is not allowed" in _err(f"{server}/to-file", LOCAL)
    small = MediaPolicy(allow_private_urls=True, max_bytes=1000)
    assert "URL: too many bytes: Content-Length" in _err(f"{server}/img.png", small)
    assert "URL: too many bytes: more than max_bytes 1000" in _err(f"{server}/img-no-length.png", small)
    t0 = time.monotonic()
    assert "URL: timed out after 0.2 s" in _err(f"{server}/slow", MediaPolicy(allow_private_urls=True,
                                                                               url_timeout=0.2))
    assert time.monotonic() - t0 < 0.9
    assert "URL: not an image: cannot identify image file" in _err(f"{server}/text", LOCAL)
    assert "URLs are not allowed" in _err(f"{server}/img.png", MediaPolicy(allow_urls=False))


def test_redirect_target_is_rechecked(server, loopback_only, monkeypatch):
    # Let the test server through (it is on 127.0.0.1) but keep refusing everything else private, as the default
    # policy does: the redirect to the cloud metadata address must be refused before any connection is made.
    real = url_fetch._address_problem
    monkeypatch.setattr(url_fetch, "_address_problem", lambda ip: None if str(ip) == "127.0.0.1" else real(ip))
    msg = _err(f"{server}/to-metadata", MediaPolicy())
    assert "169.254.169.254" in msg and "link-local" in msg and "refused by the media policy" in msg


def test_private_media_still_refuses_link_local(server, loopback_only):
    """--allow-private-media lets the loopback test server through, but a redirect to the cloud metadata address
    (link-local) is refused before any connection, unless link-local is allowed on its own as well."""
    msg = _err(f"{server}/to-metadata", LOCAL)
    assert "169.254.169.254" in msg and "link-local" in msg and "allow_link_local_urls=False" in msg
    assert "link-local" in _err("http://[fe80::1]/x.png", LOCAL)


@pytest.mark.parametrize("url, problem", [
    ("http://127.0.0.1/x.png", "loopback"),
    ("http://127.0.0.1:8080/x.png", "loopback"),
    ("http://10.0.0.1/x.png", "private"),
    ("http://192.168.1.1/x.png", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[::1]/x.png", "loopback"),
    ("http://[::ffff:127.0.0.1]/x.png", "loopback"),
    ("http://0.0.0.0/x.png", "unspecified"),
    ("https://localhost/x.png", "loopback name"),
    ("http://LOCALHOST./x.png", "loopback name"),
    ("http://foo.localhost/x.png", "loopback name"),
])
def test_default_policy_refuses_private_targets_without_traffic(url, problem, no_network):
    msg = _err(url)
    assert msg.startswith("URL: host") and problem in msg and "refused by the media policy" in msg


def test_other_schemes_refused_without_traffic(no_network):
    for url in ("ftp://example.com/a.png", "gopher://example.com/", "javascript://x", "ws://example.com/"):
        assert "is not allowed" in _err(url), url
    assert "credentials in URLs are not supported" in _err("http://user:pw@example.com/a.png")


# --------------------------------------------------------------------------------------------- to_rgb / digest


def _white_composite(image: Image.Image) -> np.ndarray:
    """The reference the way transformers 5's convert_to_rgb computes it: RGBA composited onto opaque white."""
    rgba = image.convert("RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB"))


def test_to_rgb_composites_transparency_onto_white_as_hf():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (200, 100, 50, 0))      # fully transparent: white, not the colour stored under it
    rgba.putpixel((1, 0), (10, 20, 30, 128))      # half: between the colour and white
    rgba.putpixel((2, 0), (10, 20, 30, 255))      # opaque: unchanged
    out = to_rgb(rgba)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((2, 0)) == (10, 20, 30)
    assert out.getpixel((1, 0)) == tuple(round(c * 128 / 255 + 255 * 127 / 255) for c in (10, 20, 30))
    # a real picture with a gradient alpha (LA, RGBA) and a palette image with a transparent entry
    rgb = _pattern()
    alpha = np.linspace(0, 255, rgb.shape[0] * rgb.shape[1]).reshape(rgb.shape[:2]).astype(np.uint8)
    cases = {"RGBA": Image.fromarray(np.dstack([rgb, alpha])),
             "LA": Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")}
    p = Image.fromarray(rgb).convert("P")
    p.info["transparency"] = int(np.asarray(p)[0, 0])
    cases["P"] = p
    rgb_key = Image.fromarray(rgb)
    rgb_key.info["transparency"] = tuple(int(c) for c in rgb[0, 0])   # an RGB PNG's tRNS colour
    cases["RGB+tRNS"] = rgb_key
    for name, img in cases.items():
        want = _white_composite(img)
        got = np.asarray(to_rgb(img))
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert (got != np.asarray(img.convert("RGB"))).any(), name   # dropping the alpha would differ
    # the same through an encoded PNG (the transparency survives load_image)
    for name in ("RGBA", "LA", "P"):
        np.testing.assert_array_equal(np.asarray(to_rgb(load_image(_encode(cases[name])))), _white_composite(cases[name]))


def test_to_rgb_without_transparency():
    gray = Image.fromarray(_pattern()[..., 0])
    np.testing.assert_array_equal(np.asarray(to_rgb(gray)), np.repeat(_pattern()[..., :1], 3, axis=2))
    la = gray.convert("LA")      # opaque alpha: the grey replicated
    np.testing.assert_array_equal(np.asarray(to_rgb(la)), np.asarray(to_rgb(gray)))
    p = Image.fromarray(_pattern()).convert("P")
    np.testing.assert_array_equal(np.asarray(to_rgb(p)), np.asarray(p.convert("RGB")))
    i16 = Image.fromarray(np.array([[0, 200, 300, 65535]], np.uint16))
    assert np.asarray(to_rgb(i16))[0, :, 0].tolist() == [0, 200, 255, 255]
    rgb = Image.fromarray(_pattern())
    assert to_rgb(rgb) is rgb
    with pytest.raises(MediaError, match="to_rgb: cannot convert a La image"):
        to_rgb(Image.new("La", (2, 2)))


def test_image_digest():
    a = Image.fromarray(_pattern())
    d = image_digest(a)
    assert len(d) == 64 and int(d, 16) >= 0
    assert image_digest(Image.fromarray(_pattern())) == d
    assert image_digest(load_image(_encode(a))) == d            # same pixels whatever the source
    assert image_digest(a.convert("RGBA")) != d                  # mode matters
    assert image_digest(Image.fromarray(_pattern()[:, ::-1])) != d
    flat = np.zeros((2, 6, 3), np.uint8)
    assert image_digest(Image.fromarray(flat)) != image_digest(Image.fromarray(flat.reshape(6, 2, 3)))  # size
    p1 = Image.new("P", (2, 2))
    p1.putpalette([1, 2, 3] * 256)
    p2 = Image.new("P", (2, 2))
    p2.putpalette([9, 9, 9] * 256)
    assert image_digest(p1) != image_digest(p2)                  # same indices, different colours


# --------------------------------------------------------------------------------------------- HF reference


_CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073))
_CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711))


def _qwen2vl_pixels(rgb: Image.Image, grid_h: int, grid_w: int, patch: int = 14, merge: int = 2, t: int = 2):
    """Qwen2VLImageProcessorPil: PIL bicubic resize, rescale 1/255, CLIP normalise, (t, c, p, p) patches."""
    h, w = grid_h * patch, grid_w * patch
    arr = np.asarray(rgb.resize((w, h), Image.Resampling.BICUBIC)).astype(np.float64).transpose(2, 0, 1)
    x = (arr * (1 / 255) - _CLIP_MEAN[:, None, None]) / _CLIP_STD[:, None, None]
    frames = np.stack([x] * t)[None]                                  # [1, T, C, H, W]
    rows = frames.reshape(1, 1, t, 3, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    rows = rows.transpose(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return rows.reshape(grid_h * grid_w, 3 * t * patch * patch).astype(np.float32)


@needs_fixtures
@pytest.mark.parametrize("image, reference, mode", [
    ("logo_rgba_128.png", "qwen2vl_rgba.npz", "RGBA"),
    ("camera_gray_128.png", "qwen2vl_gray.npz", "L"),
])
def test_to_rgb_matches_hf_qwen2vl_reference(image, reference, mode):
    ref = np.load(REFERENCE / reference)
    expected = ref["proc_pixel_values"]
    _, grid_h, grid_w = (int(v) for v in ref["proc_image_grid_thw"][0])
    img = load_image(IMAGES / image)
    assert img.mode == mode
    ours = _qwen2vl_pixels(to_rgb(img), grid_h, grid_w)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours[0], expected[0], atol=1e-5)   # the first patch
    np.testing.assert_allclose(ours, expected, atol=1e-5)         # and all of them
    if mode == "RGBA":
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min() < 255:  # only then can the fixture tell "alpha dropped" from "composited over white"
            white = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
            assert np.abs(_qwen2vl_pixels(white, grid_h, grid_w) - expected).max() > 1e-2
