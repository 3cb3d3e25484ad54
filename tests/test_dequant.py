"""ocula.quant.dequant against the numpy reference in gguf.quants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from ocula.errors import UnsupportedError
from ocula.quant.dequant import SUPPORTED_TYPES, block_info, dequantize, row_bytes

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "models" / "llama"
SHAPE = (4, 2048)  # 4 rows; a multiple of every block size (32, 64, 256)

PLAIN = {QT.F32: np.float32, QT.F16: np.float16, QT.BF16: None, QT.F64: np.float64,
         QT.I8: np.int8, QT.I16: np.int16, QT.I32: np.int32, QT.I64: np.int64}
BLOCK_TYPES = sorted((t for t in map(QT, SUPPORTED_TYPES) if t not in PLAIN), key=int)

# Byte offsets of the f16 scale fields inside one block, overwritten so random bytes stay finite.
F16_FIELDS = {
    QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q8_0: (0,),
    QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
    QT.TQ1_0: (52,), QT.TQ2_0: (64,), QT.IQ4_NL: (0,), QT.IQ4_XS: (0,),
    QT.IQ2_XXS: (0,), QT.IQ2_XS: (0,), QT.IQ2_S: (0,), QT.IQ3_XXS: (0,), QT.IQ3_S: (0,), QT.IQ1_S: (0,),
    QT.MXFP4: (), QT.NVFP4: (),  # E8M0 / UE4M3 scales are always finite
}


def _f16_scales(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite f16 values of realistic magnitude and both signs, as uint8 pairs [n, 2]."""
    mag = 10.0 ** rng.uniform(-4, 0, n)
    return (mag * rng.choice([-1.0, 1.0], n)).astype(np.float16).view(np.uint8).reshape(n, 2)


def random_blocks(qtype: QT, n_blocks: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + int(qtype))
    _, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    if qtype == QT.IQ1_M:  # the f16 scale is spread over the top nibbles of bytes 49, 51, 53, 55
        d = _f16_scales(rng, n_blocks).view(np.uint16).reshape(n_blocks)
        for i, pos in enumerate((49, 51, 53, 55)):
            raw[:, pos] = (raw[:, pos] & 0x0F) | (((d >> (4 * i)) & 0x0F) << 4).astype(np.uint8)
    else:
        for off in F16_FIELDS[qtype]:
            raw[:, off:off + 2] = _f16_scales(rng, n_blocks)
    return raw


def assert_matches(ours: torch.Tensor, ref: np.ndarray) -> None:
    """Bit-identical, or at most 1 float32 ulp apart; non-finite values (only reachable from
    extreme MXFP4 exponents in random data) must be identical."""
    got = ours.cpu().numpy()
    ref = np.asarray(ref, dtype=np.float32).reshape(got.shape)
    assert got.dtype == np.float32
    if np.array_equal(got.view(np.uint32), ref.view(np.uint32)):
        return  # bit-identical (the usual case)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(got[~finite], ref[~finite])
    np.testing.assert_array_max_ulp(got[finite], ref[finite], maxulp=1)


def _as_rows(raw: np.ndarray, rows: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(raw).reshape(rows, -1))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_random_bytes_match_gguf(qtype):
    block, _ = GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, SHAPE[0] * SHAPE[1] // block).reshape(SHAPE[0], -1)
    ours = dequantize(torch.from_numpy(raw), qtype, SHAPE)
    assert ours.shape == SHAPE
    assert_matches(ours, gq.dequantize(raw, qtype))


QUANTIZABLE = [t for t in BLOCK_TYPES
               if getattr(gq, t.name, None) is not None
               and "quantize_blocks" not in getattr(getattr(gq, t.name), "__abstractmethods__", ())]


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_data_matches_gguf(qtype):
    rng = np.random.default_rng(1234)
    x = (rng.standard_normal(SHAPE) * 0.05).astype(np.float32)
    if qtype in (QT.TQ1_0, QT.TQ2_0):  # ternary weights {-a, 0, a}: exact round trip (up to f16 a)
        x = np.float32(0.05) * rng.integers(-1, 2, SHAPE).astype(np.float32)
    raw = gq.quantize(x, qtype)
    ours = dequantize(torch.from_numpy(raw), qtype, SHAPE)
    ref = gq.dequantize(raw, qtype)
    assert_matches(ours, ref)
    assert np.abs(ref - x).max() < 0.1  # sanity: the round trip is close to the input


def test_quantizable_types_cover_the_simple_ones():
    assert {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.TQ1_0, QT.TQ2_0, QT.MXFP4} <= set(QUANTIZABLE)


@pytest.mark.parametrize("qtype", list(PLAIN), ids=lambda t: t.name)
def test_plain_types_from_bytes_and_native(qtype):
    rng = np.random.default_rng(7)
    if qtype == QT.BF16:
        vals = gq.quantize(rng.standard_normal(SHAPE).astype(np.float32), QT.BF16)  # uint8 bytes
        ref = gq.dequantize(vals, QT.BF16)
        native = torch.from_numpy(vals.copy()).view(torch.bfloat16)
    else:
        vals = (rng.standard_normal(SHAPE) * 100).astype(PLAIN[qtype])
        ref = vals.astype(np.float32)
        native = torch.from_numpy(vals)
    raw = torch.from_numpy(np.ascontiguousarray(vals).view(np.uint8).reshape(-1))
    for data in (raw, native):
        out = dequantize(data, qtype, SHAPE)
        assert out.dtype == torch.float32 and out.shape == SHAPE
        assert_matches(out, ref)


def test_f16_f32_match_gguf():
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    for qtype in (QT.F32, QT.F16):
        raw = gq.quantize(x, qtype).view(np.uint8)
        assert_matches(dequantize(torch.from_numpy(raw.copy()), qtype, SHAPE), gq.dequantize(raw, qtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_dtype_is_a_cast_of_float32(dtype):
    raw = torch.from_numpy(random_blocks(QT.Q4_K, 8))
    full = dequantize(raw, QT.Q4_K, (2, 1024))
    out = dequantize(raw, int(QT.Q4_K), (2, 1024), dtype=dtype)
    assert out.dtype == dtype and out.shape == (2, 1024)
    assert torch.equal(out, full.to(dtype))


def test_chunked_decode_matches_single_pass(monkeypatch):
    from ocula.quant import dequant as dq
    raw = torch.from_numpy(random_blocks(QT.Q6_K, 12))
    whole = dequantize(raw, QT.Q6_K, (3, 1024))
    monkeypatch.setattr(dq, "_CHUNK_ELEMS", 5 * 256)  # 5 blocks per chunk: uneven last chunk
    assert torch.equal(dequantize(raw, QT.Q6_K, (3, 1024)), whole)


def test_ksigns_table_matches_gguf():
    from ocula.quant.dequant_iq import _KSIGNS
    assert bytes(_KSIGNS) == gq.IQ2_XXS.ksigns


def test_block_info_and_row_bytes():
    assert block_info(QT.Q4_K) == (256, 144)
    assert block_info(int(QT.Q8_0)) == (32, 34)
    assert block_info(QT.F16) == (1, 2)
    assert row_bytes(QT.Q4_K, 4096) == 16 * 144
    assert row_bytes(QT.F32, 7) == 28
    with pytest.raises(ValueError, match="block size"):
        row_bytes(QT.Q4_K, 100)
    with pytest.raises(UnsupportedError):
        block_info(9999)


def test_supported_types_are_ints_and_cover_gguf_reference():
    assert all(type(t) is int for t in SUPPORTED_TYPES)
    reference = {int(t) for t in QT if getattr(gq, t.name, None) is not None and t.name != "BF16"}
    assert reference <= SUPPORTED_TYPES
    assert {int(QT.F32), int(QT.F16), int(QT.BF16), int(QT.F64), int(QT.I32)} <= SUPPORTED_TYPES


@pytest.mark.parametrize("qtype", [QT.Q8_1, QT.Q8_K, 9999], ids=str)
def test_unsupported_type_is_named(qtype):
    if isinstance(qtype, QT) and int(qtype) in SUPPORTED_TYPES:
        pytest.skip(f"{qtype.name} is supported")
    with pytest.raises(UnsupportedError, match=qtype.name if isinstance(qtype, QT) else "9999"):
        dequantize(torch.zeros(40, dtype=torch.uint8), qtype, (32,))


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="bytes"):
        dequantize(torch.zeros(33, dtype=torch.uint8), QT.Q8_0, (32,))
    with pytest.raises(ValueError, match="block size"):
        dequantize(torch.zeros(34, dtype=torch.uint8), QT.Q8_0, (16,))
    with pytest.raises(ValueError, match="elements"):
        dequantize(torch.zeros(12, dtype=torch.uint8), QT.F32, (4,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_cuda_matches_cpu(qtype):
    block, _ = GGML_QUANT_SIZES[qtype]
    raw = torch.from_numpy(random_blocks(qtype, 2048 // block))
    cpu = dequantize(raw, qtype, (2048,))
    assert torch.equal(dequantize(raw.cuda(), qtype, (2048,)).cpu(), cpu)


@pytest.mark.parametrize("name", ["llama-Q4_K_M.gguf", "llama-Q8_0.gguf"])
def test_fixture_model_tensors(name):
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"fixture {path} not present (needs /work/shared next to the repo)")
    from gguf import GGUFReader
    reader = GGUFReader(path)
    seen = set()
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        data = torch.from_numpy(np.array(t.data).view(np.uint8))  # copy: the memmap is read-only
        ours = dequantize(data, t.tensor_type, shape)
        assert ours.shape == shape, t.name
        ref = gq.dequantize(t.data, t.tensor_type)
        assert_matches(ours, ref)
        seen.add(t.tensor_type)
    expected = {QT.Q4_K, QT.Q6_K} if "Q4_K" in name else {QT.Q8_0}
    assert expected <= seen
