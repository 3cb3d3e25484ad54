"""Mixed load on a real `ocula serve`: do text requests stay fast while images encode and clients misbehave?

16 concurrent clients, each looping until the phase ends:
- text chats (streamed, `--max-tokens` tokens, EOS ignored): the latency measured;
- image chats with a small image (a fresh random 224x224 PNG per request, so it is always encoded);
- slow clients: one sends its image as an http URL on a loopback server that drips one byte a second
  (the fetch ends at the server's --media-timeout), one uploads its request body one small piece at a time;
- in the second phase one text client is replaced by a large-image client: a fresh `--big` x `--big` image
  per request (4096 tokens on Qwen-VL under the server's default cap), encoding the whole phase.

Reports p50/p99 latency and time to first token of the text requests in each phase:

    python benchmarks/load_test.py -m ../shared/fixtures/models/qwen2vl/qwen2vl-f16.gguf \\
        --mmproj ../shared/fixtures/models/qwen2vl/mmproj-qwen2vl-f16.gguf --duration 45 [--json]

Everything runs on 127.0.0.1: the server is spawned here (`ocula serve`), the dripping URL server too.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import Sample, _pct, one_request  # noqa: E402

HOST = "127.0.0.1"


def png_uri(side: int, rng: np.random.Generator) -> str:
    """A fresh image each call (new content: never an embedding-cache hit); smooth, so it is small to send."""
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(content, max_tokens: int) -> dict:
    return {"model": "bench", "messages": [{"role": "user", "content": content}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}


def image_content(url: str, text: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


class Drip:
    """A loopback HTTP server that answers every request one byte a second, never finishing in time."""

    def __init__(self):
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    @staticmethod
    def _drip(conn):
        try:
            conn.recv(65536)
            for b in b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n" + b"X: " + b"x" * 500:
                conn.sendall(bytes([b]))
                time.sleep(1.0)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.sock.close()


def slow_upload(port: int, body: dict, pieces: int, seconds: float, timeout: float) -> Sample:
    """POST whose body arrives in `pieces` parts spread over `seconds`."""
    data = json.dumps(body).encode()
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(data)))
        conn.endheaders()
        step = -(-len(data) // pieces)
        for i in range(0, len(data), step):
            conn.send(data[i : i + step])
            time.sleep(seconds / pieces)
        resp = conn.getresponse()
        resp.read()
        return Sample(resp.status == 200, time.perf_counter() - t0, status=resp.status)
    except (OSError, http.client.HTTPException) as e:
        return Sample(False, time.perf_counter() - t0, error=str(e))
    finally:
        conn.close()


def run_phase(port: int, args, drip_port: int, big: bool) -> dict:
    kinds = ["text"] * 11 + ["image"] * 3 + ["slow_url", "slow_upload"]
    if big:
        kinds[0] = "big_image"
    assert len(kinds) == 16
    samples: dict[str, list[Sample]] = {k: [] for k in set(kinds)}
    lock = threading.Lock()
    end = time.perf_counter() + args.duration

    def client(idx: int, kind: str):
        rng = np.random.default_rng(1000 * idx + int(big))
        n = 0
        while time.perf_counter() < end:
            n += 1
            if kind == "text":
                s = one_request(HOST, port, chat_body(f"Client {idx} asks question {n}: tell a story.", args.max_tokens),
                                None, args.timeout)
            elif kind == "image":
                s = one_request(HOST, port, chat_body(image_content(png_uri(224, rng), "What is it?"), 8), None,
                                args.timeout)
            elif kind == "big_image":
                s = one_request(HOST, port, chat_body(image_content(png_uri(args.big, rng), "Describe it."), 8),
                                None, args.timeout)
            elif kind == "slow_url":
                s = one_request(HOST, port, chat_body(image_content(f"http://{HOST}:{drip_port}/{idx}-{n}.png",
                                                                    "What is it?"), 8), None, args.timeout)
                s.ok = s.status == 400  # the expected answer: the fetch timed out
            else:
                s = slow_upload(port, chat_body(f"Slow client {n}.", 8), 20, 4.0, args.timeout)
            with lock:
                samples[kind].append(s)

    threads = [threading.Thread(target=client, args=(i, k), daemon=True) for i, k in enumerate(kinds)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.duration + args.timeout + 10)
    wall = time.perf_counter() - t0

    def summary(kind: str) -> dict:
        got = samples.get(kind, [])
        ok = [s for s in got if s.ok]
        lat = sorted(s.latency for s in ok)
        ttft = sorted(s.ttft for s in ok if s.ttft is not None)
        return {"requests": len(got), "ok": len(ok), "latency_p50_s": _pct(lat, 50), "latency_p99_s": _pct(lat, 99),
                "latency_max_s": round(lat[-1], 3) if lat else None, "ttft_p50_s": _pct(ttft, 50),
                "ttft_p99_s": _pct(ttft, 99),
                "errors": sorted({f"{s.status} {s.error}"[:100] for s in got if not s.ok})[:3]}

    return {"phase": "with the large image" if big else "without the large image", "wall_s": round(wall, 1),
            **{k: summary(k) for k in sorted(samples)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--mmproj", required=True)
    p.add_argument("--duration", type=float, default=45.0, help="seconds per phase (default 45)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per text answer (default 16)")
    p.add_argument("--big", type=int, default=2000, help="side of the large image in pixels (default 2000)")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra `ocula serve` arguments (default: -c 8192 -t 1 --parallel 8 --media-timeout 3)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from ocula.server.testing import ServerProcess

    extra = [a for x in args.serve_arg for a in x.split()] or ["-c", "8192", "-t", "1", "--parallel", "8",
                                                                "--media-timeout", "3"]
    serve = ["-m", args.model, "--mmproj", args.mmproj, "--allow-private-media", *extra]
    drip = Drip()
    try:
        with ServerProcess(serve, startup_timeout=300) as server:
            port = server.port
            warm = one_request(HOST, port, chat_body(image_content(png_uri(224, np.random.default_rng(0)), "hi"), 4),
                               None, args.timeout)
            if not warm.ok:
                print(f"load_test.py: warm-up failed: {warm.status} {warm.error}", file=sys.stderr)
                return 1
            phases = [run_phase(port, args, drip.port, big=False), run_phase(port, args, drip.port, big=True)]
    finally:
        drip.close()
    report = {"model": Path(args.model).name, "serve_args": serve[4:], "duration_s": args.duration,
              "max_tokens": args.max_tokens, "big": args.big, "phases": phases}
    if args.json:
        print(json.dumps(report))
        return 0
    for ph in phases:
        print(f"{ph['phase']} ({ph['wall_s']} s):")
        for kind in ("text", "image", "big_image", "slow_url", "slow_upload"):
            if kind in ph:
                r = ph[kind]
                print(f"  {kind:<12} {r['ok']:>3}/{r['requests']:<3} ok  latency p50 {r['latency_p50_s']} s  "
                      f"p99 {r['latency_p99_s']} s  max {r['latency_max_s']} s  ttft p50 {r['ttft_p50_s']} s  "
                      f"p99 {r['ttft_p99_s']} s  {'; '.join(r['errors'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
