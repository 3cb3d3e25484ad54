"""Torch dequantizers for the IQ (importance-matrix, lattice-grid) GGUF types.

The lattice grid tables are taken once from ``gguf.quants`` (its decoded class attributes) and
cached as float32 tensors per device. Block layouts mirror ggml's ``block_iq*`` structs.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
from gguf import quants as _gq
from gguf.constants import GGMLQuantizationType as QT

from ocula.quant.dequant import IQ4_VALUES, f16_field, lookup, nibbles, split_bits, uint_field

Tensor = torch.Tensor

_IQ1_DELTA = 0.125


def _ksigns() -> tuple[int, ...]:
    """7 stored sign bits plus an implied 8th making the count of negatives even."""
    return tuple(k | ((bin(k).count("1") & 1) << 7) for k in range(128))


_KSIGNS = _ksigns()


@lru_cache(maxsize=None)
def _cpu_grid(qtype: int) -> Tensor:
    cls = {QT.IQ2_XXS: _gq.IQ2_XXS, QT.IQ2_XS: _gq.IQ2_XS, QT.IQ2_S: _gq.IQ2_S,
           QT.IQ3_XXS: _gq.IQ3_XXS, QT.IQ3_S: _gq.IQ3_S, QT.IQ1_S: _gq.IQ1_S}[qtype]
    cls.init_grid()
    rows, cols = cls.grid_shape
    return torch.from_numpy(cls.grid.reshape(rows, cols).astype("float32", copy=True))


@lru_cache(maxsize=None)
def _device_grid(qtype: int, device: torch.device) -> Tensor:
    return _cpu_grid(qtype).to(device)


def _grid(qtype: int, idx: Tensor) -> Tensor:
    """Rows ``idx`` of the lattice grid of ``qtype``: shape ``[*idx.shape, grid_width]``."""
    return _device_grid(qtype, idx.device)[idx.long()]


def _signs(bits: Tensor) -> Tensor:
    """Sign bytes -> ``[..., 8]`` float32 of +1 (bit clear) / -1 (bit set)."""
    return 1 - 2 * split_bits(bits, 1, 8, dim=-1).float()


def _half_scales(b: Tensor) -> Tensor:
    """4-bit scales packed two per byte, low nibble first: ``[n, k]`` -> ``[n, 2k]`` float32."""
    return nibbles(b, dim=-1).reshape(b.shape[0], -1).float()


# ---------------------------------------------------------------------------------------------
# 2-bit grids
# ---------------------------------------------------------------------------------------------

def _iq2_xxs(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = f16_field(b[:, :2])
    qs = b[:, 2:66].reshape(n, 8, 8)  # per 32 elements: 4 grid bytes, then a u32 of signs+scale
    aux = uint_field(qs[..., 4:8])
    db = (d * (0.5 + (aux >> 28).float()) * 0.25).reshape(n, 8, 1, 1)
    signs = _signs(lookup(_KSIGNS, split_bits(aux, 7, 4, dim=-1), torch.uint8))  # [n, 8, 4, 8]
    grid = _grid(QT.IQ2_XXS, qs[..., :4])  # [n, 8, 4, 8]
    return (db * grid * signs).reshape(n, 256)


def _iq2_xs(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = f16_field(b[:, :2])
    qs = uint_field(b[:, 2:66].reshape(n, 32, 2))  # 9-bit grid index, 7-bit sign index
    db = (d * (0.5 + _half_scales(b[:, 66:74])) * 0.25).reshape(n, 16, 1, 1)
    signs = _signs(lookup(_KSIGNS, qs >> 9, torch.uint8)).reshape(n, 16, 2, 8)
    grid = _grid(QT.IQ2_XS, qs & 511).reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, 256)


def _iq2_s(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = f16_field(b[:, :2])
    qs, sign_bits, qh = b[:, 2:34], b[:, 34:66], b[:, 66:74]
    db = (d * (0.5 + _half_scales(b[:, 74:82])) * 0.25).reshape(n, 16, 1, 1)
    signs = _signs(sign_bits).reshape(n, 16, 2, 8)
    idx = qs.long() | (split_bits(qh, 2, 4, dim=-1).reshape(n, 32).long() << 8)
    grid = _grid(QT.IQ2_S, idx).reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, 256)


# ---------------------------------------------------------------------------------------------
# 3-bit grids
# ---------------------------------------------------------------------------------------------

def _iq3_xxs(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = f16_field(b[:, :2])
    qs = b[:, 2:66]
    aux = uint_field(b[:, 66:98].reshape(n, 8, 4))
    db = (d * (0.5 + (aux >> 28).float()) * 0.5).reshape(n, 8, 1, 1)
    signs = _signs(lookup(_KSIGNS, split_bits(aux, 7, 4, dim=-1), torch.uint8))  # [n, 8, 4, 8]
    grid = _grid(QT.IQ3_XXS, qs).reshape(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, 256)


def _iq3_s(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = f16_field(b[:, :2])
    qs, qh, sign_bits = b[:, 2:66], b[:, 66:74], b[:, 74:106]
    db = (d * (1 + 2 * _half_scales(b[:, 106:110]))).reshape(n, 8, 1, 1)
    signs = _signs(sign_bits).reshape(n, 8, 4, 8)
    idx = qs.long() | (split_bits(qh, 1, 8, dim=-1).reshape(n, 64).long() << 8)
    grid = _grid(QT.IQ3_S, idx).reshape(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, 256)


# ---------------------------------------------------------------------------------------------
# 1-bit grids
# ---------------------------------------------------------------------------------------------

def _iq1_s(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = f16_field(b[:, :2])
    qs = b[:, 2:34]
    qh = uint_field(b[:, 34:50].reshape(n, 8, 2))
    dl = (d * (2 * ((qh >> 12) & 7) + 1).float()).reshape(n, 8, 1, 1)
    delta = torch.where((qh & 0x8000) != 0, -_IQ1_DELTA, _IQ1_DELTA).reshape(n, 8, 1, 1)
    idx = qs.long() | (split_bits(qh, 3, 4, dim=-1).reshape(n, 32) << 8)
    grid = _grid(QT.IQ1_S, idx).reshape(n, 8, 4, 8)
    return (dl * (grid + delta)).reshape(n, 256)


def _iq1_m(b: Tensor) -> Tensor:
    n = b.shape[0]
    qs, qh = b[:, :32], b[:, 32:48]
    sc = uint_field(b[:, 48:56].reshape(n, 4, 2))  # [n, 4] u16
    # The f16 super-block scale is spread over the top nibbles of the four u16 scale words.
    d_bits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0x00F0) | ((sc[:, 2] >> 4) & 0x0F00) | (sc[:, 3] & 0xF000)
    d = f16_field(torch.stack((d_bits & 0xFF, d_bits >> 8), dim=-1).to(torch.uint8))  # [n, 1]
    scales = split_bits(sc, 3, 4, dim=-1).reshape(n, 16)
    dl = (d * (2 * scales + 1).float()).reshape(n, 8, 2, 1, 1)
    halves = nibbles(qh, dim=-1).reshape(n, 32)
    idx = qs.long() | ((halves & 7).long() << 8)
    delta = torch.where((halves & 8) != 0, -_IQ1_DELTA, _IQ1_DELTA).reshape(n, 8, 2, 2, 1)
    grid = _grid(QT.IQ1_S, idx).reshape(n, 8, 2, 2, 8)
    return (dl * (grid + delta)).reshape(n, 256)


# ---------------------------------------------------------------------------------------------
# Non-linear 4-bit
# ---------------------------------------------------------------------------------------------

def _iq4_xs(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = f16_field(b[:, :2])
    high = split_bits(uint_field(b[:, 2:4]), 2, 8, dim=-1)  # [n, 8]
    low = nibbles(b[:, 4:8], dim=-1).reshape(n, 8)
    scales = (low.long() | (high << 4)).float() - 32
    dl = (d * scales).reshape(n, 8, 1)
    q = lookup(IQ4_VALUES, nibbles(b[:, 8:].reshape(n, 8, 16)).reshape(n, 8, 32))
    return (dl * q).reshape(n, 256)


IQ_DEQUANTIZERS: dict[int, Callable[[Tensor], Tensor]] = {
    QT.IQ2_XXS: _iq2_xxs, QT.IQ2_XS: _iq2_xs, QT.IQ2_S: _iq2_s,
    QT.IQ3_XXS: _iq3_xxs, QT.IQ3_S: _iq3_s,
    QT.IQ1_S: _iq1_s, QT.IQ1_M: _iq1_m, QT.IQ4_XS: _iq4_xs,
}
