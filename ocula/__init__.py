"""ocula: run llama.cpp GGUF language and vision-language models on PyTorch.

    import ocula
    model = ocula.load("model.gguf", mmproj="mmproj.gguf")
    print(model.chat([{"role": "user", "content": "Hello"}]).text)
"""
import os

# Idle OpenMP workers spin a while (100k polls), then sleep. Fully passive workers pay a wake-up on each
# of the hundreds of parallel regions a forward runs: on 2 Intel (AMX) cores that cost 25-50%
# (InternVL3-1B bf16: decode 15.6 vs 20.9 tok/s, 128-token prefill 231 vs 350 t/s, a chat turn's
# 26-token prefill 380 vs 200 ms); 30k polls were too few for SmolVLM-256M (40 vs 47 tok/s); unbounded
# spinning (libgomp's ACTIVE) starves other work on a busy machine (~3x slower decode measured on Zen 4).
# Must be set before torch loads libgomp; the user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "100000")

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
