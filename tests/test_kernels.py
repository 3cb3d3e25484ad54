"""ocula.quant.kernels against the reference `tiled_linear` (torch dequantization + GEMM).

Tolerances, relative to max |reference output|:
- native, float32 activations: 2e-6. Weights decode to the same float32 values as the torch
  dequantizers (checked bit for bit below, for the fused mat-vec too: one-hot rows of x); only the
  float32 summation order differs (the fused kernels may also apply a block scale once to a partial
  sum, d * sum(q x) for Q8_0, which is the same kind of reassociation). The observed error is
  ~1e-6 of max |y| (float32 sums of 512-800 products); a decoding slip would be ~1e-1.
- native, bfloat16 activations (tiles + bf16 GEMM, T > FUSED_MAX_T): 1e-2, bf16 rounding of the output.
- ggml: 5e-2. ggml quantizes the activations to 8 bit (Q8_0 / Q8_K) before its integer dot products.
- native_q8 (int8 activations, our VNNI / AVX2 kernels): 3e-2 against the float64 product x @ W.T; observed
  8e-3..1.1e-2 (Q4_0 8.3e-3, Q5_0 9.2e-3, Q8_0 8.0e-3, Q4_K 1.06e-2, Q5_K 9.7e-3, Q6_K 1.0e-2) on
  these random blocks, all of it the rounding of x to int8. Against x rounded the same way in torch
  (float64 product) the kernels agree to 2e-6 (observed <= 2.3e-7): the integer arithmetic is exact,
  only the float32 scale products and sums round.
- native_q16 (int16 activations, AVX2 builds): 3e-4 against the float64 product; observed 7.5e-5..8.4e-5
  (Q4_K, Q5_K, Q6_K), and 2e-6 (observed 1.3e-7) against x rounded as the C does.
"""
from __future__ import annotations

import os
import subprocess
from collections import Counter
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from ocula.errors import UnsupportedError
from ocula.quant import kernels, linear
from ocula.quant.linear import QLinear, QuantizedWeight, tiled_linear

ROWS, COLS = 48, 512  # COLS: a multiple of every block size
FLOATS = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
# byte offsets of f16 scales inside a block, overwritten so random bytes stay finite
F16_FIELDS = {QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q8_0: (0,),
              QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
              QT.TQ1_0: (52,), QT.TQ2_0: (64,), QT.IQ4_NL: (0,), QT.IQ4_XS: (0,), QT.IQ2_XXS: (0,),
              QT.IQ2_XS: (0,), QT.IQ2_S: (0,), QT.IQ3_XXS: (0,), QT.IQ3_S: (0,), QT.IQ1_S: (0,), QT.MXFP4: ()}
NATIVE = sorted(map(QT, kernels.NATIVE_TYPES), key=int)
Q8 = [QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]  # types with an int8-activation kernel
Q16 = [QT.Q4_K, QT.Q5_K, QT.Q6_K]  # ... and with an int16 one
GGML = [t for t in sorted(map(QT, kernels.GGML_TYPES), key=int) if t in F16_FIELDS or t in FLOATS]

needs_native = pytest.mark.skipif(kernels.native_lib() is None, reason="no C compiler: native kernels unavailable")
needs_q8 = pytest.mark.skipif(not kernels.q8_supported(int(QT.Q4_K)),
                              reason="int8-activation kernels need the native build on an x86 CPU with AVX2 or VNNI")
needs_q16 = pytest.mark.skipif(not kernels.q16_supported(int(QT.Q4_K)),
                               reason="int16-activation kernels need the native build on an AVX2 CPU without AVX-512")
needs_ggml = pytest.mark.skipif(kernels.ggml_module() is None, reason="ggml-python not installed (ocula[fast])")


def random_weight(qtype: QT, rows: int = ROWS, cols: int = COLS, seed: int = 0) -> QuantizedWeight:
    rng = np.random.default_rng(seed + int(qtype))
    if qtype in FLOATS:
        data = torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32)).to(FLOATS[qtype])
        return QuantizedWeight(data.view(torch.uint8), int(qtype), (rows, cols))
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = 10.0 ** rng.uniform(-3, -1, len(raw)) * rng.choice([-1.0, 1.0], len(raw))
        raw[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
    if qtype == QT.MXFP4:  # E8M0 exponent byte: keep the scale near 1
        raw[:, 0] = rng.integers(122, 130, len(raw))
    return QuantizedWeight(torch.from_numpy(raw), int(qtype), (rows, cols))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture
def fresh_selection():
    for cached in (kernels.kernel_name, kernels.q8_supported, kernels.q16_supported):
        cached.cache_clear()
    yield
    for cached in (kernels.kernel_name, kernels.q8_supported, kernels.q16_supported):
        cached.cache_clear()


# ----------------------------------------------------------------------------------- native

@needs_native
@pytest.mark.parametrize("qtype", NATIVE, ids=lambda t: t.name)
@pytest.mark.parametrize("T", [1, 5, 12, 37])  # 1, 5, 12: fused decode kernel; 37: C-decoded tiles + GEMM
def test_native_matches_tiled_linear(qtype, T):
    w = random_weight(qtype)
    x = torch.randn(T, COLS, generator=torch.Generator().manual_seed(T))
    bias = torch.randn(ROWS)
    ref = tiled_linear(x, w, bias)
    got = kernels.native_linear(x, w, bias)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert rel_err(got, ref) < 2e-6


def c_matmul(entry: str, w: QuantizedWeight, x: torch.Tensor, threads: int = 2) -> torch.Tensor:
    """A C mat-vec (`ocula_matmul`, `ocula_matmul_q8` or `_q16`; they take <= 64 rows of x) or the int16
    GEMM (`ocula_gemm_q16`) called directly."""
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], w.shape[0])
    rc = getattr(kernels.native_lib(), entry)(w.qtype, w.data.data_ptr(), w.shape[0], w.shape[1], w.data.shape[1],
                                              x.data_ptr(), x.shape[0], y.data_ptr(), threads)
    assert rc == 0
    return y


def fused_matmul(w: QuantizedWeight, x: torch.Tensor, threads: int = 2) -> torch.Tensor:
    return c_matmul("ocula_matmul", w, x, threads)


@needs_native
@pytest.mark.parametrize("qtype", NATIVE, ids=lambda t: t.name)
def test_native_fused_kernel_uses_the_exact_weights(qtype):
    """One-hot rows of x select single columns of W, where every summation order gives the weight
    itself: the fused kernel must reproduce the dequantizer's float32 values bit for bit, for every
    column and lane order, with 1 row of x and with chunks of several (odd block counts included)."""
    cols = 768 if GGML_QUANT_SIZES[qtype][0] == 256 else 800  # 3 super-blocks / 25 blocks
    w = random_weight(qtype, cols=cols)
    ref = w.dequantize(torch.float32)
    eye = torch.eye(cols)
    for T in (1, 3, 11, 64):  # 64: chunks of 8
        for start in range(0, cols, T):
            picks = torch.arange(start, min(start + T, cols))
            assert torch.equal(fused_matmul(w, eye[picks], threads=1), ref[:, picks].T), (T, start)
    assert torch.equal(fused_matmul(w, eye[:5], threads=2), ref[:, :5].T)


@needs_native
@pytest.mark.parametrize("qtype", NATIVE, ids=lambda t: t.name)
@pytest.mark.parametrize("T", [1, 2, 4, 6, 9])
def test_native_fused_kernel_sums(qtype, T):
    """Dense x, every row count the fused path compiles separately, and T > 8 (chunks of 8)."""
    cols = 768 if GGML_QUANT_SIZES[qtype][0] == 256 else 800
    w = random_weight(qtype, cols=cols)
    x = torch.randn(T, cols, generator=torch.Generator().manual_seed(T))
    ref = x @ w.dequantize(torch.float32).T
    assert rel_err(fused_matmul(w, x), ref) < 2e-6
    assert rel_err(fused_matmul(w, x, threads=1), ref) < 2e-6


@needs_native
@pytest.mark.parametrize("qtype", NATIVE, ids=lambda t: t.name)
@pytest.mark.parametrize("entry", ["ocula_matmul", "ocula_matmul_q8"])
def test_a_row_gets_the_same_bits_alone_or_with_others(qtype, entry):
    """Batch invariance: a sequence decoded in a batch of B gets what it gets alone, bit for bit,
    for every row count the kernels compile separately (the int8 kernels quantize each row alone;
    the exact ones keep the same FMA chains per row whatever the count)."""
    if entry == "ocula_matmul_q8" and not kernels.q8_supported(int(qtype)):
        pytest.skip("no int8 kernel for this type on this CPU")
    cols = 768 if GGML_QUANT_SIZES[qtype][0] == 256 else 800
    w = random_weight(qtype, cols=cols)
    x = torch.randn(19, cols, generator=torch.Generator().manual_seed(1))
    alone = torch.cat([c_matmul(entry, w, x[i : i + 1]) for i in range(19)])
    for T in (2, 3, 5, 8, 19):
        assert torch.equal(c_matmul(entry, w, x[:T]), alone[:T]), T


@needs_native
@pytest.mark.parametrize("qtype", NATIVE, ids=lambda t: t.name)
def test_native_dequant_is_bit_identical(qtype):
    w = random_weight(qtype)
    ref = w.dequantize(torch.float32)
    assert torch.equal(kernels.native_dequant(w, 0, ROWS, torch.float32), ref)
    assert torch.equal(kernels.native_dequant(w, 5, 17, torch.bfloat16), ref[5:17].to(torch.bfloat16))


@needs_native
@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("half_native", [True, False])
def test_native_bfloat16_and_batched_shapes(qtype, T, half_native, monkeypatch):
    """bf16 compute: tiles in bf16, or in float32 on CPUs without bf16 matrix instructions (then the
    product is the float32 one rounded once to bf16)."""
    monkeypatch.setattr(kernels, "half_gemm_is_native", lambda dt: half_native)
    w = random_weight(qtype)
    x = torch.randn(2, T, COLS).bfloat16()  # leading batch dim, bf16 compute dtype
    got = kernels.native_linear(x, w, None)
    assert got.shape == (2, T, ROWS) and got.dtype == torch.bfloat16
    ref = tiled_linear(x.float(), w, None)
    assert rel_err(got, ref) < 1e-2
    if not half_native and T > kernels.FUSED_MAX_T:
        assert torch.equal(got, kernels.native_linear(x.float(), w, None).bfloat16())


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16], ids=lambda t: t.name)
@pytest.mark.parametrize("mode", ["auto", "exact", "q8"])
@pytest.mark.parametrize("T", [1, 37])
def test_float_rows_of_any_length(qtype, mode, T):
    """Float weights whose rows are not a multiple of 32 long (Qwen2.5-VL's ViT ffn_down is 3420
    wide) must not reach the C kernels, which take float rows in pieces of 32 (a tail went unwritten)."""
    w = random_weight(qtype, rows=40, cols=3420 // 9)  # 380 = 11 * 32 + 28
    x = torch.randn(T, w.shape[1], generator=torch.Generator().manual_seed(T))
    ref = x.double() @ w.dequantize(torch.float32).double().T
    assert kernels.weight_kernel_name(w, torch.float32, mode) == "torch"
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        got = kernels.select_kernel(w, dtype, mode)(x.to(dtype), w, None)
        assert rel_err(got, ref) < tol, (dtype, rel_err(got, ref))


@needs_native
def test_native_tiles_cover_every_row(monkeypatch):
    monkeypatch.setattr(kernels, "TILE_ELEMS", 7 * COLS)  # 48 rows in tiles of 7: a ragged last tile
    w = random_weight(QT.Q6_K)
    x = torch.randn(37, COLS)
    assert rel_err(kernels.native_linear(x, w, None), tiled_linear(x, w, None)) < 2e-6


@needs_native
def test_native_output_matrix_shape():
    """A wide, short weight (the tied-embedding output layout) and a 1-D activation (decode)."""
    w = random_weight(QT.Q8_0, rows=4096, cols=64)
    x = torch.randn(64)
    got = kernels.native_linear(x, w, None)
    assert got.shape == (4096,)
    assert rel_err(got, tiled_linear(x, w, None)) < 2e-6


# ----------------------------------------------------------------------------------- native_q8

def q8_matmul(w: QuantizedWeight, x: torch.Tensor, threads: int = 2) -> torch.Tensor:
    return c_matmul("ocula_matmul_q8", w, x, threads)


def q8_rounded(x: torch.Tensor, group: int, qmax: int = 127) -> torch.Tensor:
    """x as the C code quantizes it (float32 scale qmax / max |x| per group, round half to even),
    back in float64: d * q. (torch's `qmax / amax` multiplies by a reciprocal: one ulp off the C's
    division, enough to round an x the other way.)"""
    if x.shape[1] % group:  # a shorter last group
        cut = x.shape[1] // group * group
        return torch.cat([q8_rounded(x[:, :cut], group, qmax), q8_rounded(x[:, cut:], x.shape[1] - cut, qmax)], 1)
    g = x.float().reshape(x.shape[0], -1, group)
    amax = g.abs().amax(-1, keepdim=True)
    q = torch.round(g * torch.where(amax > 0, torch.full_like(amax, qmax) / amax, torch.zeros_like(amax)))
    return (q.double() * (amax / qmax).double()).reshape(x.shape)


@needs_q8
@pytest.mark.parametrize("qtype", Q8, ids=lambda t: t.name)
def test_q8_kernel_error(qtype):
    """Every row count 1..8, odd block counts (3 super-blocks / 25 blocks: a half pair), 1 and 2
    threads: within 3e-2 of the exact product, and within 2e-6 of it with x rounded as the C does."""
    block = GGML_QUANT_SIZES[qtype][0]
    cols = 768 if block == 256 else 800
    w = random_weight(qtype, cols=cols)
    wd = w.dequantize(torch.float32).double()
    for T in range(1, 9):
        x = torch.randn(T, cols, generator=torch.Generator().manual_seed(T))
        ref, ref_rounded = x.double() @ wd.T, q8_rounded(x, block if block == 256 else 32) @ wd.T
        for threads in (1, 2):
            got = q8_matmul(w, x, threads)
            assert rel_err(got, ref) < 3e-2, (T, threads)
            assert rel_err(got, ref_rounded) < 2e-6, (T, threads)


@needs_q8
def test_q8_kernel_edge_rows_of_x():
    """A zero row of x (scale 0) gives 0; a one-hot row is exact to float32 rounding."""
    w = random_weight(QT.Q6_K, cols=512)
    x = torch.zeros(2, 512)
    x[1, 7] = 1e4
    got = q8_matmul(w, x)
    assert torch.equal(got[0], torch.zeros(ROWS))
    assert rel_err(got[1], x[1].double() @ w.dequantize(torch.float32).double().T) < 1e-5


@pytest.mark.parametrize("linear_fn, tol", [pytest.param(kernels.q8_linear, 3e-2, marks=needs_q8, id="q8"),
                                             pytest.param(kernels.q16_linear, 1e-2, marks=needs_q16, id="q16")])
def test_quantized_x_linear_bias_dtype_and_large_T(linear_fn, tol):
    """(q16's tolerance: the bf16 rounding of x and of the output)"""
    w = random_weight(QT.Q4_K)
    bias = torch.randn(ROWS)
    x = torch.randn(2, 3, COLS).bfloat16()  # leading batch dim, 6 rows: the quantized-x kernel
    got = linear_fn(x, w, bias)
    assert got.shape == (2, 3, ROWS) and got.dtype == torch.bfloat16
    assert rel_err(got, tiled_linear(x.float(), w, bias)) < tol
    chunk = torch.randn(kernels.Q8_MAX_T + 1, COLS)  # a short prefill chunk: int16 kernels, else exact
    assert rel_err(linear_fn(chunk, w, None), tiled_linear(chunk, w, None)) < (
        3e-4 if kernels.q16_supported(w.qtype) else 2e-6)
    big = torch.randn(kernels.FUSED_MAX_T + 1, COLS)  # a longer one: q8's int16 GEMM, else exact tiles
    gemm16 = linear_fn is kernels.q8_linear and kernels.gemm16_supported(w.qtype)
    assert rel_err(linear_fn(big, w, None), tiled_linear(big, w, None)) < (3e-4 if gemm16 else 2e-6)
    w2 = random_weight(QT.Q2_K)  # no such kernel: exact
    x1 = torch.randn(1, COLS)
    assert rel_err(linear_fn(x1, w2, None), tiled_linear(x1, w2, None)) < 2e-6


# ----------------------------------------------------------------------------------- native_q16

@needs_q16
@pytest.mark.parametrize("qtype", Q16, ids=lambda t: t.name)
def test_q16_kernel_error(qtype):
    """Every row count 1..8 (chunks of 4 and the rest), 3 super-blocks, 1 and 2 threads."""
    w = random_weight(qtype, cols=768)
    wd = w.dequantize(torch.float32).double()
    for T in range(1, 9):
        x = torch.randn(T, 768, generator=torch.Generator().manual_seed(T))
        ref, ref_rounded = x.double() @ wd.T, q8_rounded(x, 256, 16383) @ wd.T
        for threads in (1, 2):
            got = c_matmul("ocula_matmul_q16", w, x, threads)
            assert rel_err(got, ref) < 3e-4, (T, threads)
            assert rel_err(got, ref_rounded) < 2e-6, (T, threads)


@needs_q16
@pytest.mark.parametrize("entry", ["ocula_matmul_q16", "ocula_gemm_q16"])
@pytest.mark.parametrize("qtype", Q16, ids=lambda t: t.name)
def test_q16_kernel_largest_blocks_stay_exact(qtype, entry):
    """Weights and sub-block scales at the format's largest magnitude (Q4_K / Q5_K: q 15 / 31 with
    scale 63; Q6_K: q - 32 = -32 with scale -128) times x at the largest int16 value, all of one sign
    (Q6_K: an int32 lane sums 32 products of 4096 * 16383, just under 2^31). A zero row of x gives 0."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros((ROWS * 512 // block, size), dtype=np.uint8)
    if qtype == QT.Q6_K:
        raw[:, 192:208] = 0x80  # scales -128, ql = qh = 0: q = 0
        raw[:, 208:210] = np.array([1e-3], np.float16).view(np.uint8)
    else:
        raw[:, 4:] = 0xFF  # every scale and min 63, every q 15 (Q5_K: 31)
        raw[:, 0:2] = np.array([1e-3], np.float16).view(np.uint8)  # d; dmin = 0
    w = QuantizedWeight(torch.from_numpy(raw), int(qtype), (ROWS, 512))
    x = torch.stack([torch.zeros(512), torch.ones(512), torch.full((512,), -3.0)])
    got = c_matmul(entry, w, x)
    assert torch.equal(got[0], torch.zeros(ROWS))
    assert rel_err(got, x.double() @ w.dequantize(torch.float32).double().T) < 1e-6


@needs_q16
@pytest.mark.parametrize("qtype", Q16 + [QT.Q4_0, QT.Q5_0, QT.Q8_0], ids=lambda t: t.name)
def test_gemm16_error(qtype):
    """The int16 GEMM rounds x as ocula_matmul_q16 does, and is exact against the float64 product of that
    rounded x up to float sums (the weights are not rounded: K types' scales are integers, the 32-value
    types' float scales are applied per block): for row counts that leave every remainder of its 2 x 3
    register blocks and 16-row weight tiles (37 rows of W), and with 12800 columns, x taken in several
    L2-sized groups. Rows of 32-value blocks may end in a shorter group of 256 (576, 896, 96 columns)."""
    shapes = [(768, (1, 2, 3, 4, 5, 17, 40)), (12800, (41,))]
    if qtype in (QT.Q4_0, QT.Q5_0, QT.Q8_0):
        shapes += [(576, (3, 17)), (896, (5, 40)), (96, (7,))]
    for cols, counts in shapes:
        w = random_weight(qtype, rows=37, cols=cols)
        wd = w.dequantize(torch.float32).double()
        for T in counts:
            x = torch.randn(T, cols, generator=torch.Generator().manual_seed(T))
            ref_rounded = q8_rounded(x, 256, 16383) @ wd.T
            for threads in (1, 2):
                got = c_matmul("ocula_gemm_q16", w, x, threads)
                assert rel_err(got, ref_rounded) < 2e-6, (cols, T, threads)
                assert rel_err(got, x.double() @ wd.T) < 3e-4, (cols, T, threads)


@needs_q16
def test_prefill_of_int8_layers_goes_through_the_int16_gemm():
    """A prefill chunk (more than Q8_MAX_T rows) of an int8 layer goes to the int16 GEMM at any length,
    for rows that 256 does not divide (Q8_0, 640 columns) up to GEMM16_SHORT_GROUP_MAX_T rows; one of
    an int16 layer (ffn_down in "auto") never does: exact beyond FUSED_MAX_T rows."""
    for w in (random_weight(QT.Q6_K), random_weight(QT.Q8_0, cols=640)):
        for n in (kernels.Q8_MAX_T + 1, 40):
            x = torch.randn(n, w.shape[1], generator=torch.Generator().manual_seed(n))
            assert torch.equal(kernels.q8_linear(x, w, None), c_matmul("ocula_gemm_q16", w, x))
    w = random_weight(QT.Q6_K)
    x = torch.randn(40, COLS)
    assert rel_err(kernels.q16_linear(x, w, None), tiled_linear(x, w, None)) < 2e-6
    w = random_weight(QT.Q8_0, cols=640)  # long chunks of such rows: the float32 GEMM, exact
    x = torch.randn(kernels.GEMM16_SHORT_GROUP_MAX_T + 1, 640)
    assert rel_err(kernels.q8_linear(x, w, None), tiled_linear(x, w, None)) < 2e-6


# ----------------------------------------------------------------------------------- ggml

@needs_ggml
@pytest.mark.parametrize("qtype", GGML, ids=lambda t: t.name)
@pytest.mark.parametrize("T", [1, 37])
def test_ggml_matches_tiled_linear(qtype, T, monkeypatch):
    monkeypatch.setattr(kernels, "GGML_MAX_T", 64)  # T = 37 through ggml too, not the tile path
    w = random_weight(qtype)
    x = torch.randn(T, COLS, generator=torch.Generator().manual_seed(T))
    got = kernels.ggml_linear(x, w, None)
    assert got.shape == (T, ROWS)
    assert rel_err(got, tiled_linear(x, w, None)) < 5e-2


@needs_ggml
def test_ggml_plan_is_reused_and_large_T_leaves_ggml():
    w = random_weight(QT.Q4_K)
    x = torch.randn(1, COLS)
    first = kernels.ggml_linear(x, w, None)
    assert torch.equal(kernels.ggml_linear(x, w, None), first)  # cached graph, same answer
    big = torch.randn(kernels.GGML_MAX_T + 1, COLS)
    assert rel_err(kernels.ggml_linear(big, w, None), tiled_linear(big, w, None)) < 2e-6  # exact path


# ----------------------------------------------------------------------------------- selection / fallback

def test_selection_rules(fresh_selection):
    have = kernels.available()
    native = "native" if have["native"] else "torch"
    q8 = "native_q8" if have["native_q8"] else native
    q16 = "native_q16" if have["native_q16"] else native
    ggml = "ggml" if have["ggml"] else q8
    f32, bf16 = torch.float32, torch.bfloat16
    assert kernels.kernel_name(int(QT.Q4_K), "cuda", f32, "auto") == "torch"
    assert kernels.kernel_name(int(QT.Q4_K), "cpu", f32, "torch") == "torch"
    assert kernels.kernel_name(int(QT.Q4_K), "cpu", f32, "auto") == native  # float32 stays exact
    assert kernels.kernel_name(int(QT.Q6_K), "cpu", f32, "auto") == native
    assert kernels.kernel_name(int(QT.Q4_K), "cpu", f32, "exact") == native
    assert kernels.kernel_name(int(QT.Q4_K), "cpu", bf16, "exact") == native
    assert kernels.kernel_name(int(QT.Q4_K), "cpu", bf16, "auto") == ggml
    assert kernels.kernel_name(int(QT.Q6_K), "cpu", torch.float16, "q8") == q8
    assert kernels.kernel_name(int(QT.Q2_K), "cpu", bf16, "q8") == native  # no int8 kernel for Q2_K
    assert kernels.kernel_name(int(QT.Q6_K), "cpu", bf16, "q16") == q16
    assert kernels.kernel_name(int(QT.Q8_0), "cpu", bf16, "q16") == native  # no int16 kernel for Q8_0
    assert kernels.kernel_name(int(QT.IQ2_XS), "cpu", f32, "exact") == "torch"  # no native IQ kernel
    with pytest.raises(UnsupportedError):
        kernels.check_mode("fastest")


def test_auto_gives_ffn_down_int16_activations(fresh_selection):
    """linear.FINE_IN_AUTO: in "auto", ffn_down takes the int16 kernels (or exact where there are
    none) while the other layers take the int8 ones; float32 stays exact everywhere."""
    have = kernels.available()
    native = "native" if have["native"] else "torch"
    fast = "ggml" if have["ggml"] else "native_q8" if have["native_q8"] else native
    fine = "native_q16" if have["native_q16"] else native
    block = torch.nn.Module()
    block.ffn_up, block.ffn_down = QLinear(COLS, ROWS), QLinear(COLS, ROWS)
    block.ffn_up.weight = block.ffn_down.weight = random_weight(QT.Q4_K)
    assert linear.use_kernels(block, torch.bfloat16, "auto") == Counter([fast, fine])
    assert block.ffn_down.kernel is kernels.KERNELS[fine]
    assert linear.use_kernels(block, torch.float32, "auto") == {native: 2}


def test_fallback_without_native_or_ggml(monkeypatch, fresh_selection):
    monkeypatch.setattr(kernels, "native_lib", lambda: None)
    monkeypatch.setattr(kernels, "ggml_module", lambda: None)
    assert kernels.available() == {"torch": True, "native": False, "native_q8": False, "native_q16": False,
                                   "ggml": False}
    for mode in ("auto", "exact", "q8", "q16"):
        assert kernels.kernel_name(int(QT.Q8_0), "cpu", torch.bfloat16, mode) == "torch"
    with pytest.raises(UnsupportedError, match="ggml-python"):
        kernels.check_mode("ggml")
    layer = QLinear(COLS, ROWS)
    layer.weight = random_weight(QT.Q5_0)
    assert linear.use_kernels(layer, torch.float32, "auto") == {"torch": 1}
    x = torch.randn(3, COLS)
    assert torch.equal(layer(x), tiled_linear(x, layer.weight, None))


def test_native_build_failure_falls_back(monkeypatch, tmp_path):
    monkeypatch.delenv("OCULA_NATIVE", raising=False)
    monkeypatch.setenv("OCULA_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    kernels.native_lib.cache_clear()
    try:
        with pytest.warns(UserWarning, match="native kernels not built"):
            assert kernels.native_lib() is None
        monkeypatch.setenv("OCULA_NATIVE", "0")
        kernels.native_lib.cache_clear()
        assert kernels.native_lib() is None
    finally:
        kernels.native_lib.cache_clear()


def test_qlinear_default_and_configured_kernels(fresh_selection):
    layer = QLinear(COLS, ROWS, bias=True)
    layer.weight = random_weight(QT.Q4_K)
    x = torch.randn(2, COLS)
    ref = tiled_linear(x, layer.weight, layer.bias)
    assert rel_err(layer(x), ref) < 2e-6  # default_linear, float32: an exact kernel
    counts = linear.use_kernels(layer, torch.float32, "exact")
    assert sum(counts.values()) == 1 and layer.kernel is not None
    assert rel_err(layer(x), ref) < 2e-6


def _lower_isa_flags() -> str | None:
    """Compiler flags for the build one ISA level below this CPU's: AVX2 kernels on AVX-512 CPUs, the
    generic C on AVX2 CPUs (None elsewhere)."""
    flags = kernels._cpu_id().split()
    return "-mno-avx512f" if "avx512f" in flags else "-mno-avx2" if "avx2" in flags else None


@needs_native
@pytest.mark.skipif(_lower_isa_flags() is None or bool(os.environ.get("OCULA_NATIVE_FLAGS")),
                    reason="not an x86 CPU with AVX2, or already a lower-ISA build")
def test_lower_isa_build_passes_the_kernel_tests(tmp_path):
    """The library built for the ISA level below this CPU's (-mno-avx512f: the AVX2 mat-vecs, int8
    kernels and attention of CPUs without AVX-512; -mno-avx2: the generic C) passes this file's tests,
    the fused decode step's and the C attention's, in a fresh process: CI covers the code paths of
    the CPUs it does not run on."""
    tests = Path(__file__).parent
    env = dict(os.environ, OCULA_NATIVE_FLAGS=_lower_isa_flags(), OCULA_CACHE=str(tmp_path))
    check = ("from ocula.quant import kernels; lib = kernels.native_lib(); "
             "assert lib and not lib.ocula_attention_preferred()")
    assert subprocess.run([sys.executable, "-c", check], env=env).returncode == 0
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        str(tests / "test_kernels.py"), str(tests / "test_fused_decode.py"),
                        str(tests / "test_layers.py"), "-k", "not ggml"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
