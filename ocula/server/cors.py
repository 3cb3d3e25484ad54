"""CORS for `--cors-origin`: exact origins, '*', and llama-server's `localhost` keyword (any port on
localhost, 127.0.0.1 or [::1]: a web UI served by another local dev server)."""
from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse

LOCAL_ORIGIN = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?"


class CORS(CORSMiddleware):
    def preflight_response(self, request_headers):
        # An origin not on the list gets a plain 200 without Access-Control-Allow-Origin (as llama-server): the
        # browser then refuses the call, and the server says nothing about what it would allow.
        if not self.is_allowed_origin(origin=request_headers["origin"]):
            return PlainTextResponse("OK", status_code=200)
        response = super().preflight_response(request_headers)
        # Header names are case-insensitive, but some clients (llama-server's own tests among them) read them
        # from a plain dict: send the Access-Control-* names in their usual capitalisation.
        response.raw_headers = [(_capitalised(k), v) for k, v in response.raw_headers]
        return response


def _capitalised(name: bytes) -> bytes:
    if not name.startswith(b"access-control-"):
        return name
    return b"-".join(part[:1].upper() + part[1:] for part in name.split(b"-"))


def add_cors(app, origins: list[str]) -> None:
    exact = [o for o in origins if o != "localhost"]
    regex = LOCAL_ORIGIN if "localhost" in origins else None
    app.add_middleware(CORS, allow_origins=exact, allow_origin_regex=regex,
                       allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])
