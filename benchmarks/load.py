"""Load test of a running `ocula serve`: requests/s, p50/p99 latency, time to first token and generated tokens/s
at several concurrency levels (default 1, 4 and 16 clients), over streaming chat completions.

    ocula serve -m model.gguf --mmproj mmproj.gguf &            # or let --spawn start one
    python benchmarks/load.py --url http://127.0.0.1:8080 --image photo.png --max-tokens 32
    python benchmarks/load.py --spawn -m model.gguf --mmproj mmproj.gguf --image photo.png --json

Bounded: at most --requests requests per level (at least one per client) and --duration seconds per level;
each request has --timeout. Loopback only: any URL whose host is not 127.0.0.0/8, ::1 or localhost is refused.
Standard library only (http.client), so it runs without the server extras.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import ipaddress
import json
import mimetypes
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

QUESTIONS = [
    "Describe what you see in one sentence.",
    "List three colours you notice.",
    "What might happen next?",
    "Write a short caption.",
    "Is anything unusual here?",
    "Summarise it for a child.",
]


@dataclass
class Sample:
    ok: bool
    latency: float
    ttft: float | None = None
    tokens: int = 0
    status: int = 0
    error: str = ""


@dataclass
class LevelResult:
    clients: int
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0

    def summary(self) -> dict:
        ok = [s for s in self.samples if s.ok]
        lat = sorted(s.latency for s in ok)
        ttft = sorted(s.ttft for s in ok if s.ttft is not None)
        tokens = sum(s.tokens for s in ok)
        errors: dict[str, int] = {}
        for s in self.samples:
            if not s.ok:
                key = f"{s.status} {s.error}"[:80]
                errors[key] = errors.get(key, 0) + 1
        return {
            "clients": self.clients,
            "requests": len(self.samples),
            "ok": len(ok),
            "errors": errors,
            "wall_s": round(self.wall, 3),
            "requests_per_s": round(len(ok) / self.wall, 3) if self.wall else 0.0,
            "latency_p50_s": _pct(lat, 50),
            "latency_p99_s": _pct(lat, 99),
            "ttft_p50_s": _pct(ttft, 50),
            "ttft_p99_s": _pct(ttft, 99),
            "completion_tokens": tokens,
            "tokens_per_s": round(tokens / self.wall, 2) if self.wall else 0.0,
        }


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    k = max(0, min(len(values) - 1, int(round(p / 100 * len(values) + 0.5)) - 1))  # nearest rank
    return round(values[k], 4)


def check_loopback(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise SystemExit(f"load.py: --url must be http://HOST:PORT on loopback, got {url!r}")
    host, port = parts.hostname, parts.port or 80
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SystemExit(f"load.py: cannot resolve {host!r}: {e}") from None
    for info in infos:
        if not ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback:
            raise SystemExit(f"load.py: refusing {host!r} ({info[4][0]}): only loopback servers may be load-tested")
    return host, port


def build_body(i: int, args, image_uri: str | None) -> dict:
    question = QUESTIONS[i % len(QUESTIONS)] + (f" (request {i})" if args.distinct else "")
    content = [{"type": "text", "text": question}]
    if image_uri is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_uri}})
    return {
        "model": "bench", "messages": [{"role": "user", "content": content}], "stream": True,
        "stream_options": {"include_usage": True}, "max_tokens": args.max_tokens, "temperature": args.temperature,
        "ignore_eos": args.ignore_eos,
    }


def one_request(host: str, port: int, body: dict, api_key: str | None, timeout: float) -> Sample:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read().decode("utf-8", errors="replace")
            try:
                msg = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = text
            return Sample(False, time.perf_counter() - t0, status=resp.status, error=msg)
        ttft, tokens = None, 0
        for raw in resp:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return Sample(False, time.perf_counter() - t0, status=200, error=chunk["error"].get("message", ""))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                if ttft is None and (choice.get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - t0
        return Sample(True, time.perf_counter() - t0, ttft, tokens, 200)
    except (OSError, http.client.HTTPException, ValueError) as e:
        return Sample(False, time.perf_counter() - t0, status=0, error=f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def run_level(host: str, port: int, clients: int, args, image_uri: str | None) -> LevelResult:
    total = max(args.requests, clients)
    counter = iter(range(total))
    lock = threading.Lock()
    result = LevelResult(clients)
    deadline = time.perf_counter() + args.duration

    def client():
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            sample = one_request(host, port, build_body(i, args, image_uri), args.api_key, args.timeout)
            with lock:
                result.samples.append(sample)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.duration + args.timeout + 5)
    result.wall = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080", help="running server (loopback only)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels (default 1,4,16)")
    p.add_argument("--requests", type=int, default=32, help="requests per level, at most (default 32)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per level, at most (default 60)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--image", default=None, help="image file sent (as a data: URI) with every request")
    p.add_argument("--distinct", action="store_true", help="make every prompt different (defeats prefix reuse)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--spawn", action="store_true", help="start `ocula serve` with the model arguments below")
    p.add_argument("-m", "--model", default=None, help="with --spawn: model .gguf")
    p.add_argument("--mmproj", default=None, help="with --spawn: mmproj .gguf")
    p.add_argument("--serve-arg", action="append", default=[], help="with --spawn: extra `ocula serve` argument")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.clients.split(",") if x.strip()]
    if not levels or min(levels) < 1 or args.requests < 1 or args.duration <= 0:
        p.error("--clients needs positive integers; --requests and --duration must be positive")
    image_uri = None
    if args.image:
        mime = mimetypes.guess_type(args.image)[0] or "image/png"
        with open(args.image, "rb") as f:
            image_uri = f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"

    server = None
    if args.spawn:
        if not args.model:
            p.error("--spawn needs -m MODEL")
        from ocula.server.testing import ServerProcess

        serve_args = ["-m", args.model] + (["--mmproj", args.mmproj] if args.mmproj else [])
        serve_args += ["--parallel", str(max(levels))] + [a for extra in args.serve_arg for a in extra.split()]
        server = ServerProcess(serve_args, startup_timeout=300).start()
        args.url = server.url
    try:
        host, port = check_loopback(args.url)
        warm = one_request(host, port, build_body(0, args, image_uri), args.api_key, args.timeout)
        if not warm.ok:
            print(f"load.py: warm-up request failed: {warm.status} {warm.error}", file=sys.stderr)
            return 1
        results = [run_level(host, port, n, args, image_uri).summary() for n in levels]
    finally:
        if server is not None:
            server.stop()

    if args.json:
        print(json.dumps({"url": args.url, "max_tokens": args.max_tokens, "image": args.image, "levels": results}))
        return 0
    head = (f"{'clients':>7} {'ok/req':>8} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} {'ttft50':>7} {'ttft99':>7}"
            f" {'tok/s':>8}")
    print(head)
    for r in results:
        def f(v):
            return "-" if v is None else f"{v:.3f}"

        print(f"{r['clients']:>7} {str(r['ok']) + '/' + str(r['requests']):>8} {r['requests_per_s']:>7.2f} "
              f"{f(r['latency_p50_s']):>7} {f(r['latency_p99_s']):>7} {f(r['ttft_p50_s']):>7} "
              f"{f(r['ttft_p99_s']):>7} {r['tokens_per_s']:>8.1f}")
        for err, n in r["errors"].items():
            print(f"{'':>7} {n} x {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
