"""Every error ocula raises on purpose derives from OculaError, so callers can tell bad input from bugs."""


class OculaError(Exception):
    """Base class: the message names the problem and, where there is one, the file or value at fault."""


class GGUFError(OculaError, ValueError):
    """A GGUF file is missing, broken, truncated or does not hold what the model needs."""


class UnsupportedError(OculaError, ValueError):
    """An architecture, projector type or tensor type ocula does not implement."""


class MediaError(OculaError, ValueError):
    """An image that cannot be read, is too large, or is not allowed."""


class RequestError(OculaError, ValueError):
    """A malformed request: bad messages, options out of range, context overflow."""
