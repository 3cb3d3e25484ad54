"""Decode steps in one C call: every layer of the decoder for one new token of each sequence of a batch.

A decode step through the torch modules is ~25 small ops and 7 mat-vec calls per layer, and on a
small model that fixed cost is most of the step (SmolVLM-256M: ~0.4 ms of Python and dispatch per
layer against ~0.15 ms of weight reading). `FusedDecode` hands the whole stack to `ocula_decode_step`
(ocula/quant/decode_step.c): RMSNorms, the layers' own mat-vec kernels (exact `native`, int8
`native_q8` or int16 `native_q16`, whichever `use_kernels` gave each QLinear), q/k norms, RoPE, the KV-cache write,
attention over the cache and the MLP, with float32 activations throughout.

MoE layers (ocula.models.moe) run their sparse feed-forward in the same call: the router's mat-vec, the
gate probabilities, top-k and weights in float32 as `moe.route` computes them, then per expert that any
sequence of the batch chose, that expert's gate/up/down mat-vecs over those sequences' rows only.

It takes the blocks it knows (the Llama/Qwen pre-norm block and Gemma 3's, dense or sparse) on CPU, with native
kernels on every projection, for up to 64 sequences (the mat-vecs' row limit) whose caches share
a dtype; anything else (another block, CUDA, a torch or ggml kernel, prefill chunks, deepstack
or image-group inputs) runs the modules as before. ``OCULA_FUSED_DECODE=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import operator
import os
import weakref

import torch

from ocula.models.layers import ATTN_PARALLEL_MIN_WORK, ROPE_NEOX, KVCache
from ocula.quant import kernels, linear  # noqa: F401 - base.py reads fused_decode.linear.kernel_epoch
from ocula.quant.cviews import CViews, Lin, Moe, Step, Unsupported, c_int, c_int64, c_void_p

KV_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
NORMS = ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm")


class _Layer(ctypes.Structure):
    _fields_ = [*((name, Lin) for name in LINEARS), *((name, c_void_p) for name in NORMS), ("sliding", c_int),
                ("moe", Moe)]


class _Seq(ctypes.Structure):
    _fields_ = [("pos", c_int64), ("cos", c_void_p), ("sin", c_void_p), ("cos_local", c_void_p),
                ("sin_local", c_void_p), ("kc", c_void_p), ("vc", c_void_p), ("cap", c_void_p)]


class _CacheView:
    """The C side's pointers to one KVCache's per-layer tensors, refreshed when the cache grows."""

    def __init__(self, n_layers: int):
        self.kc, self.vc, self.cap = (c_void_p * n_layers)(), (c_void_p * n_layers)(), (c_int64 * n_layers)()
        self.tensors: list = []
        self.min_cap = 0

    def bind(self, cache: KVCache, need: int) -> None:
        if need <= self.min_cap and all(map(operator.is_, cache.k, self.tensors)):
            return
        for i in range(len(cache.k)):
            cache._ensure(i, need)
            self.kc[i], self.vc[i], self.cap[i] = cache.k[i].data_ptr(), cache.v[i].data_ptr(), cache.k[i].shape[2]
        self.tensors = list(cache.k)
        self.min_cap = min(t.shape[2] for t in cache.k)


def enabled() -> bool:
    return os.environ.get("OCULA_FUSED_DECODE", "1") != "0"


class FusedDecode:
    """The C view of one model's layers, built once per kernel assignment (`linear.kernel_epoch`)."""

    def __init__(self, model, lib, gelu: bool):
        cfg = model.cfg
        self.lib = lib
        self.c = CViews()  # builds the C structures and keeps alive what they point into
        self.layers = (_Layer * cfg.n_layer)()
        moe_ff = moe_experts = 0
        for i, blk in enumerate(model.blk):
            layer = self.layers[i]
            sparse = getattr(blk, "moe", None)
            if sparse is not None:
                layer.moe = self.c.moe(sparse, model.compute_dtype)
                moe_ff = max(moe_ff, sparse.cfg.gate_up_rows)
                moe_experts = max(moe_experts, sparse.cfg.n_expert)
            for name in LINEARS if sparse is None else LINEARS[:4]:
                setattr(layer, name, self.c.lin(getattr(blk, name), model.compute_dtype))
            for name in NORMS:
                mod = getattr(blk, name, None)
                setattr(layer, name, None if mod is None else self.c.f32(mod.weight))
            layer.sliding = int(bool(cfg.sliding_layers) and cfg.sliding_layers[i])
        self.rotaries = (model.rotary, getattr(model, "rotary_local", None))
        st = self.step = Step()
        st.d, st.n_head, st.n_kv, st.head_dim, st.n_ff = cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_ff
        st.n_rot, st.neox, st.gelu = cfg.rope.n_rot, int(cfg.rope.style == ROPE_NEOX), int(gelu)
        st.moe_ff, st.moe_experts = moe_ff, moe_experts
        st.window = cfg.sliding_window or 0
        st.eps = cfg.norm_eps
        st.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
        st.softcap = cfg.attn_softcap or 0.0
        st.par_min, st.attn_par_min = kernels.PARALLEL_MIN_WORK, ATTN_PARALLEL_MIN_WORK
        self.views: weakref.WeakKeyDictionary[KVCache, _CacheView] = weakref.WeakKeyDictionary()

    def accepts(self, caches: list[KVCache]) -> bool:
        """Whether the C step can use these caches (on CPU, all in one dtype it reads and writes)."""
        kv = KV_TYPES.get(caches[0].dtype)
        return (kv is not None and len(caches) <= kernels.Q8_MAX_ROWS and bool(self.lib.ocula_step_supports_kv(kv))
                and all(c.dtype == caches[0].dtype and torch.device(c.device).type == "cpu" for c in caches))

    def run(self, x: torch.Tensor, positions: list[torch.Tensor], caches: list[KVCache],
            expert_rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, 1, d]: each sequence's new-token input embedding → its hidden state before the final
        norm ([B, 1, d], float32); positions[b] is [1] or [n_axes, 1]. `expert_rows` (int32 [n_layers,
        n_experts], zeros): gets how many rows each MoE layer's experts multiplied in this step."""
        B = len(caches)
        st = self.step
        st.kv_type, st.nthreads = KV_TYPES[caches[0].dtype], torch.get_num_threads()
        pos = positions[0] if B == 1 else torch.cat(positions, dim=-1)
        angles = [r.angles(pos) if r is not None else None for r in self.rotaries]  # each [B, n_rot / 2]
        row = angles[0][0].shape[-1] * 4
        seqs = (_Seq * B)()
        for b, cache in enumerate(caches):
            view = self.views.get(cache)
            if view is None:
                view = self.views[cache] = _CacheView(len(self.layers))
            view.bind(cache, cache.length + 1)
            s = seqs[b]
            s.pos, s.kc, s.vc, s.cap = cache.length, ctypes.addressof(view.kc), ctypes.addressof(view.vc), ctypes.addressof(view.cap)
            s.cos, s.sin = angles[0][0].data_ptr() + b * row, angles[0][1].data_ptr() + b * row
            if angles[1] is not None:
                s.cos_local, s.sin_local = angles[1][0].data_ptr() + b * row, angles[1][1].data_ptr() + b * row
        h = x.reshape(B, -1).to(torch.float32, copy=True)
        st.expert_rows = None if expert_rows is None else expert_rows.data_ptr()
        rc = self.lib.ocula_decode_step(ctypes.byref(st), self.layers, len(self.layers), seqs, B, h.data_ptr())
        if rc:
            raise RuntimeError(f"ocula_decode_step failed ({rc})")
        for cache in caches:
            cache.advance(1)
        return h.view(B, 1, -1)


def build(model) -> FusedDecode | None:
    """The fused decode of `model`, or None where it does not apply (see the module docstring)."""
    lib = kernels.native_lib()
    if lib is None or model.output_norm.weight.device.type != "cpu":
        return None
    if model.cfg.head_dim > 4096 or model.cfg.rope.n_rot > model.cfg.head_dim or model.cfg.rope.n_rot % 2:
        return None
    # the C step mirrors exactly the forward of the block classes that declare `fused_step` themselves
    specs = {type(blk).__dict__.get("fused_step") is not None and repr(type(blk).fused_step) for blk in model.blk}
    if len(specs) != 1 or False in specs:
        return None
    try:
        return FusedDecode(model, lib, gelu=type(model.blk[0]).fused_step["gelu"])
    except Unsupported:
        return None
