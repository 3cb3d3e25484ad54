"""Fill a module tree from a GGUF file. Module paths are GGUF tensor names, so loading is a dict walk.

- `QLinear` / `QEmbedding` get the raw blocks (no copy on CPU); so do MoE `ExpertStack`s (3-D tensors).
- A module marked `gguf_transparent` (the MoE feed-forward) adds no part to its children's names.
- Every other parameter or buffer (norms, biases, convolutions, position tables) is dequantized to
  float once: these are small.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ocula.errors import GGUFError
from ocula.gguf import GGUFFile, GGUFTensor
from ocula.models.moe import ExpertStack
from ocula.quant.dequant import dequantize
from ocula.quant.linear import QEmbedding, QLinear, QuantizedWeight, tensor_from_array


def raw_tensor(t: GGUFTensor) -> torch.Tensor:
    return tensor_from_array(t.data)


def float_tensor(t: GGUFTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize(raw_tensor(t), t.qtype, t.shape, dtype=dtype)


def quantized_weight(t: GGUFTensor) -> QuantizedWeight:
    rows = t.shape[0] if len(t.shape) == 2 else int(torch.tensor(t.shape[:-1]).prod())
    return QuantizedWeight(raw_tensor(t), t.qtype, (rows, t.shape[-1]))


def gguf_named_modules(model: nn.Module, prefix: str = ""):
    """(GGUF-style name, module) of `model` and its descendants; transparent modules lend no name part."""
    yield prefix, model
    for name, child in model.named_children():
        if child is None:
            continue
        path = prefix if getattr(child, "gguf_transparent", False) else f"{prefix}.{name}" if prefix else name
        yield from gguf_named_modules(child, path)


def _check_shape(f: GGUFFile, name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(got) != tuple(want):
        raise GGUFError(
            f"{f.path}: tensor {name!r} has shape {tuple(got)} but the model expects {tuple(want)} "
            "(metadata and tensors disagree)"
        )


def load_gguf_weights(
    model: nn.Module,
    f: GGUFFile,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    aliases: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Load every QLinear/QEmbedding weight and float parameter of `model` from `f`.

    `aliases` maps a module's tensor name to the GGUF name to read instead (tied output weights).
    `progress(n_bytes)` is called after each tensor (for a progress bar on big files).
    Raises GGUFError naming the first missing tensor or shape mismatch.
    """
    aliases = aliases or {}
    cache: dict[str, QuantizedWeight] = {}

    def lookup(name: str) -> GGUFTensor:
        return f.tensor(aliases.get(name, name))

    for mod_name, mod in gguf_named_modules(model):
        if isinstance(mod, ExpertStack):
            t = lookup(f"{mod_name}.weight")
            if len(t.shape) != 3:
                raise GGUFError(f"{f.path}: expert tensor {t.name!r} has shape {tuple(t.shape)}; expected 3 "
                                f"dimensions {mod.shape} (experts, rows, columns)")
            _check_shape(f, t.name, t.shape, mod.shape)
            mod.set_weight(quantized_weight(t).to(device))
            if progress:
                progress(t.n_bytes)
        elif isinstance(mod, (QLinear, QEmbedding)):
            name = f"{mod_name}.weight"
            t = lookup(name)
            want = (
                (mod.out_features, mod.in_features)
                if isinstance(mod, QLinear)
                else (mod.num_embeddings, mod.embedding_dim)
            )
            _check_shape(f, t.name, t.shape, want)
            if t.name not in cache:
                cache[t.name] = quantized_weight(t).to(device)
                if progress:
                    progress(t.n_bytes)
            mod.weight = cache[t.name]

    # Non-persistent buffers (rotary tables, masks) are derived, not read from the file.
    for mod_name, mod in gguf_named_modules(model):
        prefix = f"{mod_name}." if mod_name else ""
        tensors = dict(mod._parameters)
        tensors.update(
            (k, v) for k, v in mod._buffers.items() if k not in mod._non_persistent_buffers_set
        )
        for key, param in tensors.items():
            if param is None or not param.is_floating_point():
                continue
            t = lookup(prefix + key)
            _check_shape(f, t.name, t.shape, param.shape)
            value = float_tensor(t, dtype).to(device)
            if progress:
                progress(t.n_bytes)
            if isinstance(param, nn.Parameter):
                mod._parameters[key] = nn.Parameter(value, requires_grad=False)
            else:
                mod._buffers[key] = value
