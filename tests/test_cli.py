"""The `ocula` command: run (text and images, --json), inspect, errors without tracebacks."""
import json
import subprocess
import sys

import pytest
from conftest import needs_shared
from parity import FIXTURES, manifest

from ocula.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ocula", *args], capture_output=True, text=True, timeout=300)


def test_run_json_on_tiny_model(tiny_llama, capsys):
    code = main(["run", "-m", str(tiny_llama), "-p", "the cat", "-n", "5", "--temp", "0", "--ignore-eos", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length"
    assert out["prompt_tokens"] > 0 and out["timings"]["generated_tokens"] == 5
    assert set(out["timings"]) >= {"prompt_ms", "ttft_ms", "generation_tps", "image_tokens", "image_encode_ms"}


def test_run_raw_and_seeded_sampling_is_reproducible(tiny_llama, capsys):
    args = ["run", "-m", str(tiny_llama), "-p", "the", "-n", "6", "--temp", "1.0", "--seed", "3", "--raw", "--json"]
    main(args)
    a = json.loads(capsys.readouterr().out)["token_ids"]
    main(args)
    assert json.loads(capsys.readouterr().out)["token_ids"] == a


def test_inspect(tiny_llama, capsys):
    assert main(["inspect", str(tiny_llama), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llama" and info["block_count"] == 2 and "F32" in info["tensor_types"]


def test_errors_are_one_line_not_tracebacks(tmp_path, tiny_llama):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    r = run_cli("run", "-m", str(bad), "-p", "x")
    assert r.returncode == 1 and "not a GGUF file" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("run", "-m", str(tiny_llama), "-p", "x", "--image", "a.png")
    assert r.returncode == 1 and "text-only model" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("run", "-m", str(tiny_llama), "-p", "x", "--top-p", "0")
    assert r.returncode == 1 and "top_p" in r.stderr


@needs_shared
@pytest.mark.parametrize("name", sorted(n for n, m in manifest()["models"].items() if m["gguf"].get("mmproj")))
def test_run_each_fixture_pair_with_an_image(name, capsys):
    files = manifest()["models"][name]["gguf"]
    code = main(["run", "-m", str(FIXTURES / files["text"]), "--mmproj", str(FIXTURES / files["mmproj"]),
                 "--image", str(FIXTURES / "images/astronaut_224.png"), "-p", "What is this?",
                 "-n", "4", "--temp", "0", "--ignore-eos", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["timings"]["image_tokens"] > 0 and out["timings"]["image_encode_ms"] > 0
    assert len(out["token_ids"]) == 4


@pytest.mark.parametrize("args, message", [
    (["-t", "-2"], "-t/--threads must be >= 1, got -2"),
    (["--device", "tpu"], "device 'tpu' is not a device name torch knows"),
    (["--device", "mps"], "device 'mps' is not supported: ocula runs on cpu or cuda"),
    (["-c", "-5"], "-c/--ctx-size must be a positive number of tokens"),
    (["--temp", "inf"], "temperature must be a finite number, got inf"),
    (["--temp", "nan"], "temperature must be a finite number, got nan"),
    (["--temp", "1e308"], "temperature must be in [0, 1e6]"),
    (["--top-p", "nan"], "top_p must be a finite number"),
    (["--repeat-penalty", "inf"], "repetition_penalty must be a finite number"),
    (["--image-max-tokens", "0"], "--image-max-tokens must be >= 1"),
])
def test_bad_numbers_and_devices_are_one_error_line_before_loading(tiny_llama, capsys, args, message):
    code = main(["run", "-m", str(tiny_llama), "-p", "x", "-n", "2", *args])
    err = capsys.readouterr().err
    assert code == 1 and f"ocula: error: {message}" in err, err
    assert "loaded" not in err and "Traceback" not in err  # refused before the model loads


def test_cuda_on_a_torch_without_it_is_an_error_line(tiny_llama, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert main(["run", "-m", str(tiny_llama), "-p", "x", "--device", "cuda"]) == 1
    assert "ocula: error: device 'cuda' asked for, but" in capsys.readouterr().err


def test_serve_port_out_of_range_and_busy_port_before_loading(tiny_llama, capsys):
    import socket

    pytest.importorskip("uvicorn")
    assert main(["serve", "-m", str(tiny_llama), "--port", "99999"]) == 1
    assert "ocula: error: --port must be in 0..65535, got 99999" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "-m", str(tiny_llama), "--host", "127.0.0.1", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"ocula: error: port {port} is already in use" in err and "loaded" not in err, err


def run_chat(monkeypatch, capsys, args: list[str], lines: list[str]) -> tuple[int, str, str]:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = main(["chat", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_shared
def test_chat_refuses_a_broken_image_once_and_the_conversation_goes_on(tmp_path, monkeypatch, capsys):
    files = manifest()["models"]["qwen2vl"]["gguf"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    lines = ["/image " + str(broken), "/image " + str(tmp_path / "missing.png"), "hello", "/image "
             + str(FIXTURES / "images/astronaut_224.png"), "what is this?", "and again?"]
    import ocula.api

    sent = []
    chat = ocula.api.Model.chat
    monkeypatch.setattr(ocula.api.Model, "chat", lambda self, messages, **kw: (sent.append(messages),
                                                                              chat(self, messages, **kw))[1])
    code, out, err = run_chat(monkeypatch, capsys, ["-m", str(FIXTURES / files["text"]), "--mmproj",
                                                    str(FIXTURES / files["mmproj"]), "-n", "3", "--temp", "0",
                                                    "--ignore-eos"], lines)
    assert code == 0 and "Traceback" not in err
    assert err.count("broken.png") == 1 and "the image was left out" in err, err   # refused once, at /image
    assert "missing.png" in err
    assert err.count("error:") == 2, err                  # the messages after it raised no error
    assert "astronaut_224.png will go with your next message" in err
    # three turns, each sent with the whole conversation so far; the image goes with the second only
    assert [len(m) for m in sent] == [1, 3, 5], sent
    assert sent[0][0]["content"] == "hello" and sent[2][:3] == sent[1]
    assert [p["type"] for p in sent[1][2]["content"]] == ["image", "text"] and sent[2][4]["content"] == "and again?"


def test_chat_image_on_a_text_only_model_is_refused_at_once(tiny_llama, monkeypatch, capsys):
    for template in (["--chat-template", "chatml"], []):  # chat, and completion mode (no template in the file)
        code, out, err = run_chat(monkeypatch, capsys, ["-m", str(tiny_llama), "-n", "2", "--temp", "0",
                                                        "--ignore-eos", *template], ["/image x.png", "hello", "hi"])
        assert code == 0 and "takes no images: start ocula chat with --mmproj" in err and err.count("error:") == 1, err


def test_model_without_chat_template_runs_as_a_completion(tiny_llama, capsys):
    import ocula

    model = ocula.load(tiny_llama)
    assert not model.has_chat_template
    prompt = "the cat sat"
    want = model.generate(prompt, max_tokens=4, temperature=0, ignore_eos=True)
    assert main(["run", "-m", str(tiny_llama), "-p", prompt, "-n", "4", "--temp", "0", "--ignore-eos", "--json"]) == 0
    out = capsys.readouterr()
    got = json.loads(out.out)
    assert got["token_ids"] == want.token_ids and got["prompt_tokens"] == want.prompt_tokens
    assert out.err.count("has no chat template") == 1 and "completing the prompt as is" in out.err
    # --chat-template chooses the chat format: the prompt is the template's rendering
    assert main(["run", "-m", str(tiny_llama), "-p", prompt, "-n", "4", "--temp", "0", "--ignore-eos", "--json",
                 "--chat-template", "chatml"]) == 0
    chatml = json.loads(capsys.readouterr().out)
    want = model.tokenize("<|im_start|>user\nthe cat sat<|im_end|>\n<|im_start|>assistant\n", add_special=False)
    assert chatml["prompt_tokens"] == len(want)
    assert main(["run", "-m", str(tiny_llama), "-p", "x", "--raw", "--chat-template", "chatml"]) == 1
    assert "contradict" in capsys.readouterr().err


def test_bad_chat_template_flag_is_an_error_line(tiny_llama, capsys, tmp_path):
    assert main(["run", "-m", str(tiny_llama), "-p", "x", "--chat-template", str(tmp_path / "none.jinja")]) == 1
    assert "is neither a built-in template" in capsys.readouterr().err
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    assert main(["run", "-m", str(tiny_llama), "-p", "x", "--chat-template", str(bad)]) == 1
    assert "the chat template does not parse" in capsys.readouterr().err


def test_chat_without_template_continues_the_transcript(tiny_llama, monkeypatch, capsys):
    import ocula.api

    prompts = []
    generate = ocula.api.Model.generate
    monkeypatch.setattr(ocula.api.Model, "generate", lambda self, prompt, **kw: (prompts.append(prompt),
                                                                                generate(self, prompt, **kw))[1])
    code, out, err = run_chat(monkeypatch, capsys, ["-m", str(tiny_llama), "-n", "3", "--temp", "0", "--ignore-eos"],
                              ["Once upon", "a time"])
    assert code == 0 and "completion mode" in err and len(prompts) == 2
    assert prompts[0] == "Once upon" and prompts[1].startswith("Once upon") and prompts[1].endswith("\na time")


def test_inspect_tells_the_truth_about_the_template(tiny_llama, capsys):
    assert main(["inspect", str(tiny_llama), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["chat_template"].startswith("no") and "complete the prompt as is" in info["chat_template"]
    assert "ChatML" in info["chat_template"]  # llama's fallback; Gemma files get Gemma's turn format


def test_first_kernel_build_says_so(tmp_path):
    # a compiler that fails: the note comes first, then the fallback warning; nothing is built
    import os

    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), CC="/bin/false", OCULA_NATIVE="1")
    r = subprocess.run([sys.executable, "-c", "from ocula.quant import kernels; print(kernels.native_lib())"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr
    assert "ocula: compiling the C kernels for this CPU with false (first run only" in r.stderr, r.stderr


def test_first_demo_assembly_says_so(tiny_llama, tmp_path, monkeypatch, capsys):
    import shutil
    import types

    from ocula.cli import DEMO_PACKAGE

    target = tmp_path / "demo.gguf"
    fake = types.ModuleType(DEMO_PACKAGE)
    fake.default_output_path = lambda: target
    fake.assemble = lambda: shutil.copy(tiny_llama, target) and target
    monkeypatch.setitem(sys.modules, DEMO_PACKAGE, fake)
    for first in (True, False):
        assert main(["run", "-p", "x", "-n", "1", "--json"]) == 0
        err = capsys.readouterr().err
        assert ("assembling the demo model file" in err) == first, err


def test_serve_chat_template_flag(tiny_llama):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    import ocula
    from ocula.server.testing import ServerProcess

    from ocula.text.chat import ChatTemplate

    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }} {% endfor %}[assistant]"
    lib = ocula.load(tiny_llama)
    lib.template = ChatTemplate(template)
    messages = [{"role": "user", "content": "hello there"}]
    assert lib.apply_chat_template(messages) == "[user] hello there [assistant]"
    want = len(lib.prompt_token_ids(messages))
    body = {"messages": messages, "max_tokens": 1}
    with ServerProcess(["-m", str(tiny_llama), "--chat-template", template]) as server:
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == want, r.text
    with ServerProcess(["-m", str(tiny_llama)]) as server:
        assert "has no chat template (a base model?)" in server.output()
    r = run_cli("serve", "-m", str(tiny_llama), "--chat-template", "{% if %}")
    assert r.returncode == 1 and "ocula: error: the chat template does not parse" in r.stderr, r.stderr
