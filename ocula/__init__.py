"""ocula: run llama.cpp GGUF language and vision-language models on PyTorch.

    import ocula
    model = ocula.load("model.gguf", mmproj="mmproj.gguf")
    print(model.chat([{"role": "user", "content": "Hello"}]).text)
"""
import os

# Idle OpenMP workers sleep instead of spinning: on a busy machine spinning threads starve the ones
# doing work (measured ~3x slower decode at 2 threads). Must be set before torch loads; users may override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
