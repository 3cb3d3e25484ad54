"""Video decoding (ocula.media.video): every input form gives the same clip, chosen frames decoded by seeking equal a
full decode, real timestamps, caps, and a clear MediaError for each bad input."""
import base64
import io

import numpy as np
import pytest
from PIL import Image

from ocula.errors import MediaError
from ocula.media import MediaPolicy
from ocula.media.video import VideoLimits, open_video

av = pytest.importorskip("av", reason="video input needs PyAV (pip install 'ocula[video]')")


def make_clip(n=40, fps=25, gop=8, size=(64, 48), fmt="mp4", codec="libx264", bframes=True) -> bytes:
    """A small clip whose frames differ (a moving gradient), keyframes every `gop` frames."""
    w, h = size
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.gop_size = gop
        if codec == "libx264":
            s.codec_context.options = {"bf": "2" if bframes else "0", "keyint_min": str(gop), "sc_threshold": "0"}
        y, x = np.mgrid[0:h, 0:w]
        for i in range(n):
            rgb = np.stack([(x * 4 + i * 6) % 256, (y * 5 + i * 3) % 256, np.full_like(x, i * 5 % 256)], -1)
            frame = av.VideoFrame.from_ndarray(rgb.astype(np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def full_decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        frames = sorted(((f.pts, f.to_ndarray(format="rgb24")) for f in c.decode(c.streams.video[0])),
                        key=lambda t: t[0])
    return np.stack([f for _, f in frames])


@pytest.fixture(scope="module")
def clip_bytes() -> bytes:
    return make_clip()


def test_seeking_decode_equals_full_decode(clip_bytes):
    clip = open_video(clip_bytes)
    assert clip.total_frames == 40 and clip.fps == 25.0 and (clip.width, clip.height) == (64, 48)
    assert len(clip._keyframes) >= 4  # several GOPs, so runs of wanted frames need seeks
    full = full_decode(clip_bytes)
    for indices in ([0, 39], [17, 3, 3, 30], [9, 10, 11, 25, 38], list(range(40))):
        assert np.array_equal(clip.frames(indices), full[indices])


def test_parallel_and_single_thread_decodes_agree(clip_bytes):
    import torch

    clip = open_video(clip_bytes)
    indices = [1, 9, 17, 25, 33, 39]  # one frame in each GOP
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = clip.frames(indices)
        torch.set_num_threads(3)
        assert np.array_equal(clip.frames(indices), one)
    finally:
        torch.set_num_threads(old)
    assert np.array_equal(one, full_decode(clip_bytes)[indices])


def test_timestamps_are_the_stream_pts(clip_bytes):
    clip = open_video(clip_bytes)
    assert clip.timestamps == pytest.approx([i / 25 for i in range(40)])
    assert clip.duration == pytest.approx(1.6)


def test_webm_without_a_frame_count_in_its_header():
    data = make_clip(n=21, fps=10, gop=5, fmt="webm", codec="libvpx-vp9")
    clip = open_video(data)
    assert clip.total_frames == 21
    assert np.array_equal(clip.frames([0, 7, 20]), full_decode(data)[[0, 7, 20]])


def test_every_input_form_gives_the_same_clip(tmp_path, clip_bytes):
    path = tmp_path / "clip.mp4"
    path.write_bytes(clip_bytes)
    b64 = base64.b64encode(clip_bytes).decode()
    sources = [str(path), path, path.as_uri(), f"data:video/mp4;base64,{b64}", b64, clip_bytes,
               {"type": "video", "video": str(path)}, {"type": "video_url", "video_url": {"url": path.as_uri()}},
               {"type": "video_url", "video_url": f"data:video/mp4;base64,{b64}"},
               {"type": "input_video", "input_video": {"data": b64, "format": "mp4"}},
               {"type": "input_video", "input_video": b64}]
    digests = {open_video(s).digest for s in sources}
    assert len(digests) == 1


def test_frames_as_arrays_and_images(clip_bytes):
    full = full_decode(clip_bytes)[:6]
    a = open_video(full, fps=12.0)
    b = open_video([Image.fromarray(f) for f in full], fps=12.0)
    c = open_video({"type": "video", "video": list(full), "fps": 12.0})
    assert a.digest == b.digest == c.digest
    assert a.total_frames == 6 and a.fps == 12.0 and a.timestamps[3] == pytest.approx(0.25)
    assert np.array_equal(a.frames([5, 0]), full[[5, 0]])
    assert open_video(full).fps == 24.0  # the rate transformers assumes for frames without metadata


@pytest.mark.parametrize("source, message", [
    (b"hello, this is plainly not a video file" * 4, "not a video file"),
    (b"", "empty data"),
    ("data:image/png;base64,iVBORw0KGgo=", "not a video"),
    ("data:video/mp4;base64,@@@@", "does not decode"),
    ("ftp://example.com/clip.mp4", "scheme 'ftp' is not allowed"),
    ("/no/such/clip.mp4", "file not found"),
    (np.zeros((0, 8, 8, 3), np.uint8), "zero-length"),
    (np.zeros((4, 8, 8), np.uint8), "expected uint8 [T, H, W, 3]"),
    (np.zeros((4, 8, 8, 3), np.float32), "expected uint8 [T, H, W, 3]"),
    ({"type": "video_url"}, "video_url must be"),
    ({"type": "input_video", "input_video": {"format": "mp4"}}, "input_video"),
    (12345, "unsupported video source type int"),
])
def test_bad_sources_are_named(source, message):
    with pytest.raises(MediaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        open_video(source)


def test_an_image_file_is_not_a_video(tmp_path):
    path = tmp_path / "still.png"
    Image.new("RGB", (16, 16), "red").save(path)
    with pytest.raises(MediaError, match="still image .png.*not a video"):
        open_video(str(path))


def test_zero_length_clip():
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()
    with pytest.raises(MediaError, match="zero-length"):
        open_video(buf.getvalue())


def test_undecodable_codec():
    data = make_clip(n=3, fmt="matroska")
    assert data.count(b"V_MPEG4/ISO/AVC") == 1
    unknown = data.replace(b"V_MPEG4/ISO/AVC", b"V_OCULA/UNKNOWN")  # a codec id no decoder knows
    with pytest.raises(MediaError, match="codec 'unknown' cannot be decoded"):
        open_video(unknown)


def test_caps(clip_bytes):
    with pytest.raises(MediaError, match="too many bytes"):
        open_video(clip_bytes, limits=VideoLimits(max_bytes=1000))
    with pytest.raises(MediaError, match="max_duration"):
        open_video(clip_bytes, limits=VideoLimits(max_duration=1.0))
    with pytest.raises(MediaError, match="max_frames"):
        open_video(clip_bytes, limits=VideoLimits(max_frames=30))
    with pytest.raises(MediaError, match="max_pixels"):
        open_video(clip_bytes, limits=VideoLimits(max_pixels=64 * 47))


def test_local_file_policy(tmp_path, clip_bytes):
    path = tmp_path / "clip.mp4"
    path.write_bytes(clip_bytes)
    with pytest.raises(MediaError, match="local files are not allowed"):
        open_video(str(path), MediaPolicy(allow_local_files=False))
    with pytest.raises(MediaError, match="outside the allowed local root"):
        open_video(path.as_uri(), MediaPolicy(allowed_local_root=str(tmp_path / "elsewhere")))
    assert open_video(path.as_uri(), MediaPolicy(allowed_local_root=str(tmp_path))).total_frames == 40


def test_raw_elementary_stream_without_timestamps():
    data = make_clip(n=12, fps=10, gop=4, fmt="h264")
    clip = open_video(data)
    assert clip.total_frames == 12
    assert np.array_equal(clip.frames([0, 5, 11]), full_decode_in_order(data)[[0, 5, 11]])


def full_decode_in_order(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])
