"""ctypes views of the C library's layer structures (decode_step.c): a linear layer's blocks, a MoE feed-forward,
the decode step's shapes. `CViews` builds them from the torch modules and keeps alive the float32 copies they
point into."""
from __future__ import annotations

import ctypes

import torch

from ocula.quant import kernels, linear

c_int, c_int64, c_float, c_void_p = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
GATINGS = ("softmax", "sigmoid")  # ocula_moe.gating


class Lin(ctypes.Structure):
    _fields_ = [("type", c_int), ("xbits", c_int), ("w", c_void_p), ("rows", c_int64), ("cols", c_int64),
                ("rb", c_int64), ("bias", c_void_p)]


class Moe(ctypes.Structure):
    _fields_ = [("router", Lin), ("gate", Lin), ("up", Lin), ("down", Lin), ("n_expert", c_int), ("n_used", c_int),
                ("gating", c_int), ("norm_topk", c_int), ("fused_gate_up", c_int), ("weights_scale", c_float)]


class Step(ctypes.Structure):
    _fields_ = [("d", c_int64), ("n_head", c_int64), ("n_kv", c_int64), ("head_dim", c_int64),
                ("n_ff", c_int64), ("n_rot", c_int64), ("moe_ff", c_int64), ("moe_experts", c_int64), ("window", c_int64),
                ("eps", c_float), ("scale", c_float), ("softcap", c_float),
                ("neox", c_int), ("gelu", c_int), ("kv_type", c_int), ("nthreads", c_int),
                ("par_min", c_int64), ("attn_par_min", c_int64), ("expert_rows", c_void_p)]


class Unsupported(Exception):
    """A module the C structures cannot describe (another kernel, a shared expert): callers use torch."""


class CViews:
    def __init__(self):
        self.keep: list[torch.Tensor] = []  # float32 copies the C side points into

    def f32(self, t: torch.Tensor) -> int:
        t = t.detach().to(torch.float32).contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def lin(self, mod, dtype: torch.dtype) -> Lin:
        """A QLinear or expert stack with the mat-vec its kernel assignment implies (exact, int8 or int16 x)."""
        w = mod.weight
        if mod.kernel is None and linear.linear_kernel is not linear.default_linear:
            raise Unsupported("the module-wide linear kernel is replaced")
        kernel = mod.kernel or kernels.select_kernel(w, dtype, linear.DEFAULT_MODE)
        xbits = (8 if kernel is kernels.q8_linear and kernels.q8_supported(w.qtype)
                 else 16 if kernel is kernels.q16_linear and kernels.q16_supported(w.qtype) else 0)
        if kernel not in (kernels.native_linear, kernels.q8_linear, kernels.q16_linear) or kernels.weight_kernel_name(
                w, torch.float32, "exact") != "native":
            raise Unsupported(f"{getattr(kernel, '__name__', kernel)} kernel on a {w.shape} weight")
        bias = None if getattr(mod, "bias", None) is None else self.f32(mod.bias)
        return Lin(w.qtype, xbits, w.data.data_ptr(), w.shape[0], w.shape[1], w.data.shape[1], bias)

    def moe(self, sparse, dtype: torch.dtype) -> Moe:
        """A SparseMoE (ocula.models.moe) without a shared expert."""
        cfg = sparse.cfg
        if sparse.shared is not None:
            raise Unsupported("a shared expert")
        if cfg.gating not in GATINGS:
            raise Unsupported(f"gating {cfg.gating!r}")
        stacks = (sparse.ffn_gate_up_exps, None) if cfg.fused_gate_up else (sparse.ffn_gate_exps, sparse.ffn_up_exps)
        return Moe(self.lin(sparse.ffn_gate_inp, dtype), self.lin(stacks[0], dtype),
                   Lin() if stacks[1] is None else self.lin(stacks[1], dtype), self.lin(sparse.ffn_down_exps, dtype),
                   cfg.n_expert, cfg.n_expert_used, GATINGS.index(cfg.gating), int(cfg.norm_topk),
                   int(cfg.fused_gate_up), cfg.weights_scale)
