"""Run `python -m ocula serve ...` as a subprocess on a free loopback port (tests, benchmarks).

    with ServerProcess(["-m", "model.gguf"]) as server:
        httpx.get(server.url + "/health")

Only ever binds and talks to 127.0.0.1.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], *, startup_timeout: float = 60.0, log_level: str = "warning",
                 env: dict | None = None, port: int | None = None):
        self.args = list(args)
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "ocula", "serve", *self.args, "--host", HOST, "--port", str(self.port),
               "--log-level", self.log_level]
        self._log = tempfile.TemporaryFile(mode="w+b")
        env = dict(os.environ, **(self.env or {}))
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ocula serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"ocula serve did not become healthy in {self.startup_timeout} s:\n{self.output()}")

    def output(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", errors="replace")[-20000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
