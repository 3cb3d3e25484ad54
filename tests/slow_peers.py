"""Scripted slow HTTP peers on 127.0.0.1 for the stall tests: a server that sends its answer one byte at a
time (headers or body), so that no single socket read ever waits long enough to time out."""
from __future__ import annotations

import select
import socket
import threading

PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc0000003"
    "010100c9fe92ef0000000049454e44ae426082"
)


class DripServer:
    """Answers every GET with a valid PNG response, one byte every `interval` seconds: from the status line
    on (`drip="headers"`) or after sending the headers at once (`drip="body"`). Counts its connections."""

    def __init__(self, drip: str = "headers", interval: float = 1.0):
        self.drip, self.interval = drip, interval
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.open = self.most_open = 0  # connections being served now / at most at once
        self._count = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/img.png") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._count:
                self.connections += 1
                self.open += 1
                self.most_open = max(self.most_open, self.open)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        head = (f"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(PNG_1X1)}\r\n"
                "X-Padding: " + "p" * 200 + "\r\n\r\n").encode()
        try:
            conn.recv(65536)
            if self.drip == "body":
                conn.sendall(head)
                dripped = PNG_1X1
            else:
                dripped = head + PNG_1X1
            for i in range(len(dripped)):
                if self._stop.is_set():
                    break
                conn.sendall(dripped[i : i + 1])
                readable, _, _ = select.select([conn], [], [], self.interval)
                if readable and not conn.recv(1):  # the client closed: stop at once (counted as gone)
                    break
        except OSError:  # the client gave up: what a deadline should make it do
            pass
        finally:
            conn.close()
            with self._count:
                self.open -= 1

    def close(self) -> None:
        self._stop.set()
        self.sock.close()

    def __enter__(self) -> "DripServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
