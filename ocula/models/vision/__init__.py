"""Vision encoders + projectors, one file per family, looked up by `clip.projector_type`."""
from __future__ import annotations

import importlib
import os

import torch

from ocula.errors import GGUFError, UnsupportedError
from ocula.gguf import GGUFFile
from ocula.models.vision.base import PROJECTORS, ImageOptions, ProcessedImage, VisionConfig, VisionModel, read_vision_config
from ocula.models.weights import load_gguf_weights

FAMILY_MODULES = ("qwen_vl", "gemma3", "internvl", "idefics3", "llava")

__all__ = ["PROJECTORS", "ImageOptions", "ProcessedImage", "VisionConfig", "VisionModel", "build_vision_model"]


def _import_families() -> None:
    for name in FAMILY_MODULES:
        try:
            importlib.import_module(f"ocula.models.vision.{name}")
        except ModuleNotFoundError as e:  # a family file not written yet must not break the others
            if e.name != f"ocula.models.vision.{name}":
                raise


def build_vision_model(path: str | os.PathLike, text_n_embd: int, *, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> VisionModel:
    """Open an mmproj GGUF, check it fits a text model of width `text_n_embd`, and load it."""
    f = GGUFFile(path)
    arch = f.get("general.architecture")
    if arch != "clip":
        raise GGUFError(
            f"{f.path}: expected an mmproj (general.architecture 'clip') but found {arch!r}; "
            "pass the text model as the model and the mmproj file as mmproj"
        )
    if f.get("clip.has_vision_encoder") is False:
        raise UnsupportedError(f"{f.path}: this mmproj has no vision encoder (audio-only projectors are not supported)")
    cfg = read_vision_config(f)
    _import_families()
    if cfg.projector_type not in PROJECTORS:
        raise UnsupportedError(
            f"{f.path}: projector type {cfg.projector_type!r} is not supported; "
            f"supported: {', '.join(sorted(PROJECTORS))}"
        )
    model = PROJECTORS[cfg.projector_type](cfg, f)
    if model.output_dim != text_n_embd:
        raise GGUFError(
            f"mmproj {f.path.name} projects images to width {model.output_dim} but the text model's "
            f"embedding width is {text_n_embd}: this mmproj belongs to a different model"
        )
    load_gguf_weights(model, f, dtype=dtype, device=device, aliases=model.weight_aliases())
    model.eval()
    model.gguf = f
    return model
