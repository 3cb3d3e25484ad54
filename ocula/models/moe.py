"""The sparse Mixture-of-Experts feed-forward that every MoE family shares.

router → gate probabilities → top-k experts per token → (renormalised) weights → SwiGLU experts →
weighted sum. Experts live in 3-D GGUF tensors (`ffn_{gate,up,down}_exps`, or the fused
`ffn_gate_up_exps` with the gate half of each expert first) that stay quantized and memory-mapped:
expert e is a zero-copy view of its rows, multiplied by the same kernels as a dense layer of its
type. Tokens are grouped by expert, so each active expert runs one GEMM over its tokens' rows and
an expert no token chose is never read.

Families differ only in `MoEConfig` (gating function, renormalisation, a shared expert) and in which
layers are sparse; a decode step on CPU runs the same routing in C (ocula/quant/decode_step.c).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from ocula.errors import GGUFError
from ocula.gguf import GGUFFile
from ocula.models.layers import gated_act
from ocula.quant import kernels, linear
from ocula.quant.cviews import CViews, Step, Unsupported
from ocula.quant.linear import QLinear, QuantizedWeight

# Experts chosen by at most this many of a prompt's tokens run in one C call (ocula_moe_experts: whole experts
# per thread, int8 mat-vecs in bf16 mode), the others as GEMMs from Python. Qwen3-30B-A3B Q4_K_M, 8 layers,
# 512-token prompts, bf16, Zen 5, 2 threads, s per prompt (medians of 5, alternating): all from Python with up
# to 32 rows as mat-vecs 2.67, the C call up to 32 rows 2.65, up to 64 rows 2.51
ROWS_AS_TOKENS = 64


@dataclass
class MoEConfig:
    n_expert: int
    n_expert_used: int  # k
    n_ff_exp: int  # rows of one expert's gate / up matrix
    gating: str = "softmax"  # probabilities from router logits: softmax over experts, or per-expert sigmoid
    norm_topk: bool = True  # divide the k chosen probabilities by their sum
    weights_scale: float = 1.0  # multiplies the final expert weights
    fused_gate_up: bool = False  # experts stored as one ffn_gate_up_exps tensor (gate half first)
    n_ff_shared: int = 0  # width of an always-on shared expert (ffn_*_shexp), 0 = none

    @property
    def gate_up_rows(self) -> int:
        """Rows of one expert's gate (and up, when fused) tensor: the first matmul's output width."""
        return (2 if self.fused_gate_up else 1) * self.n_ff_exp


def read_moe_config(f: GGUFFile, n_layer: int, *, gating: str = "softmax", norm_topk: bool = True) -> MoEConfig:
    """Expert counts from `{arch}.expert_*` and the layout of the expert tensors, checked against each other.

    Without `expert_feed_forward_length` the expert width is `feed_forward_length / expert_used_count`,
    as llama.cpp takes it."""
    arch = f.architecture

    def key(name: str, default=None):
        value = f.metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFError(f"{f.path}: required metadata key '{arch}.{name}' is missing (a MoE model needs it)")
        return value

    n_expert, k = int(key("expert_count")), int(key("expert_used_count"))
    if n_expert < 1:
        raise GGUFError(f"{f.path}: '{arch}.expert_count' is {n_expert}; a MoE model needs at least one expert")
    if not 1 <= k <= n_expert:
        raise GGUFError(f"{f.path}: '{arch}.expert_used_count' is {k}; it must be between 1 and "
                        f"'{arch}.expert_count' ({n_expert})")
    n_ff = f.metadata.get(f"{arch}.expert_feed_forward_length") or 0
    if not n_ff:  # llama.cpp's fallback for files without the key
        n_ff = int(key("feed_forward_length")) // k
    fused = f"blk.{_first_sparse(f, n_layer)}.ffn_gate_up_exps.weight" in f.tensors
    for i in range(n_layer):
        has_fused = f"blk.{i}.ffn_gate_up_exps.weight" in f.tensors
        has_split = f"blk.{i}.ffn_gate_exps.weight" in f.tensors or f"blk.{i}.ffn_up_exps.weight" in f.tensors
        if has_fused and has_split:
            raise GGUFError(f"{f.path}: layer {i} has both 'blk.{i}.ffn_gate_up_exps.weight' and split "
                            "'ffn_gate_exps' / 'ffn_up_exps' tensors; a file holds one layout")
        if (has_fused or has_split) and has_fused != fused:
            raise GGUFError(f"{f.path}: layer {i} stores its experts' gate/up "
                            f"{'fused' if has_fused else 'split'}, unlike the layers before it")
    n_shared = int(f.metadata.get(f"{arch}.expert_shared_feed_forward_length", 0) or 0)
    if not n_shared and "blk.0.ffn_up_shexp.weight" in f.tensors:
        n_shared = int(f.tensor("blk.0.ffn_up_shexp.weight").shape[0])
    return MoEConfig(n_expert, k, n_ff, gating=gating, norm_topk=norm_topk, fused_gate_up=fused,
                     n_ff_shared=n_shared)


def sparse_layers(f: GGUFFile, n_layer: int) -> tuple[bool, ...]:
    """Per layer: whether it has a router (`blk.N.ffn_gate_inp.weight`), i.e. a sparse feed-forward."""
    return tuple(f"blk.{i}.ffn_gate_inp.weight" in f.tensors for i in range(n_layer))


def _first_sparse(f: GGUFFile, n_layer: int) -> int:
    return next((i for i, s in enumerate(sparse_layers(f, n_layer)) if s), 0)


def route(logits: torch.Tensor, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] → (weights float32 [N, k], expert ids [N, k]), most probable first.

    In float32 whatever the compute dtype: the reference model routes so, and a bfloat16 softmax would
    flip near-tied choices."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1) if cfg.gating == "softmax" else torch.sigmoid(logits)
    weights, ids = torch.topk(probs, cfg.n_expert_used, dim=-1)
    if cfg.norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if cfg.weights_scale != 1.0:
        weights = weights * cfg.weights_scale
    return weights, ids


class ExpertStack(nn.Module):
    """One 3-D expert tensor of GGUF blocks, logical shape [n_expert, parts * rows, cols].

    `weight` (filled by the loader) holds every expert's rows back to back; `matrix(e)` is expert e's
    [parts * rows, cols] matrix as a zero-copy view. `kernel` is set like a QLinear's by `use_kernels`."""

    def __init__(self, n_expert: int, rows: int, cols: int):
        super().__init__()
        self.n_expert, self.rows, self.cols = n_expert, rows, cols
        self.weight: QuantizedWeight | None = None
        self.kernel = None
        self._views: list[QuantizedWeight | None] = []

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.n_expert, self.rows, self.cols

    def set_weight(self, w: QuantizedWeight) -> None:
        self.weight = w
        self._views = [None] * self.n_expert

    def matrix(self, e: int) -> QuantizedWeight:
        view = self._views[e]
        if view is None:
            w = self.weight
            view = self._views[e] = QuantizedWeight(w.data[e * self.rows:(e + 1) * self.rows], w.qtype,
                                                    (self.rows, self.cols))
        return view

    def mm(self, x: torch.Tensor, e: int) -> torch.Tensor:
        kernel = self.kernel if self.kernel is not None else linear.linear_kernel
        return kernel(x, self.matrix(e), None)

    def extra_repr(self) -> str:
        from ocula.quant.linear import _type_name  # noqa: PLC0415

        qtype = "unloaded" if self.weight is None else _type_name(self.weight.qtype)
        return f"experts={self.n_expert}, rows={self.rows}, cols={self.cols}, {qtype}"


class SharedExpert(nn.Module):
    """An always-on SwiGLU expert (`ffn_{gate,up,down}_shexp`) added to the routed experts' sum."""

    gguf_transparent = True

    def __init__(self, d: int, n_ff: int):
        super().__init__()
        self.ffn_gate_shexp = QLinear(d, n_ff)
        self.ffn_up_shexp = QLinear(d, n_ff)
        self.ffn_down_shexp = QLinear(n_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_down_shexp(gated_act(self.ffn_gate_shexp(x), self.ffn_up_shexp(x)))


class SparseMoE(nn.Module):
    """The sparse feed-forward of one layer. Its tensors keep their GGUF names (`blk.N.ffn_gate_inp`,
    `blk.N.ffn_gate_exps`, ...): the loader skips this module's own name (`gguf_transparent`)."""

    gguf_transparent = True

    def __init__(self, d: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, ff = cfg.n_expert, cfg.n_ff_exp
        self.ffn_gate_inp = QLinear(d, E)  # the router
        if cfg.fused_gate_up:
            self.ffn_gate_up_exps = ExpertStack(E, cfg.gate_up_rows, d)
        else:
            self.ffn_gate_exps = ExpertStack(E, ff, d)
            self.ffn_up_exps = ExpertStack(E, ff, d)
        self.ffn_down_exps = ExpertStack(E, d, ff)
        self.shared = SharedExpert(d, cfg.n_ff_shared) if cfg.n_ff_shared else None
        self._native: tuple | None = None  # (kernel epoch, dtype, C plan or None)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)) of expert e for the rows of x."""
        if self.cfg.fused_gate_up:
            gu = self.ffn_gate_up_exps.mm(x, e)
            ff = self.cfg.n_ff_exp
            g, u = gu[..., :ff].contiguous(), gu[..., ff:].contiguous()
        else:
            g, u = self.ffn_gate_exps.mm(x, e), self.ffn_up_exps.mm(x, e)
        return self.ffn_down_exps.mm(gated_act(g, u), e)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., d] (normed hidden states) → the feed-forward output [..., d] in h's dtype."""
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        weights, ids = route(self.ffn_gate_inp(x), self.cfg)
        out = self.combine(x, weights, ids)
        if self.shared is not None:
            out += self.shared(x).float()
        return out.to(h.dtype).reshape(shape)

    def combine(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Σ_j weights[:, j] · expert_{ids[:, j]}(x), float32 [N, d]: tokens grouped by expert, one
        matmul per active expert over its tokens, the weighted results added back in place. On CPU the
        experts with at most ROWS_AS_TOKENS rows (float32: FUSED_MAX_T) go to one C call (ocula_moe_experts),
        which spreads whole experts over the threads; the others to the kernels' GEMMs from here."""
        k = ids.shape[-1]
        flat = ids.reshape(-1)
        counts = torch.bincount(flat, minlength=self.cfg.n_expert).tolist()
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        plan = self.native_plan(x.dtype) if x.device.type == "cpu" else None
        # float32: the exact mat-vecs beat tiles + GEMM up to FUSED_MAX_T rows only
        max_rows = ROWS_AS_TOKENS if x.dtype != torch.float32 else kernels.FUSED_MAX_T
        if plan is not None and any(0 < n <= max_rows for n in counts):
            lib, _, moe_c, step = plan
            step.nthreads = torch.get_num_threads()
            xf, ids32, wf = x.float().contiguous(), flat.to(torch.int32), weights.float().contiguous()
            rc = lib.ocula_moe_experts(ctypes.byref(step), ctypes.byref(moe_c), xf.data_ptr(), x.shape[0],
                                       ids32.data_ptr(), wf.data_ptr(), max_rows, out.data_ptr())
            if rc:
                raise RuntimeError(f"ocula_moe_experts failed ({rc})")
        order = torch.argsort(flat, stable=True)
        flat_weights = weights.reshape(-1)
        start = 0
        for e, n in enumerate(counts):
            picks = order[start:start + n]
            start += n
            if n == 0 or (plan is not None and n <= max_rows):
                continue
            rows = picks // k
            xe = x.index_select(0, rows)
            y = self.expert(e, xe).reshape(n, -1).float()
            y *= flat_weights.index_select(0, picks).unsqueeze(1)
            out.index_add_(0, rows, y)
        return out

    def native_plan(self, dtype: torch.dtype):
        """(C library, views, ocula_moe, ocula_step) for this layer's experts with their kernels at compute dtype
        `dtype`, or None (no C library, a torch kernel, a shared expert); rebuilt when `use_kernels` changes
        the kernels."""
        if self._native is None or self._native[:2] != (linear.kernel_epoch, dtype):
            self._native = (linear.kernel_epoch, dtype, self._build_native(dtype))
        return self._native[2]

    def _build_native(self, dtype: torch.dtype):
        lib = kernels.native_lib()
        if lib is None or self.ffn_down_exps.weight is None or self.ffn_down_exps.weight.data.device.type != "cpu":
            return None
        views = CViews()
        try:
            moe_c = views.moe(self, dtype)
        except Unsupported:
            return None
        step = Step()
        step.d, step.moe_experts = self.ffn_down_exps.rows, self.cfg.n_expert
        step.moe_ff = self.cfg.gate_up_rows
        step.par_min, step.nthreads = kernels.PARALLEL_MIN_WORK, 1
        return lib, views, moe_c, step
