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


def _keep_freed_memory() -> bool:
    """glibc malloc: serve blocks up to 32 MiB from the heap and keep freed heap memory (up to 1 GiB at
    its top) for reuse, instead of mapping and unmapping an activation buffer per op. Each new mapping
    is page faults on first touch: on 2 Zen 5 cores InternVL3-1B's bf16 pp512 went from 500-590 to
    775-810 t/s with this and its peak RSS from 779-794 to 746-750 MiB (blocks are reused, not mapped
    anew); Qwen2.5-VL-3B's from 91-99 to 102-114 t/s. The user's MALLOC_* settings win. Returns
    whether it applied (not glibc: nothing to do)."""
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "OCULA_NO_MALLOC_TUNING")):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


MALLOC_TUNED = _keep_freed_memory()

from ocula.errors import GGUFError, MediaError, OculaError, RequestError, UnsupportedError  # noqa: E402

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
