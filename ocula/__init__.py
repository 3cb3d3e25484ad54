"""ocula: run llama.cpp GGUF language and vision-language models on PyTorch.

    import ocula
    model = ocula.load("model.gguf", mmproj="mmproj.gguf")
    print(model.chat([{"role": "user", "content": "Hello"}]).text)
"""
from ocula.errors import GGUFError, MediaError, OculaError, RequestError, UnsupportedError

__version__ = "0.1.0"

_LAZY = {
    "load": "ocula.api", "Model": "ocula.api",
    "Result": "ocula.engine.generate", "Chunk": "ocula.engine.generate", "Timings": "ocula.engine.generate",
    "SamplingParams": "ocula.engine.sampling",
}
__all__ = [*_LAZY, "OculaError", "GGUFError", "UnsupportedError", "MediaError", "RequestError"]


def __getattr__(name: str):
    # torch and the model code load on first use, so `ocula inspect` and `--help` stay fast
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ocula' has no attribute {name!r}")
