"""Pieces every decoder shares: RMSNorm, rotary embeddings (normal / neox / multi-axis), KV cache, masks."""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32. GGUF stores Gemma's (1 + w) already added."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused op; .float() / .to() are no-ops for float32 activations
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


class StreamNorm(RMSNorm):
    """The RMSNorm that reads a decoder's float32 residual stream and feeds the next projection in the
    model's compute dtype (its weight's: bfloat16 in the fast mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(self.weight.dtype)


ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "quick_gelu": 2, "gelu_erf": 3}  # ocula_act's (ocula/quant/pointwise.c)


def _torch_act(x: torch.Tensor, name: str) -> torch.Tensor:
    if name in ("gelu_tanh", "gelu_erf"):
        return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")
    return F.silu(x) if name == "silu" else x * torch.sigmoid(1.702 * x)


def _c_act(x: torch.Tensor, up: torch.Tensor | None, out: torch.Tensor, name: str) -> bool:
    """out = act(x) (* up) by ocula's C kernel, if it takes these tensors (CPU, float32/bfloat16, contiguous)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or not x.is_contiguous():
        return False
    if name == "gelu_erf" and x.dtype == torch.float32:  # ours is within 1.5e-7 of erf: float32 keeps torch's
        return False
    if up is not None and (up.dtype != x.dtype or up.shape != x.shape or not up.is_contiguous()):
        return False
    from ocula.quant.kernels import native_lib  # noqa: PLC0415 - kernels imports torch only

    lib = native_lib()
    if lib is None:
        return False
    lib.ocula_act(x.data_ptr(), None if up is None else up.data_ptr(), out.data_ptr(), x.numel(),
                  int(x.dtype == torch.bfloat16), ACTIVATIONS[name], torch.get_num_threads())
    return True


def act(x: torch.Tensor, name: str, inplace: bool = False) -> torch.Tensor:
    """silu / gelu_tanh / quick_gelu / gelu_erf of x: one pass of ocula's C kernel on CPU
    (float32 and bfloat16; gelu_erf bfloat16 only). On Zen 5 torch's bf16 GELUs took 23 ms (tanh, on
    [512, 10240]) and 83-107 ms (erf, on [13325, 4096]); the kernel ~1 ms and ~15 ms in place (43 ms
    into a new tensor, mostly its page faults). `inplace`: x may be overwritten (a fresh linear output)."""
    out = x if inplace else torch.empty_like(x)
    return out if _c_act(x, None, out, name) else _torch_act(x, name)


def gated_act(gate: torch.Tensor, up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """act(gate) * up, written into `gate`: SiLU, or GELU with the tanh approximation (Gemma)."""
    name = "gelu_tanh" if gelu else "silu"
    return gate if _c_act(gate, up, gate, name) else _torch_act(gate, name).mul_(up)


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose affine parameters come from the GGUF file (names `weight` / `bias`)."""

    def __init__(self, dim: int, eps: float, bias: bool = True):
        super().__init__(dim, eps=eps, bias=bias)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


# ---------------------------------------------------------------- rotary position embeddings

ROPE_NORM = "norm"  # rotate adjacent pairs (x0, x1), (x2, x3): llama.cpp LLAMA_ROPE_TYPE_NORM
ROPE_NEOX = "neox"  # rotate the two halves (x_i, x_{i+d/2}): HF's rotate_half


@dataclass
class RopeConfig:
    n_rot: int  # rotated dimensions per head (<= head_dim)
    base: float = 10000.0
    style: str = ROPE_NEOX
    linear_factor: float = 1.0  # positions are divided by this ("linear" scaling)
    # Multi-axis RoPE (Qwen-VL): frequency i uses position axis `freq_axis[i]` (0=t, 1=h, 2=w).
    sections: tuple[int, ...] | None = None
    interleaved_sections: bool = False  # Qwen3-VL: axes alternate t,h,w across frequencies


class RopeTable:
    """The rotation for one forward's positions, laid out for q/k of shape [B, T, H, D].

    Built once per forward and shared by every layer. "neox" pairs (x_i, x_{i+n/2}):
    out = x * cos + roll(x, n/2) * sin with cos repeated over both halves and sin signed (-sin, +sin).
    "norm" pairs adjacent (x_2i, x_2i+1): a complex multiply by cos + i*sin.
    """

    def __init__(self, style: str, cos: torch.Tensor, sin: torch.Tensor):
        """cos/sin: [T, n_rot/2] (float32), or [B, T, n_rot/2] per sequence of a batch."""
        self.style = style
        self.n_rot = cos.shape[-1] * 2
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        if style == ROPE_NEOX:
            self.cos = torch.cat((cos, cos), dim=-1)
            self.sin = torch.cat((-sin, sin), dim=-1)
        else:
            self.rot = torch.complex(cos, sin)

    @classmethod
    def stack(cls, tables: list["RopeTable"]) -> "RopeTable":
        """One table for a batch: row b rotates with tables[b] (each for the same T)."""
        out = cls.__new__(cls)
        out.style, out.n_rot = tables[0].style, tables[0].n_rot
        for name in ("cos", "sin", "rot"):
            if hasattr(tables[0], name):
                setattr(out, name, torch.stack([getattr(t, name) for t in tables]))
        return out

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, D] (any float dtype) → rotated, same shape and dtype. Dims past n_rot pass through."""
        if x.shape[-1] != self.n_rot:
            return torch.cat((self.apply(x[..., : self.n_rot]), x[..., self.n_rot :]), dim=-1)
        xf = x.float()
        if self.style == ROPE_NEOX:
            out = (xf * self.cos).addcmul_(xf.roll(self.n_rot // 2, -1), self.sin)
        else:
            pairs = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))
            out = torch.view_as_real(pairs * self.rot).flatten(-2)
        return out.to(x.dtype)


class Rotary(nn.Module):
    def __init__(self, cfg: RopeConfig, freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        half = cfg.n_rot // 2
        inv_freq = 1.0 / (cfg.base ** (torch.arange(0, cfg.n_rot, 2, dtype=torch.int64).float() / cfg.n_rot))
        if freq_factors is not None:  # llama-3 style per-frequency scaling from `rope_freqs.weight`
            inv_freq = inv_freq / freq_factors.float()
        inv_freq = inv_freq / cfg.linear_factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("freq_axis", self._freq_axis(half), persistent=False)

    def _freq_axis(self, half: int) -> torch.Tensor:
        axis = torch.zeros(half, dtype=torch.long)
        sections = self.cfg.sections
        if not sections:
            return axis
        if self.cfg.interleaved_sections:
            idx = torch.arange(half)
            for a in (1, 2):
                sel = (idx % 3 == a) & (idx < 3 * sections[a])
                axis[sel] = a
            return axis
        start = 0
        for a, n in enumerate(sections):
            axis[start : start + n] = min(a, 2)
            start += n
        return axis

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] or [n_axes, T] → cos, sin of shape [T, n_rot/2] (float32)."""
        pos = positions.float()
        if pos.dim() == 1:
            freqs = pos[:, None] * self.inv_freq[None, :]
        else:  # pick the position axis of each frequency, then multiply
            per_axis = pos[:, :, None] * self.inv_freq[None, None, :]  # [A, T, half]
            axis = self.freq_axis.clamp(max=pos.shape[0] - 1)
            freqs = per_axis.gather(0, axis[None, None, :].expand(1, pos.shape[1], -1)).squeeze(0)
        return freqs.cos(), freqs.sin()

    def forward(self, positions: torch.Tensor) -> RopeTable:
        return RopeTable(self.cfg.style, *self.angles(positions))


# ---------------------------------------------------------------- KV cache


class KVCache:
    """Per-layer keys/values of one sequence, [1, n_kv_heads, capacity, head_dim].

    Storage is allocated uninitialized (only written slots are ever read, so pages a request never
    reaches are never touched) at the size `reserve` asked for, else grown on demand in powers of two.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", max_tokens: int | None = None):
        self.n_kv_heads, self.head_dim, self.dtype, self.device = n_kv_heads, head_dim, dtype, device
        self.max_tokens = max_tokens
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0  # tokens stored and visible to the next forward
        self._reserved = 0

    def reserve(self, n: int) -> None:
        """Make room for n tokens in every layer now (at most one copy), so no growth follows."""
        if self.max_tokens:
            n = min(n, max(self.max_tokens, self.length))
        self._reserved = max(self._reserved, n)
        for layer in range(len(self.k)):
            if self.k[layer] is not None and self.k[layer].shape[2] < n:
                self._grow(layer, n)

    def _ensure(self, layer: int, needed: int) -> None:
        cur = self.k[layer]
        if cur is not None and cur.shape[2] >= needed:
            return
        cap = self._reserved if needed <= self._reserved else max(256, 1 << math.ceil(math.log2(max(needed, 1))))
        if self.max_tokens:
            cap = min(max(cap, needed), max(self.max_tokens, needed))
        self._grow(layer, cap)

    def _grow(self, layer: int, cap: int) -> None:
        shape = (1, self.n_kv_heads, cap, self.head_dim)
        k = torch.empty(shape, dtype=self.dtype, device=self.device)
        v = torch.empty(shape, dtype=self.dtype, device=self.device)
        if self.k[layer] is not None and self.length:
            k[:, :, : self.length] = self.k[layer][:, :, : self.length]
            v[:, :, : self.length] = self.v[layer][:, :, : self.length]
        self.k[layer], self.v[layer] = k, v

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k/v [1, Hkv, T, D] after the stored tokens; return all keys/values so far."""
        end = self.length + k.shape[2]
        self._ensure(layer, end)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, n: int) -> None:
        """Forget everything after the first n tokens (prefix reuse)."""
        self.length = min(self.length, n)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class _Causal:
    """Mask marker: plain causal attention of a chunk that starts at cache index 0 (SDPA's is_causal)."""

    def __repr__(self) -> str:
        return "CAUSAL"


CAUSAL = _Causal()


def attention_mask(start: int, n_new: int, window: int | None = None,
                   groups: torch.Tensor | None = None, device=None) -> torch.Tensor | _Causal | None:
    """What new tokens at cache index `start` may attend to: None (everything: one query within the
    window), CAUSAL (causal from index 0), or a boolean [n_new, start + n_new] mask (True = may attend).

    Causal; `window` keeps only the last `window` keys (query itself included); tokens of the same
    non-zero `groups` id (e.g. one image) also see each other both ways.
    """
    total = start + n_new
    if n_new == 1 and (window is None or total <= window):
        return None
    if start == 0 and groups is None and (window is None or total <= window):
        return CAUSAL
    return causal_mask(start, n_new, window, groups, device)


def causal_mask(start: int, n_new: int, window: int | None = None,
                groups: torch.Tensor | None = None, device=None) -> torch.Tensor:
    total = start + n_new
    q = torch.arange(start, total, device=device)[:, None]
    k = torch.arange(total, device=device)[None, :]
    mask = k <= q
    if groups is not None:
        g = groups.to(device)
        same = (g[:, None] == g[None, :]) & (g[:, None] > 0)
        mask[:, start:] |= same
    if window is not None:
        mask &= (q - k) < window
    return mask


# query x key x head_dim products below which attention runs on one thread: waking the other
# OpenMP workers for a decode step's few keys costs more than it saves (they sleep between ops)
ATTN_PARALLEL_MIN_WORK = 1 << 20


# queries per forward up to which attention runs as plain float32 matmuls (`_attend_grouped`):
# decode steps. CPU SDPA is slow for a single query, in bfloat16 several times slower than float32.
GROUPED_MAX_T = 8


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | _Causal | None,
           scale: float, softcap: float | None = None) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, S, D] → [B, H, T, D]. Grouped-query heads are shared, not copied."""
    B, H, T, D = q.shape
    S = k.shape[2]
    if mask is CAUSAL and (softcap is not None or T <= GROUPED_MAX_T):
        mask = causal_mask(S - T, T, device=q.device)
    threads = torch.get_num_threads()
    if threads > 1 and B * H * T * S * D < ATTN_PARALLEL_MIN_WORK:
        torch.set_num_threads(1)
        try:
            return _attend(q, k, v, mask, scale, softcap)
        finally:
            torch.set_num_threads(threads)
    return _attend(q, k, v, mask, scale, softcap)


class _AttnArgs(ctypes.Structure):  # ocula_attn in ocula/quant/attention.c
    _fields_ = [("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("o", ctypes.c_void_p),
                *((name, ctypes.c_int64) for name in ("H", "Hk", "T", "S", "D")),
                *((name, ctypes.c_int64 * 3) for name in ("sq", "sk", "sv", "so")),
                ("scale", ctypes.c_float), ("causal", ctypes.c_int), ("bf16", ctypes.c_int)]


def patch_embed(pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, patch: int) -> torch.Tensor:
    """The ViT patch embedding, conv2d(pixels, weight [d, C, p, p], bias, stride=p), as one GEMM over
    the non-overlapping patches: [B, C, H, W] -> [B, (H / p) * (W / p), d], patches in row-major order.
    In weight's dtype, except bfloat16/float16 on CPUs without half-precision matrix instructions,
    which multiply in float32 (torch's bf16 conv took 1.2 s for one 448x448 InternViT image there)."""
    from ocula.quant.kernels import gemm_dtype  # noqa: PLC0415

    B, C, H, W = pixels.shape
    d, gh, gw = weight.shape[0], H // patch, W // patch
    x = pixels[:, :, : gh * patch, : gw * patch].reshape(B, C, gh, patch, gw, patch)
    x = x.permute(0, 2, 4, 1, 3, 5).reshape(B * gh * gw, C * patch * patch).to(weight.dtype)
    dtype, compute = weight.dtype, gemm_dtype(x)
    y = F.linear(x.to(compute), weight.reshape(d, -1).to(compute), None if bias is None else bias.to(compute))
    return y.to(dtype).reshape(B, gh * gw, d)


# queries from which `sdpa` takes ocula's C attention (fewer: decode steps, which have their own paths)
C_ATTENTION_MIN_T = 16
# the C attention also where torch's is faster (builds without AVX-512: ocula_attention_preferred); tests
C_ATTENTION_ALWAYS = False


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
         is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention for q [B, H, T, D] (or [H, T, D]) and k/v [B, Hk, S, D].

    Without a mask, on CPU in float32/bfloat16 with at least C_ATTENTION_MIN_T queries, on CPUs with
    AVX-512, it runs ocula's C kernel (ocula/quant/attention.c: ~3x torch's CPU SDPA there, float32
    arithmetic; with AVX2 only, torch's is ~2x faster); everything else goes to torch. `is_causal` is
    torch's (query t sees keys s <= t), so the C kernel takes it only for T == S."""
    lib = _c_attention_lib(q, k, v, attn_mask, is_causal)
    if lib is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q[None], k[None], v[None]
    B, H, T, D = q.shape
    out = torch.empty(B, T, H, D, dtype=q.dtype).transpose(1, 2)  # as torch lays it out: [B, T, H, D] memory
    a = _AttnArgs(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), H, k.shape[1], T, k.shape[2], D)
    for name, t in (("sq", q), ("sk", k), ("sv", v), ("so", out)):
        getattr(a, name)[:] = t.stride()[:3]
    a.scale = scale if scale is not None else D ** -0.5
    a.causal, a.bf16 = int(is_causal), int(q.dtype == torch.bfloat16)
    if lib.ocula_attention(ctypes.byref(a), B, torch.get_num_threads()):
        raise MemoryError("ocula_attention: out of memory for its block buffers")
    return out[0] if squeeze else out


def _c_attention_lib(q, k, v, mask, causal):
    if mask is not None or q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16):
        return None
    if k.dtype != q.dtype or v.dtype != q.dtype or q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        return None
    T, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    if T < C_ATTENTION_MIN_T or (causal and T != S) or D > 512 or v.shape[-1] != D or k.shape[-1] != D:
        return None
    if q.shape[-3] % k.shape[-3] or v.shape[-3] != k.shape[-3] or v.shape[-2] != S or q.shape[:-3] != k.shape[:-3]:
        return None
    if any(t.stride(-1) != 1 for t in (q, k, v)) or (q.dim() == 4 and q.shape[0] != k.shape[0]):
        return None
    from ocula.quant.kernels import native_lib  # noqa: PLC0415

    lib = native_lib()
    return lib if lib is not None and (C_ATTENTION_ALWAYS or lib.ocula_attention_preferred()) else None


def _attend(q, k, v, mask, scale, softcap):
    if softcap is not None or q.shape[2] <= GROUPED_MAX_T:
        return _attend_grouped(q, k, v, mask, scale, softcap)
    causal = mask is CAUSAL
    return sdpa(q, k, v, attn_mask=None if causal else mask, is_causal=causal, scale=scale,
                enable_gqa=k.shape[1] != q.shape[1])


def _attend_grouped(q, k, v, mask, scale, softcap):
    """Attention as float32 matmuls, the query heads that share a KV head stacked as rows of one matrix."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = H // Hkv
    scores = torch.matmul(q.float().reshape(B, Hkv, rep * T, D), k.float().transpose(-1, -2)).mul_(scale)
    if softcap is not None:
        scores = torch.tanh(scores.div_(softcap)).mul_(softcap)
    if mask is not None:  # [T, S], True = may attend
        scores = scores.view(B, Hkv, rep, T, S).masked_fill_(~mask, float("-inf")).view(B, Hkv, rep * T, S)
    out = torch.matmul(scores.softmax(-1), v.float())
    return out.view(B, H, T, v.shape[-1]).to(q.dtype)
