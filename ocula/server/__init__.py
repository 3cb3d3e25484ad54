"""OpenAI-compatible HTTP server (`ocula serve`): FastAPI routes over the continuous-batching scheduler.

    from ocula.server import ServerConfig, create_app
    app = create_app(ocula.load("model.gguf", mmproj="mmproj.gguf"), ServerConfig())

Needs the `server` extra: pip install 'ocula[server]'.
"""
from ocula.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from ocula.server.app import create_app

        return create_app
    raise AttributeError(f"module 'ocula.server' has no attribute {name!r}")
