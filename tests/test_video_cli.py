"""`ocula run --video PATH [--video-fps F]`: the answer equals the library's with the same video options; bad clips
and flags are one `ocula: error:` line."""
import json

import pytest
from parity import FIXTURES, load_model

from ocula.cli import main

pytest.importorskip("av", reason="video input needs PyAV (pip install 'ocula[video]')")

MODEL = FIXTURES / "models" / "qwen25vl" / "qwen25vl-f16.gguf"
MMPROJ = FIXTURES / "models" / "qwen25vl" / "mmproj-qwen25vl-f16.gguf"
CLIP = FIXTURES / "video" / "clips" / "a_astronaut_pan_24fps.mp4"
pytestmark = pytest.mark.skipif(not (MODEL.exists() and MMPROJ.exists() and CLIP.exists()),
                                reason="shared Qwen2.5-VL fixture or video clip absent")


def test_run_with_video_equals_library(capsys):
    base = ["run", "-m", str(MODEL), "--mmproj", str(MMPROJ), "-p", "Describe this video.", "-n", "6", "--temp", "0",
            "--ignore-eos", "--json", "--video", str(CLIP)]
    assert main(base + ["--video-fps", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    lib = load_model(str(MODEL), str(MMPROJ))
    messages = [{"role": "user", "content": [{"type": "video", "video": str(CLIP)},
                                             {"type": "text", "text": "Describe this video."}]}]
    want = lib.chat(messages, video_options={"do_sample_frames": True, "fps": 3.0}, max_tokens=6, temperature=0,
                    ignore_eos=True)
    assert out["token_ids"] == want.token_ids and out["prompt_tokens"] == want.prompt_tokens
    assert main(base) == 0  # no --video-fps: every frame (Qwen2.5-VL's processor default), a longer prompt
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] > want.prompt_tokens


@pytest.mark.parametrize("extra, message", [
    (["--video", "/no/such/clip.mp4"], "file not found"),
    (["--video", str(CLIP), "--video-fps", "0"], "--video-fps must be a positive number"),
    (["--video", str(CLIP), "--raw"], "cannot carry images or videos"),
])
def test_bad_video_flags_are_one_line(capsys, extra, message):
    code = main(["run", "-m", str(MODEL), "--mmproj", str(MMPROJ), "-p", "hi", "-n", "1", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("ocula: error:") and message in err[-1]


def test_bench_video_json(capsys):
    assert main(["bench", "-m", str(MODEL), "--mmproj", str(MMPROJ), "--video", str(CLIP), "--reps", "1",
                 "--warmup", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    r = report["videos"][0]["ocula"]
    assert r["frames"] == 8  # 2 s at --video-fps' default 4
    assert r["tokens"] == 4 * 5 * 7  # 4 temporal slots of a 140x196 frame (5x7 merged tokens)
    assert r["encode_ms"]["median"] > 0 and r["encode_ms_per_frame"] > 0 and r["decode_ms"]["median"] > 0


def test_chat_video_command(monkeypatch, capsys, tmp_path):
    import io
    import sys

    import ocula.api

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 20)
    sent = []
    chat = ocula.api.Model.chat
    monkeypatch.setattr(ocula.api.Model, "chat", lambda self, messages, **kw: (sent.append((messages, kw)),
                                                                              chat(self, messages, **kw))[1])
    lines = [f"/video {bad}", f"/video {CLIP}", "what happens?", "and then?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = main(["chat", "-m", str(MODEL), "--mmproj", str(MMPROJ), "-n", "2", "--temp", "0", "--video-fps", "2"])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err
    assert err.count("the video was left out") == 1 and "2.0 s, will go with your next message" in err
    assert [len(m) for m, _ in sent] == [1, 3]
    assert [p["type"] for p in sent[0][0][0]["content"]] == ["video", "text"]
    assert sent[1][0][2]["content"] == "and then?"
    assert sent[0][1]["video_options"] == {"do_sample_frames": True, "fps": 2.0}
