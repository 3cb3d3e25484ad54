"""Text decoders, one file per family; importing this package registers them all."""
from ocula.models.text import gemma3, llama, qwen2, qwen3  # noqa: F401
from ocula.models.text.base import TEXT_ARCHS, TextConfig, TextModel, build_text_model

__all__ = ["TEXT_ARCHS", "TextConfig", "TextModel", "build_text_model"]
