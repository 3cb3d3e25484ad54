"""Matmul kernels that compute ``x @ W.T`` straight from GGUF blocks (no float copy of the weight).

Four backends; `select_kernel` picks one per layer at load time from (qtype, device, dtype, mode):

``torch``   `linear.tiled_linear`: dequantize row tiles with ocula.quant.dequant, then torch GEMM.
            Every type, every device (CUDA uses it). Exact. Slow on CPU for decode.
``native``  Our C (`kernels.c` beside this file), compiled on first use with the system C compiler
            (``$CC``, default ``cc``; ``-O3 -march=native -fopenmp``) into ``~/.cache/ocula/kernels``,
            loaded with ctypes. Exact: weights decode to the very float32 values ocula.quant.dequant
            gives, products and sums are float32; only the summation order differs from torch's GEMM
            (≈1e-6 relative). T <= FUSED_MAX_T rows: one fused decode+dot pass over the blocks
            (decode steps, short prefill chunks); more rows: C decodes row tiles to float32/bfloat16
            and torch's GEMM multiplies (prefill).
            Types: F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K..Q6_K. Disabled by ``OCULA_NATIVE=0``.
``native_q8`` The same C library's int8-activation mat-vec (`ocula_matmul_q8`), the llama.cpp approach
            without ggml: each row of x is quantized once per call to int8 (one scale per 256 values
            for K-quants, per 32 for Q4_0/Q5_0/Q8_0), then integer dot products on the weight blocks
            (AVX-512 VNNI, or AVX2 vpmaddubsw) with the block scales applied in float. LOSSY like ggml,
            ≈1e-2 of max |y| on random data (see tests/test_kernels.py); ~2-3x the exact kernel's
            speed for decode.
            Decode steps only: T <= Q8_MAX_T rows, or up to Q8_MAX_ROWS sequences of a batch
            decoding one token each. Prefill chunks go to the int16 GEMM (below) where it exists,
            else to native (exact). Types: Q4_0 Q5_0 Q8_0 Q4_K Q5_K Q6_K, on x86 CPUs with AVX-512
            VNNI or AVX2 (others use native).
``native_q16`` The same with x quantized to int16 (one scale per 256 values; `ocula_matmul_q16`):
            its rounding of x is about bfloat16's, ≈1e-4 of max |y|. On AVX2 CPUs without AVX-512,
            where the exact kernels convert every weight to float and run at half the int8 speed.
            Types: Q4_K Q5_K Q6_K; the same row limits as native_q8; its prefill chunks of up to
            FUSED_MAX_T rows go to the int16 mat-vecs, longer ones to native (exact).
            The int16 GEMM (`ocula_gemm_q16`, same builds, x rounded the same way; Q4_K Q5_K Q6_K
            Q4_0 Q5_0 Q8_0) takes native_q8's prefill chunks at any length, and up to
            GEMM16_SHORT_GROUP_MAX_T rows where 256 does not divide a row (576, 896): it decodes 16
            rows of W at a time to int16 and runs every row of x through them (vpmaddwd), 1.1-2.5x
            the float32 tiles + GEMM (11008 x 2048, 16-512 rows, 2 threads, AVX2 Zen 4).
``ggml``    ggml's own CPU mat-mul through the optional ``ggml-python`` package (``pip install
            'ocula[fast]'``), zero-copy on the mmap'd blocks. LOSSY: like llama.cpp it quantizes the
            activations to 8 bit (Q8_0/Q8_K) first, ≈1e-2 relative error. Used for T <= GGML_MAX_T;
            larger T goes to the native/torch tile path.

Modes (``ocula.load(..., kernels=...)``): ``"exact"`` native, else torch; ``"q8"`` native_q8, else
exact; ``"q16"`` native_q16, else exact; ``"ggml"`` ggml, else exact; ``"torch"`` torch only;
``"auto"``: float32 compute dtype -> exact (float32 results always stay exact); other dtypes -> ggml
when ggml-python is installed, else native_q8 (where it has the type and the CPU has AVX2 or VNNI),
else exact; `use_kernels` gives the layers of `linear.FINE_IN_AUTO` (ffn_down) "q16" instead.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
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

MODES = ("auto", "exact", "q8", "q16", "ggml", "torch")
# native: fused decode+dot up to this many rows of x, tiles + GEMM above. Measured on Q4_K/Q6_K/Q8_0
# 11008 x 2048 (Intel Xeon with AMX, 2 threads), fused vs tiles ms: 8 rows 2.9-3.4 vs 7.5-10 (bf16 tiles)
# and 11.5 (f32); 16 rows 5.5-5.8 vs 7.6-9.6 / 11.5; 32 rows 10.6-11.2 vs 8.0-10.2 / 13.1. The tile
# path's cost is mostly decoding the whole weight, whatever the row count; the fused kernel's grows
# with the rows. Short prefill chunks (a chat turn's new tokens) stay exact and skip that decode.
FUSED_MAX_T = 16
Q8_MAX_T = 6  # native_q8: rows of x for a decode step (prefill chunks above this go to native)
GGML_MAX_T = 8    # ggml: its mat-mul up to this many rows; above, tiles + GEMM win (measured)
# native_q8: rows of x per call for batched decode steps (the C kernel's limit). On Qwen2.5-VL-3B
# Q4_K_M it beats bf16 tiles + GEMM up to 64 rows (8 rows: 263 vs 941 ms, 64: 1.66 vs 1.78 s)
Q8_MAX_ROWS = 64
# int16 GEMM: rows of x per call up to which it also takes weights whose rows end in a group shorter
# than 256 (32-value blocks, 576 / 896 columns). Q5_0 4864 x 896 against float32 tiles + GEMM, ms:
# 16 rows 1.5 vs 2.9, 128: 7.3 vs 8.6, 512: 28.3 vs 29.6; but 896 x 896 at 512: 6.6 vs 5.6, and whole
# 512-token prefills of InternVL3-1B / SmolVLM-256M ran 8% slower with it.
GEMM16_SHORT_GROUP_MAX_T = 128
PARALLEL_MIN_WORK = 1 << 19  # weight elements x rows below which one thread beats a fork/join
TILE_ELEMS = 1 << 22  # dequantized elements per tile on the GEMM path (16 MiB as float32)

NATIVE_TYPES = frozenset({0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30})
# ggml types whose CPU mat-mul ggml-python 0.0.45 runs (IQ*, TQ*, MXFP4 too; F32 is left to native)
GGML_TYPES = frozenset({1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23, 29,
                        30, 34, 35, 39})

# one library, in this order: the mat-vecs (kernels.c: generic; matvec[_q8]_avx512.c: AVX-512 (VNNI);
# matvec[_q8|_q16]_avx2.c: AVX2 where AVX-512 is absent; dispatch.c: the entry points), the MLP activations
# (pointwise.c), attention for many queries (attention.c) and the decoder step built on them (decode_step.c)
C_FILES = ("kernels.c", "matvec_avx512.c", "matvec_q8_avx512.c", "matvec_avx2.c", "matvec_q8_avx2.c",
           "matvec_q16_avx2.c", "gemm_q16_avx2.c", "dispatch.c", "pointwise.c", "attention.c", "decode_step.c")
_C_SOURCE = "\n".join(Path(__file__).with_name(name).read_text() for name in C_FILES)


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


# -fno-trapping-math: FP exceptions are never looked at, and without it GCC keeps selects (the clamps
# of exp_f32) as branches, so the loops around them stay scalar
CFLAGS = ("-O3", "-std=gnu11", "-fno-trapping-math", "-shared", "-fPIC")


def _extra_flags() -> list[str]:
    """$OCULA_NATIVE_FLAGS, after -march=native: e.g. "-mno-avx512f" builds the AVX2 kernels on an
    AVX-512 CPU (tests/test_kernels.py runs them so; also for comparing the two)."""
    return os.environ.get("OCULA_NATIVE_FLAGS", "").split()


def _compile(cc: str, src: Path, out: Path) -> str | None:
    """Build `out` from `src`, dropping OpenMP, then -march=native, if the compiler refuses them."""
    base = list(CFLAGS)
    last = ""
    for extra in (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], []):
        try:
            cmd = [cc, *base, *extra, *_extra_flags(), "-o", str(out), str(src), "-lm"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
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
    key = hashlib.sha256(f"{_C_SOURCE}\0{cc}\0{CFLAGS}{_extra_flags()}\0{_cpu_id()}".encode()).hexdigest()[:16]
    path = _cache_dir() / f"ocula_kernels_{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
                src.write_text(_C_SOURCE)
                # a few seconds, once per machine: say why the first load is slow
                print(f"ocula: compiling the C kernels for this CPU with {Path(cc).name} (first run only; cached in "
                      f"{path.parent})", file=sys.stderr, flush=True)
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
    lib.ocula_matmul_q8.argtypes = [i32, p, i64, i64, i64, p, i64, p, i32]
    lib.ocula_q8_supports.argtypes = [i32]
    lib.ocula_matmul_q16.argtypes = [i32, p, i64, i64, i64, p, i64, p, i32]
    lib.ocula_gemm_q16.argtypes = [i32, p, i64, i64, i64, p, i64, p, i32]
    lib.ocula_gemm_q16_supports.argtypes = [i32]
    lib.ocula_q16_supports.argtypes = [i32]
    lib.ocula_step_supports_kv.argtypes = [i32]
    lib.ocula_decode_step.argtypes = [p, p, i32, p, i64, p]
    lib.ocula_moe_experts.argtypes = [p, p, p, i64, p, p, i64, p]
    lib.ocula_act.argtypes = [p, p, p, i64, i32, i32, i32]
    lib.ocula_act.restype = None
    lib.ocula_attention.argtypes = [p, i64, i32]
    lib.ocula_attention_preferred.argtypes = []
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


@lru_cache(maxsize=None)
def half_gemm_is_native(dtype: torch.dtype) -> bool:
    """Whether this x86 CPU multiplies bfloat16 (AVX512-BF16, AMX) or float16 (AMX-FP16) matrices in
    hardware. Without, oneDNN converts every block, and a bf16 GEMM ran at 26 GFLOP/s against float32's
    108 (AVX2-only Zen 4, 2 threads): tiles_gemm then multiplies in float32. Other CPUs: assumed so."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    cpu = torch.cpu
    try:
        if dtype == torch.bfloat16:
            return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
        return bool(cpu._is_amx_fp16_supported())
    except AttributeError:  # an older torch: keep the half GEMM
        return True


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype to multiply x in: its own, but float32 for bfloat16/float16 on CPUs without matrix
    instructions for it (the result is then rounded back to x's dtype)."""
    if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and not half_gemm_is_native(x.dtype):
        return torch.float32
    return x.dtype


def tiles_gemm(x: torch.Tensor, w: "QuantizedWeight", bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T for many rows of x: C-decoded row tiles (in x's float32/bfloat16) times torch GEMM
    (in gemm_dtype(x), rounded back)."""
    if gemm_dtype(x) != x.dtype:
        return tiles_gemm(x.float(), w, None if bias is None else bias.float()).to(x.dtype)
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
    return _fused(native_lib().ocula_matmul, x, w, bias, n)


def _fused(entry, x: torch.Tensor, w: "QuantizedWeight", bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """One call of a C mat-vec `entry(type, W, rows, cols, row_bytes, X, n, Y, threads)` for the n rows of x."""
    rows, cols = w.shape
    xf = _flat(x, cols)
    y = torch.empty(n, rows, dtype=torch.float32)
    if entry(w.qtype, w.data.data_ptr(), rows, cols, w.data.shape[1], xf.data_ptr(), n, y.data_ptr(),
             _threads(w, n)):
        raise UnsupportedError(f"native kernels cannot multiply GGML type {w.qtype}")
    y = y.reshape(*x.shape[:-1], rows)
    if bias is not None:
        y += bias
    return y.to(x.dtype)


@lru_cache(maxsize=None)
def q8_supported(qtype: int) -> bool:
    """Whether the compiled library has an int8-activation kernel for `qtype` (AVX-512 VNNI or AVX2)."""
    lib = native_lib()
    return lib is not None and bool(lib.ocula_q8_supports(qtype))


@lru_cache(maxsize=None)
def q16_supported(qtype: int) -> bool:
    """Whether the compiled library has an int16-activation kernel for `qtype` (AVX2 builds)."""
    lib = native_lib()
    return lib is not None and bool(lib.ocula_q16_supports(qtype))


@lru_cache(maxsize=None)
def gemm16_supported(qtype: int) -> bool:
    """Whether the compiled library has the int16-activation GEMM for `qtype` (AVX2 builds)."""
    lib = native_lib()
    return lib is not None and bool(lib.ocula_gemm_q16_supports(qtype))


def _quantized_x_linear(entry_name: str, supported: Callable[[int], bool], x: torch.Tensor,
                        w: "QuantizedWeight", bias: torch.Tensor | None, gemm16: bool) -> torch.Tensor:
    cols = w.shape[1]
    n = x.numel() // cols
    one_token_each = x.dim() >= 3 and x.shape[-2] == 1
    if 0 < n <= (Q8_MAX_ROWS if one_token_each else Q8_MAX_T) and supported(w.qtype):
        return _fused(getattr(native_lib(), entry_name), x, w, bias, n)
    # prefill chunks: int16 x rounds about as bfloat16 does. The int16 GEMM (AVX2 builds) decodes each
    # weight once per call; beyond FUSED_MAX_T rows it replaces a float32 GEMM over weights decoded to
    # float32, not a native half-precision one
    if (gemm16 and n > 0 and gemm16_supported(w.qtype) and (cols % 256 == 0 or n <= GEMM16_SHORT_GROUP_MAX_T)
            and (n <= FUSED_MAX_T or gemm_dtype(x) == torch.float32)):
        return _fused(native_lib().ocula_gemm_q16, x, w, bias, n)
    if 0 < n <= FUSED_MAX_T and q16_supported(w.qtype):
        # where the int16 mat-vecs exist (AVX2) they take 0.4-0.65x the exact fused kernels' time
        return _fused(native_lib().ocula_matmul_q16, x, w, bias, n)
    return native_linear(x, w, bias)


def q8_linear(x: torch.Tensor, w: "QuantizedWeight", bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T (+ bias) with x quantized to int8 (lossy, ≈1e-2) for decode steps: up to Q8_MAX_T
    rows of x, or up to Q8_MAX_ROWS when x is [..., 1, cols] (one new token for each of a batch of
    sequences). Each row is quantized on its own, so a sequence decoded in a batch gets what it gets
    alone. Prefill chunks (and types without a q8 kernel) go to the int16 GEMM where this build has it
    for the type (AVX2: K-quants, Q4_0, Q5_0, Q8_0; at any length, as it beats a float32 GEMM; up to
    GEMM16_SHORT_GROUP_MAX_T rows when 256 does not divide a row), else up to
    FUSED_MAX_T rows to the int16 mat-vecs, else to the exact `native_linear`."""
    return _quantized_x_linear("ocula_matmul_q8", q8_supported, x, w, bias, gemm16=True)


def q16_linear(x: torch.Tensor, w: "QuantizedWeight", bias: torch.Tensor | None) -> torch.Tensor:
    """As `q8_linear`, with x quantized to int16 (≈1e-4 of max |y|: about what bfloat16 x costs), but
    prefill chunks skip the int16 GEMM. These are the layers whose inputs have heavy tails (ffn_down:
    max |x| 150-1850x the median on Gemma 3 270M), kept off it to be safe: that model in bf16, fed HF's
    greedy tokens after a 17-token prompt, has a near-tie step whose max logit error moved between 3.6%
    and 5.2% of the range (the test's limit: 5%) with how the prompt's ffn_down inputs were rounded;
    5.2% with them through the GEMM, 4.3% with them exact and every other layer on the GEMM."""
    return _quantized_x_linear("ocula_matmul_q16", q16_supported, x, w, bias, gemm16=False)


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


KERNELS: dict[str, Callable] = {"torch": _torch_tiled, "native": native_linear, "native_q8": q8_linear,
                                 "native_q16": q16_linear, "ggml": ggml_linear}


def available() -> dict[str, bool]:
    """Which backends this process can use (native_q8 / native_q16: for their types, see
    `q8_supported`, `q16_supported`)."""
    return {"torch": True, "native": native_lib() is not None, "native_q8": q8_supported(12),
            "native_q16": q16_supported(12), "ggml": ggml_module() is not None}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UnsupportedError(f"kernels={mode!r} is not supported; use one of {', '.join(MODES)}")
    if mode == "ggml" and ggml_module() is None:
        raise UnsupportedError("kernels='ggml' needs the ggml-python package: pip install 'ocula[fast]' "
                               "(it builds ggml from source; CMAKE_ARGS='-DGGML_NATIVE=ON' for this CPU)")
    return mode


@lru_cache(maxsize=None)
def kernel_name(qtype: int, device: str, dtype: torch.dtype, mode: str = "auto") -> str:
    """The backend for one weight: "ggml", "native_q8", "native_q16", "native" or "torch" (see the
    module docstring).

    `device` is a device type ("cpu", "cuda"). Cached: call `kernel_name.cache_clear()` after
    changing what is available (tests do)."""
    if device != "cpu" or mode == "torch":
        return "torch"
    if mode == "auto":
        mode = "exact" if dtype == torch.float32 else "ggml" if ggml_module() is not None else "q8"
    if mode == "ggml" and qtype in GGML_TYPES and ggml_module() is not None:
        return "ggml"
    if mode == "q8" and q8_supported(qtype):
        return "native_q8"
    if mode == "q16" and q16_supported(qtype):
        return "native_q16"
    if qtype in NATIVE_TYPES and native_lib() is not None:
        return "native"
    return "torch"


def weight_kernel_name(w: "QuantizedWeight", dtype: torch.dtype, mode: str = "auto") -> str:
    # native and ggml read the raw rows by pointer, and native takes float rows (F32/F16/BF16) in
    # pieces of 32 values: other row lengths (e.g. Qwen2.5-VL's 3420-wide ffn_down) go to torch
    if not w.data.is_contiguous() or w.shape[1] % 32:
        return "torch"
    return kernel_name(w.qtype, w.data.device.type, dtype, mode)


def select_kernel(w: "QuantizedWeight", dtype: torch.dtype, mode: str = "auto") -> Callable:
    """The kernel function `(x, w, bias) -> y` for weight `w` at compute dtype `dtype`."""
    return KERNELS[weight_kernel_name(w, dtype, mode)]
