"""ocula: run llama.cpp GGUF language and vision-language models on PyTorch."""
from ocula.api import Model, load
from ocula.engine.generate import Chunk, Result, Timings
from ocula.engine.sampling import SamplingParams
from ocula.errors import GGUFError, MediaError, OculaError, RequestError, UnsupportedError

__version__ = "0.1.0"
__all__ = [
    "load", "Model", "Result", "Chunk", "Timings", "SamplingParams",
    "OculaError", "GGUFError", "UnsupportedError", "MediaError", "RequestError",
]
