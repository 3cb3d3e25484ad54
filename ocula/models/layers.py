"""Pieces every decoder shares: RMSNorm, rotary embeddings (normal / neox / multi-axis), KV cache, masks."""
from __future__ import annotations

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
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


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

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] or [n_axes, T] → cos, sin of shape [T, n_rot/2] (float32)."""
        pos = positions.float()
        if pos.dim() == 1:
            freqs = pos[:, None] * self.inv_freq[None, :]
        else:  # pick the position axis of each frequency, then multiply
            per_axis = pos[:, :, None] * self.inv_freq[None, None, :]  # [A, T, half]
            axis = self.freq_axis.clamp(max=pos.shape[0] - 1)
            freqs = per_axis.gather(0, axis[None, None, :].expand(1, pos.shape[1], -1)).squeeze(0)
        return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, n_rot/2]. Dimensions past n_rot pass through."""
    n_rot = cos.shape[-1] * 2
    rot, rest = x[..., :n_rot].float(), x[..., n_rot:]
    if style == ROPE_NEOX:
        x1, x2 = rot[..., : n_rot // 2], rot[..., n_rot // 2 :]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    out = out.to(x.dtype)
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


# ---------------------------------------------------------------- KV cache


class KVCache:
    """Per-layer keys/values of one sequence, [1, n_kv_heads, capacity, head_dim], grown on demand."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", max_tokens: int | None = None):
        self.n_kv_heads, self.head_dim, self.dtype, self.device = n_kv_heads, head_dim, dtype, device
        self.max_tokens = max_tokens
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0  # tokens stored and visible to the next forward

    def _ensure(self, layer: int, needed: int) -> None:
        cur = self.k[layer]
        if cur is not None and cur.shape[2] >= needed:
            return
        cap = max(256, 1 << math.ceil(math.log2(max(needed, 1))))
        if self.max_tokens:
            cap = min(max(cap, needed), max(self.max_tokens, needed))
        shape = (1, self.n_kv_heads, cap, self.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if cur is not None:
            k[:, :, : self.length] = cur[:, :, : self.length]
            v[:, :, : self.length] = self.v[layer][:, :, : self.length]
        self.k[layer], self.v[layer] = k, v

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k/v [1, Hkv, T, D] after the stored tokens; return all keys/values so far."""
        end = self.length + k.shape[2]
        self._ensure(layer, end)
        self.k[layer][:, :, self.length : end] = k.to(self.dtype)
        self.v[layer][:, :, self.length : end] = v.to(self.dtype)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, n: int) -> None:
        """Forget everything after the first n tokens (prefix reuse)."""
        self.length = min(self.length, n)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


def attention_mask(start: int, n_new: int, window: int | None = None,
                   groups: torch.Tensor | None = None, device=None) -> torch.Tensor | None:
    """Boolean [n_new, start + n_new] mask (True = may attend) for new tokens at cache index `start`.

    Causal; `window` keeps only the last `window` keys (query itself included); tokens of the same
    non-zero `groups` id (e.g. one image) also see each other both ways.
    """
    total = start + n_new
    if n_new == 1 and (window is None or total <= window):
        return None
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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float, softcap: float | None = None) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, S, D] → [B, H, T, D]. Grouped-query heads are shared, not copied."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
        )
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v
