"""Vectorised torch dequantizers for GGUF tensor types.

Every quantized type is decoded from a ``[n_blocks, bytes_per_block]`` uint8 view with integer bit
operations and float32 arithmetic (then cast), so the same code runs on CPU and CUDA tensors. The
arithmetic follows the reference order of ``gguf.quants`` so results agree with it bit for bit (or
within one float32 ulp where an operation legitimately rounds).

The IQ (importance-matrix grid) family lives in :mod:`ocula.quant.dequant_iq`.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from ocula.errors import GGUFError, UnsupportedError

__all__ = ["dequantize", "block_info", "row_bytes", "SUPPORTED_TYPES", "UnsupportedError"]

Tensor = torch.Tensor

# Decoded elements per chunk: bounds the peak memory of the integer intermediates for big tensors.
_CHUNK_ELEMS = 1 << 22


# ---------------------------------------------------------------------------------------------
# Byte-field helpers (shared with dequant_iq)
# ---------------------------------------------------------------------------------------------

def f16_field(b: Tensor) -> Tensor:
    """``[..., 2k]`` uint8 holding k little-endian f16 values -> ``[..., k]`` float32."""
    return b.contiguous().view(torch.float16).float()


def uint_field(b: Tensor) -> Tensor:
    """``[..., k]`` uint8 (k <= 4) holding one little-endian unsigned integer -> ``[...]`` int64."""
    b = b.long()
    out = b[..., 0]
    for i in range(1, b.shape[-1]):
        out = out | (b[..., i] << (8 * i))
    return out


def split_bits(x: Tensor, width: int, count: int, dim: int = -2) -> Tensor:
    """Unpack ``count`` fields of ``width`` bits (lowest first) from each element of ``x``.

    The new axis of size ``count`` is inserted at ``dim`` (default: before the last axis).
    """
    mask = (1 << width) - 1
    return torch.stack([(x >> (width * i)) & mask for i in range(count)], dim=dim)


def nibbles(x: Tensor, dim: int = -2) -> Tensor:
    """Low nibbles then high nibbles of uint8 ``x``, stacked on a new axis at ``dim``."""
    return torch.stack((x & 0x0F, x >> 4), dim=dim)


@lru_cache(maxsize=None)
def _table(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def lookup(values: tuple[float, ...], idx: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``values[idx]`` as ``dtype``, with ``values`` cached as a tensor per (device, dtype)."""
    return _table(values, idx.device, dtype)[idx.long()]


# ---------------------------------------------------------------------------------------------
# Legacy block types (32 elements per block)
# ---------------------------------------------------------------------------------------------

def _q4_0(b: Tensor) -> Tensor:
    d = f16_field(b[:, :2])
    q = nibbles(b[:, 2:]).reshape(b.shape[0], 32).float() - 8
    return d * q


def _q4_1(b: Tensor) -> Tensor:
    d, m = f16_field(b[:, :2]), f16_field(b[:, 2:4])
    q = nibbles(b[:, 4:]).reshape(b.shape[0], 32).float()
    return d * q + m


def _five_bit(qh: Tensor, qs: Tensor) -> Tensor:
    """32 five-bit values: low nibbles from ``qs`` [n, 16], bit 4 from the u32 ``qh`` bytes [n, 4]."""
    shifts = torch.arange(32, device=qs.device)
    high = (uint_field(qh)[:, None] >> shifts) & 1
    return nibbles(qs).reshape(qs.shape[0], 32).long() | (high << 4)


def _q5_0(b: Tensor) -> Tensor:
    d = f16_field(b[:, :2])
    return d * (_five_bit(b[:, 2:6], b[:, 6:]).float() - 16)


def _q5_1(b: Tensor) -> Tensor:
    d, m = f16_field(b[:, :2]), f16_field(b[:, 2:4])
    return d * _five_bit(b[:, 4:8], b[:, 8:]).float() + m


def _q8_0(b: Tensor) -> Tensor:
    return f16_field(b[:, :2]) * b[:, 2:].view(torch.int8).float()


# ---------------------------------------------------------------------------------------------
# K-quants (256-element super-blocks)
# ---------------------------------------------------------------------------------------------

def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, qs = b[:, :16], b[:, 16:80]
    d, dmin = f16_field(b[:, 80:82]), f16_field(b[:, 82:84])
    dl = (d * (sc & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (sc >> 4).float()).reshape(n, 16, 1)
    q = split_bits(qs.reshape(n, 2, 32), 2, 4).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, 256)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, sc = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = f16_field(b[:, 108:110])
    low = nibbles(sc[:, :8]).reshape(n, 16)
    high = split_bits(sc[:, 8:12], 2, 4).reshape(n, 16)
    scales = (low | (high << 4)).float() - 32
    dl = (d * scales).reshape(n, 16, 1)
    ql = split_bits(qs.reshape(n, 2, 32), 2, 4).reshape(n, 16, 16)
    qh = split_bits(hmask, 1, 8).reshape(n, 16, 16)
    q = ql.float() - 4 * (1 - qh).float()  # a clear hmask bit subtracts 4
    return (dl * q).reshape(n, 256)


def _scale_min_k4(sc: Tensor) -> tuple[Tensor, Tensor]:
    """Unpack the 12-byte Q4_K/Q5_K field into eight 6-bit scales and eight 6-bit mins."""
    s = sc.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scales = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return scales, mins


def _k4_scales(b: Tensor) -> tuple[Tensor, Tensor]:
    """Per-32-element scale and offset ``[n, 8, 1]`` of a Q4_K/Q5_K block."""
    d, dmin = f16_field(b[:, :2]), f16_field(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    return (d * sc.float()).unsqueeze(-1), (dmin * mn.float()).unsqueeze(-1)


def _q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scale, offset = _k4_scales(b)
    q = nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return (scale * q - offset).reshape(n, 256)


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scale, offset = _k4_scales(b)
    qh = split_bits(b[:, 16:48], 1, 8)  # [n, 8, 32]
    ql = nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (scale * q - offset).reshape(n, 256)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql, qh, sc = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = f16_field(b[:, 208:210])
    dl = (d * sc.view(torch.int8).float()).reshape(n, 16, 1)
    low = nibbles(ql.reshape(n, 2, 64)).reshape(n, 8, 32)
    high = split_bits(qh.reshape(n, 2, 32), 2, 4).reshape(n, 8, 32)
    q = (low | (high << 4)).float().reshape(n, 16, 16) - 32
    return (dl * q).reshape(n, 256)


# ---------------------------------------------------------------------------------------------
# Ternary types
# ---------------------------------------------------------------------------------------------

def _base3_digits(x: Tensor, count: int) -> Tensor:
    """TQ1_0 packing: byte ``x`` holds ``count`` trits as a fixed-point fraction of 3**5."""
    x = x.int()
    powers = [3 ** i for i in range(count)]
    digits = torch.stack([(x * p) & 0xFF for p in powers], dim=-2)  # uint8 wrap-around
    return (digits * 3) >> 8


def _tq1_0(b: Tensor) -> Tensor:
    n = b.shape[0]
    qs, qh = b[:, :48], b[:, 48:52]
    d = f16_field(b[:, 52:54])
    q = torch.cat((_base3_digits(qs[:, :32], 5).reshape(n, 160),
                   _base3_digits(qs[:, 32:], 5).reshape(n, 80),
                   _base3_digits(qh, 4).reshape(n, 16)), dim=-1)
    return d * (q.float() - 1)


def _tq2_0(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = f16_field(b[:, 64:66])
    q = split_bits(b[:, :64].reshape(n, 2, 32), 2, 4).reshape(n, 256)
    return d * (q.float() - 1)


# ---------------------------------------------------------------------------------------------
# FP4 micro-scaling types
# ---------------------------------------------------------------------------------------------

_E2M1_X2 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # E2M1 values, doubled


def _e8m0_half(e: Tensor) -> Tensor:
    """E8M0 exponent byte -> 2**(e - 127) / 2 as float32 (ggml_e8m0_to_fp32_half)."""
    e = e.int()
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    return bits.view(torch.float32)


def _ue4m3_half_values() -> tuple[float, ...]:
    """All 256 unsigned E4M3 (bias 7) codes decoded and halved; 0x00 and 0x7F decode to 0."""
    out = []
    for x in range(256):
        exp, man = (x >> 3) & 0x0F, x & 0x07
        v = man * 2.0 ** -9 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
        out.append(0.0 if x in (0x00, 0x7F) else v * 0.5)
    return tuple(out)


_UE4M3_HALF = _ue4m3_half_values()


def _mxfp4(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = _e8m0_half(b[:, :1])
    q = lookup(_E2M1_X2, nibbles(b[:, 1:]).reshape(n, 32))
    return d * q


def _nvfp4(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = lookup(_UE4M3_HALF, b[:, :4]).reshape(n, 4, 1)
    q = lookup(_E2M1_X2, nibbles(b[:, 4:].reshape(n, 4, 8), dim=-2).reshape(n, 4, 16))
    return (d * q).reshape(n, 64)


IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # also IQ4_XS


def _iq4_nl(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = f16_field(b[:, :2])
    return d * lookup(IQ4_VALUES, nibbles(b[:, 2:]).reshape(n, 32))


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

_PLAIN: dict[int, torch.dtype] = {
    QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16, QT.F64: torch.float64,
    QT.I8: torch.int8, QT.I16: torch.int16, QT.I32: torch.int32, QT.I64: torch.int64,
}

_BLOCK_DEQUANT: dict[int, Callable[[Tensor], Tensor]] = {
    QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q5_0: _q5_0, QT.Q5_1: _q5_1, QT.Q8_0: _q8_0,
    QT.Q2_K: _q2_k, QT.Q3_K: _q3_k, QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k,
    QT.TQ1_0: _tq1_0, QT.TQ2_0: _tq2_0, QT.MXFP4: _mxfp4, QT.NVFP4: _nvfp4, QT.IQ4_NL: _iq4_nl,
}

# Decoded by ocula.quant.dequant_iq, imported on first use (it builds grid tables).
_IQ_TYPES = frozenset({QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S,
                       QT.IQ1_S, QT.IQ1_M, QT.IQ4_XS})

SUPPORTED_TYPES: frozenset[int] = frozenset(int(t) for t in (*_PLAIN, *_BLOCK_DEQUANT, *_IQ_TYPES))


def _type_name(qtype) -> str:
    try:
        return QT(int(qtype)).name
    except (ValueError, TypeError):
        return repr(qtype)


def _unsupported(qtype) -> UnsupportedError:
    return UnsupportedError(f"tensor type {_type_name(qtype)} ({int(qtype)}) is not supported by ocula; "
                            f"supported: {', '.join(sorted(_type_name(t) for t in SUPPORTED_TYPES))}")


def block_info(qtype) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGUF tensor type.

    Known for every type gguf knows, including ones :func:`dequantize` cannot decode (check
    ``SUPPORTED_TYPES`` for that); raises UnsupportedError for unknown type ids.
    """
    try:
        return GGML_QUANT_SIZES[QT(int(qtype))]
    except (ValueError, KeyError):
        raise UnsupportedError(f"unknown GGUF tensor type {qtype!r}") from None


def row_bytes(qtype, n_cols: int) -> int:
    """Bytes of one row of ``n_cols`` elements; ``n_cols`` must be a multiple of the block size."""
    block, size = block_info(qtype)
    if n_cols % block:
        raise GGUFError(f"row of {n_cols} elements is not a multiple of the "
                        f"{_type_name(qtype)} block size {block}")
    return n_cols // block * size


def _block_fn(qtype: int) -> Callable[[Tensor], Tensor]:
    if qtype in _BLOCK_DEQUANT:
        return _BLOCK_DEQUANT[qtype]
    if qtype in _IQ_TYPES:
        from ocula.quant.dequant_iq import IQ_DEQUANTIZERS  # noqa: PLC0415 - lazy: builds grids
        return IQ_DEQUANTIZERS[qtype]
    raise _unsupported(qtype)


def _as_bytes(data: Tensor) -> Tensor:
    if data.dtype != torch.uint8:
        data = data.contiguous().view(torch.uint8)
    return data.reshape(-1)


def dequantize(data: Tensor, qtype, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Decode GGUF tensor data to a ``shape`` tensor of ``dtype`` on ``data``'s device.

    data: uint8 tensor of raw GGUF bytes (any shape, contiguous); for plain types (F32, F16, BF16,
    F64, I8..I64) it may instead already have that element type. qtype: GGMLQuantizationType value.
    shape: logical shape in torch order (last dim = elements per row). For plain types whose element
    type equals ``dtype`` the result may share memory with ``data``.
    """
    qt = int(qtype)
    shape = tuple(int(s) for s in shape)
    n_elems = math.prod(shape)
    if qt in _PLAIN:
        flat = data.reshape(-1) if data.dtype == _PLAIN[qt] else _as_bytes(data).view(_PLAIN[qt])
        if flat.numel() != n_elems:
            raise GGUFError(f"{_type_name(qt)} tensor data holds {flat.numel()} elements, shape {shape} "
                            f"needs {n_elems}")
        return flat.reshape(shape).to(dtype)

    fn = _block_fn(qt)
    block, size = block_info(qt)
    row_bytes(qt, shape[-1] if shape else 1)  # validates the row length
    raw = _as_bytes(data)
    n_blocks = n_elems // block
    if raw.numel() != n_blocks * size:
        raise GGUFError(f"{_type_name(qt)} tensor data has {raw.numel()} bytes, shape {shape} "
                        f"needs {n_blocks * size}")
    blocks = raw.view(n_blocks, size)
    out = torch.empty((n_blocks, block), dtype=dtype, device=raw.device)
    step = max(1, _CHUNK_ELEMS // block)
    for start in range(0, n_blocks, step):
        out[start:start + step] = fn(blocks[start:start + step])
    return out.reshape(shape)
