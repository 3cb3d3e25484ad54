"""Linear and embedding layers whose weights stay in their GGUF block format.

A `QuantizedWeight` holds the raw bytes of one GGUF tensor (a zero-copy view of the memory map on
CPU). The matmul reads those blocks through a kernel (ocula.quant.kernels): each `QLinear` gets one
at load time from (qtype, device, dtype, mode) via `use_kernels`; a layer not configured so uses
the module-wide `linear_kernel` (by default `default_linear`, which picks the same way per call).
`tiled_linear` is the reference: dequantize row tiles with torch, then GEMM; the resident float
copy is never larger than one tile.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from typing import Callable

import numpy as np
import torch
from torch import nn

from ocula.quant import kernels
from ocula.quant.dequant import dequantize, row_bytes

F32, F16, BF16 = 0, 1, 30
FLOAT_TYPES = frozenset({F32, F16, BF16})
TILE_BYTES = 32 * 1024 * 1024  # float elements dequantized at once, in bytes of the compute dtype


def tensor_from_array(array: np.ndarray) -> torch.Tensor:
    """Zero-copy torch view of a (read-only) memory-mapped numpy array."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the memory map is read-only; we never write it
        return torch.from_numpy(array)


class QuantizedWeight:
    """Raw GGUF tensor bytes for a 2-D weight of logical shape (rows, cols)."""

    def __init__(self, data: torch.Tensor, qtype: int, shape: tuple[int, int]):
        rows, cols = shape
        if data.dtype != torch.uint8:
            data = data.contiguous().view(torch.uint8)
        self.data = data.reshape(rows, row_bytes(qtype, cols))
        self.qtype = int(qtype)
        self.shape = (int(rows), int(cols))
        self.cache: dict = {}  # per-weight kernel state: chosen kernels, ggml graphs

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        if self.data.device == torch.device(device):
            return self
        return QuantizedWeight(self.data.to(device), self.qtype, self.shape)

    def rows(self, index: torch.Tensor | slice, dtype: torch.dtype) -> torch.Tensor:
        """Dequantize the selected rows (a slice or an index tensor)."""
        raw = self.data[index]
        return dequantize(raw, self.qtype, (raw.shape[0], self.shape[1]), dtype=dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.rows(slice(None), dtype)

    def tile_rows(self, dtype: torch.dtype) -> int:
        return max(1, TILE_BYTES // (self.shape[1] * torch.finfo(dtype).bits // 8))


def tiled_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T (+ bias), dequantizing W one row tile at a time (in kernels.gemm_dtype(x), rounded back)."""
    if kernels.gemm_dtype(x) != x.dtype:
        return tiled_linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)
    step = w.tile_rows(x.dtype)
    if step >= w.shape[0]:
        return nn.functional.linear(x, w.dequantize(x.dtype), bias)
    out = torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, w.shape[0], step):
        stop = min(start + step, w.shape[0])
        b = None if bias is None else bias[start:stop]
        out[..., start:stop] = nn.functional.linear(x, w.rows(slice(start, stop), x.dtype), b)
    return out


LinearKernel = Callable[[torch.Tensor, QuantizedWeight, "torch.Tensor | None"], torch.Tensor]
# kernel mode of layers `use_kernels` did not configure (see ocula.quant.kernels)
DEFAULT_MODE = os.environ.get("OCULA_KERNELS", "auto")


def default_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T (+ bias) with the kernel `kernels.select_kernel` picks for w, x.dtype and DEFAULT_MODE."""
    key = ("kernel", x.dtype, DEFAULT_MODE)
    kernel = w.cache.get(key)
    if kernel is None:
        kernel = w.cache[key] = kernels.select_kernel(w, x.dtype, DEFAULT_MODE)
    return kernel(x, w, bias)


linear_kernel: LinearKernel = default_linear
kernel_epoch = 0  # bumped by every `use_kernels`: whoever caches the layers' kernels rebuilds


# Layers that mode "auto" gives int16 activations ("q16": about bfloat16's rounding of x; exact where
# the CPU has no such kernel) instead of int8. ffn_down multiplies the MLP's gated product, whose heavy
# tails int8 activations round worst: decoding Gemma 3 270M in bf16 along HF's greedy tokens, the
# logits' max error against float32 is 2.3% of their range on average with every layer on int8, 1.4%
# with ffn_down exact (each other layer alone: 2.2-2.5%), for 5-8% of decode speed on AVX-512 VNNI
# CPUs, but ~30% on AVX2 ones, where the int16 kernels exist.
FINE_IN_AUTO = ("ffn_down", "ffn_down_exps", "ffn_down_shexp")


def use_kernels(model: nn.Module, dtype: torch.dtype, mode: str = "auto") -> Counter:
    """Give every loaded QLinear (and MoE expert stack) of `model` its kernel for compute dtype `dtype` and `mode`
    ("auto", "exact", "q8", "q16", "ggml", "torch"); returns how many layers got each backend."""
    global kernel_epoch
    kernels.check_mode(mode)
    kernel_epoch += 1
    chosen: Counter = Counter()
    for path, mod in model.named_modules():
        # QLinear and MoE expert stacks: a QuantizedWeight and a kernel slot
        if isinstance(getattr(mod, "weight", None), QuantizedWeight) and hasattr(mod, "kernel"):
            fine = mode == "auto" and dtype != torch.float32 and path.rsplit(".", 1)[-1] in FINE_IN_AUTO
            layer_mode = "q16" if fine else mode
            name = kernels.weight_kernel_name(mod.weight, dtype, layer_mode)
            mod.kernel = kernels.KERNELS[name]
            chosen[name] += 1
    return chosen


class QLinear(nn.Module):
    """y = x W^T + b with W kept as GGUF blocks. `weight` is filled by the GGUF loader."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: QuantizedWeight | None = None
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.kernel: LinearKernel | None = None  # per-layer override of the module-wide kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError("QLinear used before its GGUF weight was loaded")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        kernel = self.kernel if self.kernel is not None else linear_kernel
        return kernel(x, self.weight, bias)

    def extra_repr(self) -> str:
        qtype = "unloaded" if self.weight is None else _type_name(self.weight.qtype)
        kernel = "" if self.kernel is None else f", kernel={getattr(self.kernel, '__name__', self.kernel)}"
        return f"in={self.in_features}, out={self.out_features}, {qtype}, bias={self.bias is not None}{kernel}"


class QEmbedding(nn.Module):
    """Token embedding table kept as GGUF blocks; only looked-up rows are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight: QuantizedWeight | None = None

    def forward(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        flat = ids.reshape(-1).to(self.weight.data.device)
        return self.weight.rows(flat, dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        qtype = "unloaded" if self.weight is None else _type_name(self.weight.qtype)
        return f"{self.num_embeddings}, {self.embedding_dim}, {qtype}"


def _type_name(qtype: int) -> str:
    import gguf

    return gguf.GGMLQuantizationType(qtype).name
