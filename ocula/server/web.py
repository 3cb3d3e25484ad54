"""The chat page `ocula serve` answers at `/`: plain HTML, CSS and JavaScript modules shipped inside the
package (ocula/server/web/), no build step and no CDN, so it works on an offline machine.

The files are public (the page asks for the API key itself); the API routes keep their auth. A strict
Content-Security-Policy (scripts only from this server, no inline script) is a second wall behind the
page's own escaping of model output.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

from ocula.server.errors import APIError

WEB_DIR = Path(__file__).with_name("web")
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def page_files() -> dict[str, Path]:
    """The page's files by name: only these are ever served (no path from the URL reaches the file system)."""
    if not WEB_DIR.is_dir():
        return {}
    return {p.name: p for p in WEB_DIR.iterdir() if p.is_file() and p.suffix in MEDIA_TYPES}


def add_web_routes(app: FastAPI) -> None:
    files = page_files()

    def serve(name: str) -> Response:
        path = files.get(name)
        if path is None:
            if name == "index.html":
                raise APIError(404, f"the chat page's files are not installed ({WEB_DIR} is missing or empty); "
                                    "reinstall ocula", code="not_found")
            raise APIError(404, f"no page file {name!r}", code="not_found")
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                   "Content-Security-Policy": CONTENT_SECURITY_POLICY, "Referrer-Policy": "no-referrer"}
        return Response(path.read_bytes(), media_type=MEDIA_TYPES[path.suffix], headers=headers)

    @app.get("/", include_in_schema=False)
    async def index():
        return serve("index.html")

    @app.get("/web/{name}", include_in_schema=False)
    async def asset(name: str):
        return serve(name)


def page_url(host: str, port: int) -> str:
    """The address to print for the page: a wildcard listen address is reachable here through loopback."""
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"
