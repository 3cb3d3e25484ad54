"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status."""
from __future__ import annotations

import logging
import re

from ocula.errors import GGUFError, MediaError, OculaError, RequestError, UnsupportedError

log = logging.getLogger("ocula.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_PARAM_RE = re.compile(r"^(messages\[\d+\](?:\.[A-Za-z_]+|\[\d+\])*)")


def _param_from(message: str) -> str | None:
    m = _PARAM_RE.match(message)
    return m.group(1) if m else None


def to_api_error(e: BaseException, param: str | None = None) -> APIError:
    """Map an exception from the engine to the error a client sees (never a traceback)."""
    from ocula.engine.scheduler import Cancelled, ContextOverflowError, QueueFullError, SchedulerStoppedError
    from ocula.engine.multimodal import ImageBudgetError
    from ocula.engine.structured import ConstraintError

    if isinstance(e, APIError):
        return e
    msg = str(e) or type(e).__name__
    if isinstance(e, ContextOverflowError):
        return APIError(400, msg, param=param or "messages", code="context_length_exceeded")
    if isinstance(e, ImageBudgetError):
        return APIError(400, msg, param=param or "messages", code="too_many_image_tokens")
    if isinstance(e, MediaError):
        return APIError(400, f"invalid image: {msg}", param=param, code="invalid_image")
    if isinstance(e, QueueFullError):
        return APIError(503, msg, type="server_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, SchedulerStoppedError):
        return APIError(503, msg, type="server_error", code="unavailable")
    if isinstance(e, Cancelled):
        return APIError(499, "the request was cancelled", code="cancelled")
    if isinstance(e, ConstraintError):
        return APIError(500, msg, type="server_error", code="constraint_failed")
    if isinstance(e, UnsupportedError):
        return APIError(400, msg, param=param, code="unsupported")
    if isinstance(e, (RequestError, GGUFError)):
        return APIError(400, msg, param=param or _param_from(msg), code="invalid_request")
    if isinstance(e, OculaError):
        return APIError(400, msg, param=param, code="invalid_request")
    log.error("internal error", exc_info=e)
    return APIError(500, f"internal error ({type(e).__name__}): {msg}", type="server_error", code="internal_error")
