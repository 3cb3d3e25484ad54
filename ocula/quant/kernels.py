"""Matmul kernels that compute ``x @ W.T`` straight from GGUF blocks (no float copy of the weight).

Three backends; `select_kernel` picks one per layer at load time from (qtype, device, dtype, mode):

``torch``   `linear.tiled_linear`: dequantize row tiles with ocula.quant.dequant, then torch GEMM.
            Every type, every device (CUDA uses it). Exact. Slow on CPU for decode.
``native``  Our C (the `_C_SOURCE` below), compiled on first use with the system C compiler
            (``$CC``, default ``cc``; ``-O3 -march=native -fopenmp``) into ``~/.cache/ocula/kernels``,
            loaded with ctypes. Exact: weights decode to the very float32 values ocula.quant.dequant
            gives, products and sums are float32; only the summation order differs from torch's GEMM
            (≈1e-6 relative). T <= FUSED_MAX_T rows: one fused decode+dot pass over the blocks (decode);
            more rows: C decodes row tiles to float32/bfloat16 and torch's GEMM multiplies (prefill).
            Types: F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K..Q6_K. Disabled by ``OCULA_NATIVE=0``.
``ggml``    ggml's own CPU mat-mul through the optional ``ggml-python`` package (``pip install
            'ocula[fast]'``), zero-copy on the mmap'd blocks. LOSSY: like llama.cpp it quantizes the
            activations to 8 bit (Q8_0/Q8_K) first, ≈1e-2 relative error. Used for T <= GGML_MAX_T;
            larger T goes to the native/torch tile path.

Modes (``ocula.load(..., kernels=...)``): ``"exact"`` native, else torch; ``"ggml"`` ggml, else
exact; ``"torch"`` torch only; ``"auto"`` = ggml when the compute dtype is not float32 and
ggml-python is installed, else exact — so float32 results always stay exact.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ocula.errors import UnsupportedError

if TYPE_CHECKING:
    from ocula.quant.linear import QuantizedWeight

MODES = ("auto", "exact", "ggml", "torch")
FUSED_MAX_T = 6   # native: fused decode+dot up to this many rows of x, tiles + GEMM above (measured crossover)
GGML_MAX_T = 8    # ggml: its mat-mul up to this many rows; above, tiles + GEMM win (measured)
PARALLEL_MIN_WORK = 1 << 19  # weight elements x rows below which one thread beats a fork/join
TILE_ELEMS = 1 << 22  # dequantized elements per tile on the GEMM path (16 MiB as float32)

NATIVE_TYPES = frozenset({0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30})
# ggml types whose CPU mat-mul ggml-python 0.0.45 runs (IQ*, TQ*, MXFP4 too; F32 is left to native)
GGML_TYPES = frozenset({1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23, 29,
                        30, 34, 35, 39})

_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAXT 64
typedef uint8_t u8;
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef float f32x16 __attribute__((vector_size(64)));

static inline u8x16 ld8(const u8 *p) { u8x16 v; memcpy(&v, p, 16); return v; }
/* per-byte v >> s through 16-bit lanes (x86 has no byte shifts; GCC's emulation is slow) */
static inline u8x16 shr(u8x16 v, int s) { return (u8x16)((u16x8)v >> s) & (u8)(0xFF >> s); }
static inline f32x16 ldf(const float *p) { f32x16 v; memcpy(&v, p, 64); return v; }
static inline void stf(float *p, f32x16 v) { memcpy(p, &v, 64); }
/* byte vectors -> float (unsigned; signed bytes are flipped to unsigned and shifted back, exact) */
static inline f32x16 fu(u8x16 v) { return __builtin_convertvector(__builtin_convertvector(v, i32x16), f32x16); }
static inline f32x16 fi(u8x16 v) { return fu(v ^ 0x80) - 128; }
static inline f32x16 bc(float s) { return (f32x16){0} + s; }

/* IEEE half -> float, exact (the FP16 library's method, as in ggml), scalar and 16-wide. */
static inline float f32_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t bits_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
#if defined(__F16C__)
#include <immintrin.h>
static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float h2f(uint16_t h) {
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    float norm = f32_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float denorm = f32_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    return f32_bits(sign | (two_w < (1u << 27) ? bits_f32(denorm) : bits_f32(norm)));
}
#endif
static inline f32x16 h2f16(u16x16 h) {
    u32x16 w = __builtin_convertvector(h, u32x16) << 16, sign = w & 0x80000000u, two_w = w + w;
    f32x16 norm = (f32x16)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    f32x16 denorm = (f32x16)((two_w >> 17) | (126u << 23)) - 0.5f;
    u32x16 small = (u32x16)(two_w < (1u << 27));
    return (f32x16)(sign | (small & (u32x16)denorm) | (~small & (u32x16)norm));
}
static inline float rdh(const u8 *p) { uint16_t h; memcpy(&h, p, 2); return h2f(h); }

/* byte -> 8 bytes; byte i is 16 when bit i is set: the fifth bit of Q5_0 / Q5_1 values */
static uint64_t HI16[256];
static void init_tables(void) {
    for (int v = 0; v < 256; v++) {
        uint64_t x = 0;
        for (int i = 0; i < 8; i++) if ((v >> i) & 1) x |= (uint64_t)16 << (8 * i);
        HI16[v] = x;
    }
}

/* ---- one block -> QK floats; same formulas and operation order as ocula.quant.dequant ---- */
static inline void dq_q4_0(const u8 *b, float *y) {
    f32x16 d = bc(rdh(b)); u8x16 q = ld8(b + 2);
    stf(y, d * (fu(q & 15) - 8)); stf(y + 16, d * (fu(shr(q, 4)) - 8));
}
static inline void dq_q4_1(const u8 *b, float *y) {
    f32x16 d = bc(rdh(b)), m = bc(rdh(b + 2)); u8x16 q = ld8(b + 4);
    stf(y, d * fu(q & 15) + m); stf(y + 16, d * fu(shr(q, 4)) + m);
}
static inline void five_bit(const u8 *qh, const u8 *qs, u8x16 *lo, u8x16 *hi) {
    uint64_t h[4]; for (int i = 0; i < 4; i++) h[i] = HI16[qh[i]];
    u8x16 h0, h1, q = ld8(qs); memcpy(&h0, h, 16); memcpy(&h1, h + 2, 16);
    *lo = (q & 15) | h0; *hi = shr(q, 4) | h1;
}
static inline void dq_q5_0(const u8 *b, float *y) {
    f32x16 d = bc(rdh(b)); u8x16 lo, hi; five_bit(b + 2, b + 6, &lo, &hi);
    stf(y, d * (fu(lo) - 16)); stf(y + 16, d * (fu(hi) - 16));
}
static inline void dq_q5_1(const u8 *b, float *y) {
    f32x16 d = bc(rdh(b)), m = bc(rdh(b + 2)); u8x16 lo, hi; five_bit(b + 4, b + 8, &lo, &hi);
    stf(y, d * fu(lo) + m); stf(y + 16, d * fu(hi) + m);
}
static inline void dq_q8_0(const u8 *b, float *y) {
    f32x16 d = bc(rdh(b));
    stf(y, d * fi(ld8(b + 2))); stf(y + 16, d * fi(ld8(b + 18)));
}
static inline void dq_q2_k(const u8 *b, float *y) {
    const u8 *sc = b, *qs = b + 16; float d = rdh(b + 80), dmin = rdh(b + 82);
    for (int g = 0; g < 16; g++) {  /* group g: bits 2i of qs[32h + 16k + l], g = 8h + 2i + k */
        int h = g >> 3, i = (g >> 1) & 3, k = g & 1;
        u8x16 q = shr(ld8(qs + 32 * h + 16 * k), 2 * i) & 3;
        stf(y + 16 * g, bc(d * (float)(sc[g] & 15)) * fu(q) - bc(dmin * (float)(sc[g] >> 4)));
    }
}
static inline void dq_q3_k(const u8 *b, float *y) {
    const u8 *hm = b, *qs = b + 32, *sc = b + 96; float d = rdh(b + 108);
    for (int g = 0; g < 16; g++) {  /* like Q2_K; a clear bit (g >> 1) of hmask subtracts 4 */
        int h = g >> 3, i = (g >> 1) & 3, k = g & 1;
        int s = (g < 8 ? sc[g] & 15 : sc[g - 8] >> 4) | (((sc[8 + (g & 3)] >> (2 * (g >> 2))) & 3) << 4);
        u8x16 ql = shr(ld8(qs + 32 * h + 16 * k), 2 * i) & 3;
        u8x16 miss = ((shr(ld8(hm + 16 * k), g >> 1) & 1) ^ 1) << 2;
        stf(y + 16 * g, bc(d * (float)(s - 32)) * (fu(ql + 4 - miss) - 4));
    }
}
static inline void k4_scales(const u8 *b, float *sc, float *mn) {
    float d = rdh(b), dmin = rdh(b + 2); const u8 *s = b + 4;
    for (int j = 0; j < 4; j++) {
        sc[j] = d * (float)(s[j] & 63); mn[j] = dmin * (float)(s[j + 4] & 63);
        sc[j + 4] = d * (float)((s[j + 8] & 15) | ((s[j] >> 2) & 0x30));
        mn[j + 4] = dmin * (float)((s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30));
    }
}
static inline void dq_q4_k(const u8 *b, float *y) {
    float sc[8], mn[8]; k4_scales(b, sc, mn);
    for (int c = 0; c < 4; c++) for (int k = 0; k < 2; k++) {
        u8x16 q = ld8(b + 16 + 32 * c + 16 * k);
        stf(y + 64 * c + 16 * k, bc(sc[2 * c]) * fu(q & 15) - bc(mn[2 * c]));
        stf(y + 64 * c + 32 + 16 * k, bc(sc[2 * c + 1]) * fu(shr(q, 4)) - bc(mn[2 * c + 1]));
    }
}
static inline void dq_q5_k(const u8 *b, float *y) {
    float sc[8], mn[8]; k4_scales(b, sc, mn);
    for (int c = 0; c < 4; c++) for (int k = 0; k < 2; k++) {
        u8x16 q = ld8(b + 48 + 32 * c + 16 * k), h = ld8(b + 16 + 16 * k);
        u8x16 lo = (q & 15) | ((shr(h, 2 * c) & 1) << 4), hi = shr(q, 4) | ((shr(h, 2 * c + 1) & 1) << 4);
        stf(y + 64 * c + 16 * k, bc(sc[2 * c]) * fu(lo) - bc(mn[2 * c]));
        stf(y + 64 * c + 32 + 16 * k, bc(sc[2 * c + 1]) * fu(hi) - bc(mn[2 * c + 1]));
    }
}
static inline void dq_q6_k(const u8 *b, float *y) {
    const int8_t *sc = (const int8_t *)(b + 192); float d = rdh(b + 208);
    for (int g = 0; g < 16; g++) {  /* 16 values of quarter p of half h: nibble p >> 1 of ql, bits 2p of qh */
        int h = g >> 3, p = (g >> 1) & 3, k = g & 1;
        u8x16 lo = shr(ld8(b + 64 * h + 32 * (p & 1) + 16 * k), 4 * (p >> 1)) & 15;
        u8x16 hi = shr(ld8(b + 128 + 32 * h + 16 * k), 2 * p) & 3;
        stf(y + 16 * g, bc(d * (float)sc[g]) * (fu(lo | (hi << 4)) - 32));
    }
}
static inline void dq_f32(const u8 *b, float *y) { memcpy(y, b, 32 * 4); }
static inline void dq_f16(const u8 *b, float *y) {
    u16x16 h0, h1; memcpy(&h0, b, 32); memcpy(&h1, b + 32, 32);
    stf(y, h2f16(h0)); stf(y + 16, h2f16(h1));
}
static inline void dq_bf16(const u8 *b, float *y) {
    u16x16 h0, h1; memcpy(&h0, b, 32); memcpy(&h1, b + 32, 32);
    stf(y, (f32x16)(__builtin_convertvector(h0, u32x16) << 16));
    stf(y + 16, (f32x16)(__builtin_convertvector(h1, u32x16) << 16));
}

/* ---- rows [r0, r1) of Y[t, r] = sum_k X[t, k] W[r, k]; two 16-lane accumulators per t ---- */
#define KERNELS(NAME, QK, BS)                                                                      \
static inline __attribute__((always_inline)) void rows_##NAME(                                     \
        const u8 *W, int64_t rb, int64_t cols, int64_t rows, int64_t r0, int64_t r1,                \
        const float *X, int64_t T, float *Y) {                                                     \
    float buf[QK] __attribute__((aligned(64))); f32x16 acc[MAXT][2]; int64_t nb = cols / QK;       \
    for (int64_t r = r0; r < r1; r++) {                                                            \
        const u8 *row = W + r * rb;                                                                \
        for (int64_t t = 0; t < T; t++) acc[t][0] = acc[t][1] = (f32x16){0};                       \
        for (int64_t b = 0; b < nb; b++) {                                                         \
            dq_##NAME(row + b * BS, buf);                                                          \
            for (int64_t t = 0; t < T; t++) {                                                      \
                const float *x = X + t * cols + b * QK;                                            \
                for (int c = 0; c < QK; c += 32) {                                                 \
                    acc[t][0] += ldf(buf + c) * ldf(x + c);                                        \
                    acc[t][1] += ldf(buf + c + 16) * ldf(x + c + 16);                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int64_t t = 0; t < T; t++) {                                                          \
            f32x16 a = acc[t][0] + acc[t][1]; float s = 0.f;                                       \
            for (int j = 0; j < 16; j++) s += a[j];                                                \
            Y[t * rows + r] = s;                                                                   \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
static void mm_##NAME(const u8 *W, int64_t rb, int64_t cols, int64_t rows, int64_t r0, int64_t r1, \
                      const float *X, int64_t T, float *Y) {                                       \
    if (T == 1) rows_##NAME(W, rb, cols, rows, r0, r1, X, 1, Y);                                   \
    else rows_##NAME(W, rb, cols, rows, r0, r1, X, T, Y);                                          \
}                                                                                                  \
static void dq_rows_##NAME(const u8 *W, int64_t rb, int64_t cols, int64_t r0, int64_t r1,         \
                           void *out, int bf16) {                                                  \
    float buf[QK] __attribute__((aligned(64))); int64_t nb = cols / QK;                            \
    for (int64_t r = r0; r < r1; r++) for (int64_t b = 0; b < nb; b++) {                          \
        int64_t o = r * cols + b * QK;                                                             \
        dq_##NAME(W + r * rb + b * BS, buf);                                                       \
        if (!bf16) { memcpy((float *)out + o, buf, sizeof buf); continue; }                        \
        uint16_t *d = (uint16_t *)out + o;  /* round to nearest even, as torch's .to(bfloat16) */  \
        for (int j = 0; j < QK; j++) { uint32_t u = bits_f32(buf[j]);                              \
            d[j] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1)) >> 16); }                            \
    }                                                                                              \
}

KERNELS(q4_0, 32, 18) KERNELS(q4_1, 32, 20) KERNELS(q5_0, 32, 22) KERNELS(q5_1, 32, 24)
KERNELS(q8_0, 32, 34) KERNELS(q2_k, 256, 84) KERNELS(q3_k, 256, 110) KERNELS(q4_k, 256, 144)
KERNELS(q5_k, 256, 176) KERNELS(q6_k, 256, 210) KERNELS(f32, 32, 128) KERNELS(f16, 32, 64)
KERNELS(bf16, 32, 64)

typedef void (*mm_fn)(const u8 *, int64_t, int64_t, int64_t, int64_t, int64_t, const float *, int64_t, float *);
typedef void (*dq_fn)(const u8 *, int64_t, int64_t, int64_t, int64_t, void *, int);
static const struct { int type; mm_fn mm; dq_fn dq; } TABLE[] = {  /* GGML type ids */
    {0, mm_f32, dq_rows_f32}, {1, mm_f16, dq_rows_f16}, {2, mm_q4_0, dq_rows_q4_0},
    {3, mm_q4_1, dq_rows_q4_1}, {6, mm_q5_0, dq_rows_q5_0}, {7, mm_q5_1, dq_rows_q5_1},
    {8, mm_q8_0, dq_rows_q8_0}, {10, mm_q2_k, dq_rows_q2_k}, {11, mm_q3_k, dq_rows_q3_k},
    {12, mm_q4_k, dq_rows_q4_k}, {13, mm_q5_k, dq_rows_q5_k}, {14, mm_q6_k, dq_rows_q6_k},
    {30, mm_bf16, dq_rows_bf16},
};
static int find(int type) {
    for (unsigned i = 0; i < sizeof TABLE / sizeof TABLE[0]; i++) if (TABLE[i].type == type) return (int)i;
    return -1;
}
int ocula_init(void) { init_tables(); return MAXT; }
int ocula_supports(int type) { return find(type) >= 0; }

/* Y[T, rows] = X[T, cols] @ W^T, W = `rows` rows of `rb` bytes of GGUF blocks; T <= MAXT. */
int ocula_matmul(int type, const u8 *W, int64_t rows, int64_t cols, int64_t rb,
                 const float *X, int64_t T, float *Y, int nthreads) {
    int i = find(type);
    if (i < 0 || T < 1 || T > MAXT) return -1;
    mm_fn mm = TABLE[i].mm;
#ifdef _OPENMP
    if (nthreads > 1) {
        #pragma omp parallel num_threads(nthreads)
        {
            int64_t n = omp_get_num_threads(), k = omp_get_thread_num(), step = (rows + n - 1) / n;
            int64_t a = k * step, z = a + step < rows ? a + step : rows;
            if (a < z) mm(W, rb, cols, rows, a, z, X, T, Y);
        }
        return 0;
    }
#endif
    mm(W, rb, cols, rows, 0, rows, X, T, Y);
    return 0;
}

/* out[r - r0, :] = rows [r0, r1) of W dequantized to float32 (bf16 = 0) or bfloat16 (bf16 = 1). */
int ocula_dequant(int type, const u8 *W, int64_t r0, int64_t r1, int64_t cols, int64_t rb,
                  void *out, int bf16, int nthreads) {
    int i = find(type);
    if (i < 0) return -1;
    dq_fn dq = TABLE[i].dq; const u8 *base = W + r0 * rb; int64_t rows = r1 - r0;
#ifdef _OPENMP
    if (nthreads > 1) {
        #pragma omp parallel num_threads(nthreads)
        {
            int64_t n = omp_get_num_threads(), k = omp_get_thread_num(), step = (rows + n - 1) / n;
            int64_t a = k * step, z = a + step < rows ? a + step : rows;
            if (a < z) dq(base, rb, cols, a, z, out, bf16);
        }
        return 0;
    }
#endif
    dq(base, rb, cols, 0, rows, out, bf16);
    return 0;
}
"""


def _threads(w: "QuantizedWeight", rows_of_x: int) -> int:
    n = torch.get_num_threads()
    return n if w.shape[0] * w.shape[1] * rows_of_x >= PARALLEL_MIN_WORK else 1


def _flat(x: torch.Tensor, cols: int) -> torch.Tensor:
    return x.reshape(-1, cols).to(torch.float32).contiguous()


# --------------------------------------------------------------------------------- native (C)

def _cache_dir() -> Path:
    if os.environ.get("OCULA_CACHE"):
        return Path(os.environ["OCULA_CACHE"]) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ocula" / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: a library built for one CPU must not load on another."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _compile(cc: str, src: Path, out: Path) -> str | None:
    """Build `out` from `src`, dropping OpenMP, then -march=native, if the compiler refuses them."""
    base = ["-O3", "-std=gnu11", "-shared", "-fPIC"]
    last = ""
    for extra in (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], []):
        try:
            r = subprocess.run([cc, *base, *extra, "-o", str(out), str(src)], capture_output=True,
                               text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return str(e)
        if r.returncode == 0:
            return None
        last = r.stderr.strip()[-500:]
    return last or "compiler failed"


@lru_cache(maxsize=None)
def native_lib() -> ctypes.CDLL | None:
    """The compiled kernels (built once per source, compiler and CPU, then cached), or None."""
    if os.environ.get("OCULA_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None
    key = hashlib.sha256(f"{_C_SOURCE}\0{cc}\0{_cpu_id()}".encode()).hexdigest()[:16]
    path = _cache_dir() / f"ocula_kernels_{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
                src.write_text(_C_SOURCE)
                err = _compile(cc, src, out)
                if err:
                    warnings.warn(f"ocula: native kernels not built ({err}); using the slower torch path")
                    return None
                os.replace(out, path)  # atomic: concurrent builders race harmlessly
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        warnings.warn(f"ocula: native kernels unavailable ({e}); using the slower torch path")
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ocula_matmul.argtypes = [i32, p, i64, i64, i64, p, i64, p, i32]
    lib.ocula_dequant.argtypes = [i32, p, i64, i64, i64, i64, p, i32, i32]
    if lib.ocula_init() < FUSED_MAX_T:
        return None
    return lib


def native_dequant(w: "QuantizedWeight", start: int, stop: int, dtype: torch.dtype,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, stop) of `w` as float32 or bfloat16, decoded by the C kernels."""
    lib = native_lib()
    out = torch.empty(stop - start, w.shape[1], dtype=dtype) if out is None else out
    rc = lib.ocula_dequant(w.qtype, w.data.data_ptr(), start, stop, w.shape[1], w.data.shape[1],
                           out.data_ptr(), int(dtype == torch.bfloat16), _threads(w, 1))
    if rc:
        raise UnsupportedError(f"native kernels cannot decode GGML type {w.qtype}")
    return out


@lru_cache(maxsize=None)
def _f32_gemm() -> Callable:
    """float32 F.linear through oneDNN when this torch has the op (~1.3x MKL's sgemm on the AMD
    EPYC we measured); plain F.linear otherwise. Both accumulate in float32."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        a, b = torch.randn(3, 8), torch.randn(5, 8)
        if torch.allclose(op(a, b, None, "none", [], ""), a @ b.T, atol=1e-5):
            return lambda x, w, bias: op(x, w, bias, "none", [], "")
    except (AttributeError, RuntimeError):
        pass
    return nn.functional.linear


def _gemm(x: torch.Tensor, tile: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous():
        return _f32_gemm()(x, tile, bias)
    return nn.functional.linear(x, tile, bias)


def tiles_gemm(x: torch.Tensor, w: "QuantizedWeight", bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T for many rows of x: C-decoded row tiles (in x's float32/bfloat16) times torch GEMM."""
    rows, cols = w.shape
    step = max(1, min(rows, TILE_ELEMS // cols))
    lead, x = x.shape[:-1], x.reshape(-1, cols)
    if step >= rows:
        return _gemm(x, native_dequant(w, 0, rows, x.dtype), bias).reshape(*lead, rows)
    out = torch.empty(x.shape[0], rows, dtype=x.dtype)
    buf = torch.empty(step, cols, dtype=x.dtype)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        tile = native_dequant(w, start, stop, x.dtype, buf[: stop - start])
        out[:, start:stop] = _gemm(x, tile, None if bias is None else bias[start:stop])
    return out.reshape(*lead, rows)


def native_linear(x: torch.Tensor, w: "QuantizedWeight", bias: torch.Tensor | None) -> torch.Tensor:
    """Exact x @ W.T (+ bias) on CPU from the blocks: fused for decode, tiles + GEMM for prefill."""
    rows, cols = w.shape
    n = x.numel() // cols
    if n == 0:
        return _torch_tiled(x, w, bias)
    if n > FUSED_MAX_T and x.dtype in (torch.float32, torch.bfloat16):
        return tiles_gemm(x, w, bias)
    if n > FUSED_MAX_T:
        return tiles_gemm(x.float(), w, None if bias is None else bias.float()).to(x.dtype)
    xf = _flat(x, cols)
    y = torch.empty(n, rows, dtype=torch.float32)
    if native_lib().ocula_matmul(w.qtype, w.data.data_ptr(), rows, cols, w.data.shape[1],
                                 xf.data_ptr(), n, y.data_ptr(), _threads(w, n)):
        raise UnsupportedError(f"native kernels cannot multiply GGML type {w.qtype}")
    y = y.reshape(*x.shape[:-1], rows)
    if bias is not None:
        y += bias
    return y.to(x.dtype)


# --------------------------------------------------------------------------------- ggml (optional)

@lru_cache(maxsize=None)
def ggml_module():
    """ggml-python's ctypes bindings, or None when the package is not installed."""
    try:  # torch (imported above) loaded its libgomp.so.1 first: ggml's OpenMP reuses that runtime
        from ggml import ggml as G  # noqa: N812
    except (ImportError, OSError):
        return None
    return G


class _GgmlPlan:
    """One ggml graph Y = mul_mat(W, X) for a weight and a row count, reused call after call."""

    def __init__(self, G, w: "QuantizedWeight", n: int):
        rows, cols = w.shape
        params = G.ggml_init_params(mem_size=4 * G.ggml_tensor_overhead() + G.ggml_graph_overhead() + 4096,
                                    mem_buffer=None, no_alloc=True)
        self.G, self.ctx, self.lock = G, G.ggml_init(params), threading.Lock()
        W = G.ggml_new_tensor_2d(self.ctx, w.qtype, cols, rows)
        W.contents.data = ctypes.c_void_p(w.data.data_ptr())  # zero-copy: ggml reads the mmap
        self.X = G.ggml_new_tensor_2d(self.ctx, G.GGML_TYPE_F32, cols, n)
        self.Y = G.ggml_mul_mat(self.ctx, W, self.X)
        self.graph = G.ggml_new_graph(self.ctx)
        G.ggml_build_forward_expand(self.graph, self.Y)
        self.threads = -1

    def run(self, x: torch.Tensor, y: torch.Tensor, threads: int) -> None:
        G = self.G
        with self.lock:
            if threads != self.threads:  # the work buffer holds the quantized activations
                self.plan = G.ggml_graph_plan(self.graph, threads, None)
                self.work = torch.empty(max(1, self.plan.work_size), dtype=torch.uint8)
                self.plan.work_data = ctypes.cast(self.work.data_ptr(), ctypes.POINTER(ctypes.c_uint8))
                self.threads = threads
            self.X.contents.data = ctypes.c_void_p(x.data_ptr())
            self.Y.contents.data = ctypes.c_void_p(y.data_ptr())
            if G.ggml_graph_compute(self.graph, ctypes.byref(self.plan)) != 0:
                raise RuntimeError("ggml_graph_compute failed")

    def __del__(self):
        try:
            self.G.ggml_free(self.ctx)
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn ggml down already
            pass


_plans_lock = threading.Lock()


def ggml_linear(x: torch.Tensor, w: "QuantizedWeight", bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T (+ bias) by ggml's quantized mat-mul (8-bit activations: lossy) for small T."""
    rows, cols = w.shape
    n = x.numel() // cols
    if n > GGML_MAX_T or n == 0 or w.qtype not in GGML_TYPES:  # the exact kernels take over
        exact = native_linear if native_lib() is not None and w.qtype in NATIVE_TYPES else _torch_tiled
        return exact(x, w, bias)
    plan = w.cache.get(("ggml", n))  # graphs live as long as their weight
    if plan is None:
        with _plans_lock:
            plan = w.cache.get(("ggml", n)) or w.cache.setdefault(("ggml", n), _GgmlPlan(ggml_module(), w, n))
    xf = _flat(x, cols)
    y = torch.empty(n, rows, dtype=torch.float32)
    plan.run(xf, y, _threads(w, n))
    y = y.reshape(*x.shape[:-1], rows)
    if bias is not None:
        y += bias
    return y.to(x.dtype)


# --------------------------------------------------------------------------------- selection

def _torch_tiled(x, w, bias):
    from ocula.quant.linear import tiled_linear  # noqa: PLC0415 - linear imports this module

    return tiled_linear(x, w, bias)


KERNELS: dict[str, Callable] = {"torch": _torch_tiled, "native": native_linear, "ggml": ggml_linear}


def available() -> dict[str, bool]:
    """Which backends this process can use."""
    return {"torch": True, "native": native_lib() is not None, "ggml": ggml_module() is not None}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UnsupportedError(f"kernels={mode!r} is not supported; use one of {', '.join(MODES)}")
    if mode == "ggml" and ggml_module() is None:
        raise UnsupportedError("kernels='ggml' needs the ggml-python package: pip install 'ocula[fast]' "
                               "(it builds ggml from source; CMAKE_ARGS='-DGGML_NATIVE=ON' for this CPU)")
    return mode


@lru_cache(maxsize=None)
def kernel_name(qtype: int, device: str, dtype: torch.dtype, mode: str = "auto") -> str:
    """The backend for one weight: "ggml", "native" or "torch" (see the module docstring).

    `device` is a device type ("cpu", "cuda"). Cached: call `kernel_name.cache_clear()` after
    changing what is available (tests do)."""
    if device != "cpu" or mode == "torch":
        return "torch"
    if mode == "auto":
        mode = "ggml" if dtype != torch.float32 and ggml_module() is not None else "exact"
    if mode == "ggml" and qtype in GGML_TYPES and ggml_module() is not None:
        return "ggml"
    if qtype in NATIVE_TYPES and native_lib() is not None:
        return "native"
    return "torch"


def weight_kernel_name(w: "QuantizedWeight", dtype: torch.dtype, mode: str = "auto") -> str:
    if not w.data.is_contiguous():  # native and ggml read the raw rows by pointer
        return "torch"
    return kernel_name(w.qtype, w.data.device.type, dtype, mode)


def select_kernel(w: "QuantizedWeight", dtype: torch.dtype, mode: str = "auto") -> Callable:
    """The kernel function `(x, w, bias) -> y` for weight `w` at compute dtype `dtype`."""
    return KERNELS[weight_kernel_name(w, dtype, mode)]
