"""Fetching an image over http(s) safely: every resolved address checked, connections pinned to a checked
address, redirects followed by hand and re-checked, no proxies, a byte cap and a total deadline.

The deadline (`policy.url_timeout`) covers the whole fetch: name resolution, connect, TLS, headers, body and
every redirect. Socket timeouts alone cannot give that (they bound one operation, and a peer sending one byte
a second never lets a read time out), so a `_Deadline` shuts the fetch's sockets down when the time is up,
which ends whatever read or handshake is blocked on them."""
from __future__ import annotations

import http.client
import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from ocula.media.policy import MediaPolicy, fail, short

_CHUNK = 64 * 1024
_REDIRECT_CODES = (301, 302, 303, 307, 308)


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


class _Deadline:
    """One fetch's total time: its sockets are shut down when it passes (a daemon timer thread)."""

    def __init__(self, seconds: float, shown: float):
        self.seconds = shown  # the budget named in the error (a caller may have spent part of it already)
        self.at = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()

    def error(self, url: str):
        return fail("URL", f"timed out after {self.seconds:g} s (the whole fetch: connect, headers and body): "
                           f"{short(url)}")


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected yet, or already closed
        pass


def _getaddrinfo(host: str, port: int, deadline: _Deadline, url: str) -> list[tuple]:
    """getaddrinfo within the deadline (it cannot be interrupted: a slow resolver is left to finish alone)."""
    box: dict = {}

    def resolve():
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e

    worker = threading.Thread(target=resolve, name="ocula-resolve", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline.remaining()))
    if worker.is_alive():
        raise deadline.error(url)
    if "error" in box:
        raise box["error"]
    return box["infos"]


def _resolve(host: str, port: int, policy: MediaPolicy, url: str, deadline: _Deadline) -> list[tuple]:
    """Resolve ``host`` and check every address; return getaddrinfo entries to connect to."""
    kind = "URL"
    bare = host.strip("[]").rstrip(".").lower()
    if not policy.allow_private_urls and (bare == "localhost" or bare.endswith(".localhost")):
        raise fail(kind, f"host {host!r} is a loopback name, refused by the media policy: {short(url)}")
    try:
        literal = ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        literal = None
    if literal is not None:
        family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
        infos = [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (bare, port))]
    else:
        try:
            infos = _getaddrinfo(bare, port, deadline, url)
        except (socket.gaierror, UnicodeError, OSError) as e:
            raise fail(kind, f"cannot resolve host {host!r}: {e}") from None
        if not infos:
            raise fail(kind, f"host {host!r} resolves to no address")
    if not policy.allow_private_urls or not policy.allow_link_local_urls:
        for info in infos:
            addr = info[4][0]
            try:
                ip = ipaddress.ip_address(addr.split("%", 1)[0])
            except ValueError:
                raise fail(kind, f"host {host!r} resolves to an unparsable address {addr!r}") from None
            problem = _address_problem(ip)
            if problem is None:
                continue
            if not policy.allow_private_urls:
                raise fail(kind, f"host {host!r} resolves to {addr}, {problem}, refused by the media policy "
                                 f"(allow_private_urls=False): {short(url)}")
            if problem == "a link-local address":  # the cloud metadata range: its own switch
                raise fail(kind, f"host {host!r} resolves to {addr}, {problem}, refused by the media policy "
                                 f"even with private addresses allowed (allow_link_local_urls=False): {short(url)}")
    return infos


def _pinned_connect(conn, infos, deadline: _Deadline) -> None:
    error: OSError | None = None
    for family, socktype, proto, _, sockaddr in infos:
        sock = socket.socket(family, socktype, proto)
        deadline.watch(sock)
        try:
            sock.settimeout(max(0.001, min(conn.timeout, deadline.remaining())))
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sock = sock
            return
        except OSError as e:
            error = e
            sock.close()
    raise error or OSError("no address to connect to")


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, infos, deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._infos, self._deadline = infos, deadline

    def connect(self):
        _pinned_connect(self, self._infos, self._deadline)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, infos, deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._infos, self._deadline = infos, deadline

    def connect(self):
        _pinned_connect(self, self._infos, self._deadline)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


class _PinnedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, infos, deadline):
        super().__init__()
        self._infos, self._deadline = infos, deadline

    def http_open(self, req):
        infos, deadline = self._infos, self._deadline
        return self.do_open(lambda host, **kw: _PinnedHTTPConnection(host, infos=infos, deadline=deadline, **kw),
                            req)


class _PinnedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, infos, deadline):
        super().__init__()
        self._infos, self._deadline = infos, deadline

    def https_open(self, req):
        infos, deadline = self._infos, self._deadline
        return self.do_open(lambda host, **kw: _PinnedHTTPSConnection(host, infos=infos, deadline=deadline, **kw),
                            req, context=self._context)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the 30x status; we follow by hand after re-checking


def fetch_url(url: str, policy: MediaPolicy, time_left: float | None = None) -> tuple[bytes, str]:
    """The body of `url` (after redirects) and the URL it finally came from, all within policy.url_timeout
    (or `time_left` seconds, what remains of it when the caller has already waited)."""
    if not policy.allow_urls:
        raise fail("URL", f"URLs are not allowed by the media policy: {short(url)}")
    deadline = _Deadline(policy.url_timeout if time_left is None else time_left, policy.url_timeout)
    try:
        return _fetch(url, policy, deadline)
    finally:
        deadline.cancel()


def _fetch(url: str, policy: MediaPolicy, deadline: _Deadline) -> tuple[bytes, str]:
    kind = "URL"
    redirects = 0
    while True:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise fail(kind, f"scheme {scheme!r} is not allowed (only http and https): {short(url)}")
        if parts.username is not None or parts.password is not None:
            raise fail(kind, f"credentials in URLs are not supported: {short(url.split('@')[-1])}")
        host = parts.hostname
        if not host:
            raise fail(kind, f"no host in {short(url)}")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise fail(kind, f"invalid port in {short(url)}") from None
        infos = _resolve(host, port, policy, url, deadline)
        remaining = deadline.remaining()
        if remaining <= 0:
            raise deadline.error(url)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _PinnedHTTPHandler(infos, deadline),
                                             _PinnedHTTPSHandler(infos, deadline), _NoRedirect())
        req = urllib.request.Request(url, headers={"User-Agent": "ocula", "Accept": "image/*,*/*;q=0.5"})
        try:
            resp = opener.open(req, timeout=remaining)
        except urllib.error.HTTPError as e:
            location = e.headers.get("Location") if e.headers is not None else None
            e.close()
            if e.code in _REDIRECT_CODES and location:
                redirects += 1
                if redirects > policy.max_redirects:
                    raise fail(kind, f"too many redirects (more than {policy.max_redirects}): {short(url)}") \
                        from None
                url = urllib.parse.urljoin(url, location.strip())
                continue
            raise fail(kind, f"HTTP error {e.code} {e.reason}: {short(url)}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            if deadline.expired or _is_timeout(e):
                raise deadline.error(url) from None
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise fail(kind, f"cannot fetch {short(url)}: {reason}") from None
        with resp:
            data = _read_capped(resp, policy, deadline, url)
        return data, url


def _is_timeout(e: BaseException) -> bool:
    reason = getattr(e, "reason", e)
    return isinstance(reason, (socket.timeout, TimeoutError)) or isinstance(e, (socket.timeout, TimeoutError))


def _read_capped(resp, policy: MediaPolicy, deadline: _Deadline, url: str) -> bytes:
    kind = "URL"
    length = resp.headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > policy.max_bytes:
        raise fail(kind, f"too many bytes: Content-Length {int(length)} > max_bytes {policy.max_bytes}: "
                         f"{short(url)}")
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            remaining = deadline.remaining()
            if remaining <= 0 or deadline.expired:
                raise deadline.error(url)
            sock = getattr(getattr(resp, "fp", None), "raw", None)
            sock = getattr(sock, "_sock", None)
            if sock is not None:
                sock.settimeout(remaining)
            chunk = resp.read1(min(_CHUNK, policy.max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > policy.max_bytes:
                raise fail(kind, f"too many bytes: more than max_bytes {policy.max_bytes}: {short(url)}")
    except (OSError, http.client.HTTPException) as e:
        if deadline.expired or _is_timeout(e):
            raise deadline.error(url) from None
        raise fail(kind, f"error while reading {short(url)}: {e}") from None
    if deadline.expired:  # the shutdown ended the body early: what came is cut off
        raise deadline.error(url)
    return b"".join(chunks)
