"""Micro-benchmark of the native fused mat-vec: ms per call and GB/s of weights read.

    python benchmarks/kernels.py                                  # default types and shapes, 2 threads
    python benchmarks/kernels.py --types Q4_K,Q6_K --shapes 2048x11008 --T 1,4
    python benchmarks/kernels.py --kernel exact,q8,q16            # also the int8 / int16-activation kernels
    python benchmarks/kernels.py --source old.c                   # also time another build of kernels.c
    git show HEAD~1:ocula/quant/kernels.c > /tmp/old.c            # (e.g. the previous kernel)

`--kernel`: exact = `ocula_matmul` (float32 x, exact weights), q8 = `ocula_matmul_q8` (x quantized to
int8, lossy), q16 = `ocula_matmul_q16` (x quantized to int16), gemm16 = `ocula_gemm_q16` (the int16
prefill GEMM), tiles = this process's float32 tiles + torch GEMM (x in bfloat16; the current build
only); types a build has no such kernel for show "-".

    python benchmarks/kernels.py --types Q4_K,Q6_K --shapes 11008x2048 --T 16,64,512 --kernel tiles,gemm16 --no-probe

Shapes are rows x cols of the weight (y = W x: 2048x11008 is ffn_down of a 3B model). Each weight
is random blocks with finite scales; enough copies are cycled that the set exceeds the last-level
cache, so the timings are DRAM-bound as in real decoding. A streaming-read probe (AVX loads of a
1 GiB buffer, same threads) gives the memory bandwidth to compare against.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ocula  # noqa: F401,I001 - first: sets ocula's OpenMP wait policy before torch loads libgomp
import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from ocula.quant import kernels
from ocula.quant.linear import QuantizedWeight

SCALE_FIELDS = {QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q8_0: (0,),
                QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}
FLOATS = {QT.F32: 4, QT.F16: 2, QT.BF16: 2}
SET_BYTES = 384 << 20  # bytes of weight copies cycled per measurement (> L3)

PROBE_C = r"""
#include <stdint.h>
#include <stddef.h>
#include <string.h>
typedef int64_t v8 __attribute__((vector_size(64)));
/* unaligned loads: numpy's buffer is 16-byte aligned, and without AVX-512 a 64-byte vector is two
 * aligned 32-byte moves */
static inline v8 ld(const v8 *p) { v8 v; memcpy(&v, p, 64); return v; }
int64_t stream_read(const v8 *p, size_t n, int nthreads) {
    v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    #pragma omp parallel for num_threads(nthreads) reduction(+:s0, s1, s2, s3) schedule(static)
    for (size_t i = 0; i < n; i += 4) { s0 += ld(p + i); s1 += ld(p + i + 1); s2 += ld(p + i + 2); s3 += ld(p + i + 3); }
    v8 s = s0 + s1 + s2 + s3; int64_t t = 0;
    for (int i = 0; i < 8; i++) t += s[i];
    return t;
}
"""


def build(source: str, name: str, tmp: Path) -> ctypes.CDLL:
    src, out = tmp / f"{name}.c", tmp / f"{name}.so"
    src.write_text(source)
    err = kernels._compile(os.environ.get("CC", "cc"), src, out)
    if err:
        sys.exit(f"build of {name} failed: {err}")
    lib = ctypes.CDLL(str(out))
    return lib


ENTRY = {"exact": "ocula_matmul", "q8": "ocula_matmul_q8", "q16": "ocula_matmul_q16", "gemm16": "ocula_gemm_q16"}
TILES = "tiles"  # the prefill path this process would take without the C GEMMs: float32 tiles + torch GEMM


def setup_kernels(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ocula_matmul.argtypes = [i32, p, i64, i64, i64, p, i64, p, i32]
    for name in ENTRY.values():
        if hasattr(lib, name):
            getattr(lib, name).argtypes = [i32, p, i64, i64, i64, p, i64, p, i32]
    lib.ocula_init()
    return lib


def random_blocks(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    if qtype in FLOATS:
        w = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
        if qtype == QT.F16:
            w = w.astype(np.float16)
        elif qtype == QT.BF16:
            w = (w.view(np.uint32) >> 16).astype(np.uint16)
        return w.view(np.uint8).reshape(rows, -1)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        scale = (10.0 ** rng.uniform(-3, -2, len(raw))).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)




def time_calls(fn, qtype, weights, cols, x, y, T, threads, reps) -> list[float] | None:
    """Seconds per call, or None when `fn` has no kernel for this type (q8, q16)."""
    rows, rb = weights[0].shape
    times = []
    for rep in range(reps + 1):
        w = weights[rep % len(weights)]
        t0 = time.perf_counter()
        if fn == TILES:
            rc = 0
            kernels.tiles_gemm(x.bfloat16(), QuantizedWeight(torch.from_numpy(w), int(qtype), (rows, cols)), None)
        else:
            rc = fn(int(qtype), w.ctypes.data, rows, cols, rb, x.data_ptr(), T, y.data_ptr(), threads)
        dt = time.perf_counter() - t0
        if rc:
            return None
        if rep:  # the first call warms up (page faults, OpenMP team)
            times.append(dt)
    return times


def bandwidth(probe, threads: int, reps: int = 5) -> float:
    buf = np.ones(1 << 27, dtype=np.int64)  # 1 GiB
    probe.stream_read(buf.ctypes.data, buf.size // 8, threads)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        probe.stream_read(buf.ctypes.data, buf.size // 8, threads)
        times.append(time.perf_counter() - t0)
    return buf.nbytes / statistics.median(times) / 1e9


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q4_K,Q6_K,Q8_0,F16,Q5_K,Q4_0,Q5_0")
    ap.add_argument("--shapes", default="2048x11008,11008x2048,151936x2048")
    ap.add_argument("--T", default="1", help="rows of x per call, comma-separated")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--kernel", default="exact", help="exact, q8, q16, gemm16, tiles or several (exact,q8), per build")
    ap.add_argument("--source", action="append", default=[], help="another kernels.c to time too")
    ap.add_argument("--best", action="store_true", help="fastest call instead of the median (busy machines)")
    ap.add_argument("--cached", action="store_true", help="one copy of each weight: cache-resident when "
                    "small, which measures the kernel's compute rate rather than DRAM")
    ap.add_argument("--no-probe", action="store_true")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        libs = {"current": setup_kernels(build(kernels._C_SOURCE, "current", Path(tmp)))}
        for i, path in enumerate(args.source):
            libs[Path(path).name] = setup_kernels(build(Path(path).read_text(), f"other{i}", Path(tmp)))
        if not args.no_probe:
            probe = build(PROBE_C, "probe", Path(tmp))
            probe.stream_read.restype = ctypes.c_int64
            probe.stream_read.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            print(f"stream-read probe, {args.threads} threads: {bandwidth(probe, args.threads):.1f} GB/s")
        kinds = args.kernel.split(",")
        columns = [(f"{n} {k}" if len(libs) > 1 else k, TILES if k == TILES else getattr(lib, ENTRY[k], None))
                   for n, lib in libs.items() for k in kinds if k != TILES or n == "current"]
        rng = np.random.default_rng(0)
        print(f"{'type':6} {'shape':>12} {'T':>2} " + " ".join(f"{n + ' ms':>14} {'GB/s':>6}" for n, _ in columns))
        for name in args.types.split(","):
            qtype = QT[name]
            for shape in args.shapes.split(","):
                rows, cols = map(int, shape.split("x"))
                first = random_blocks(qtype, rows, cols, rng)
                copies = 1 if args.cached else max(1, min(8, SET_BYTES // first.nbytes))
                weights = [first] + [np.roll(first, i + 1, axis=0) for i in range(copies - 1)]
                for T in map(int, args.T.split(",")):
                    x = torch.randn(T, cols)
                    y = torch.empty(T, rows)
                    cells = []
                    for _, fn in columns:
                        times = fn and time_calls(fn, qtype, weights, cols, x, y, T, args.threads, args.reps)
                        if not times:
                            cells.append(f"{'-':>14} {'-':>6}")
                            continue
                        ms = (min(times) if args.best else statistics.median(times)) * 1e3
                        cells.append(f"{ms:14.3f} {first.nbytes / ms / 1e6:6.1f}")
                    print(f"{name:6} {shape:>12} {T:2d} " + " ".join(cells), flush=True)
                del weights, first


if __name__ == "__main__":
    main()
