"""Attention in ocula.models.layers: every path (SDPA, grouped float32 matmuls, soft-capping) against a
plain float64 reference with the key/value heads repeated."""
from __future__ import annotations

import pytest
import torch

from ocula.models.layers import CAUSAL, GROUPED_MAX_T, attend, attention_mask, causal_mask


def reference(q, k, v, mask, scale, softcap=None):
    rep = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def qkv(T, S, dtype, H=6, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h, n: torch.randn(1, h, n, D, generator=g).to(dtype)  # noqa: E731
    return make(H, T), make(Hkv, S), make(Hkv, S)


@pytest.mark.parametrize("T", [1, 3, GROUPED_MAX_T, GROUPED_MAX_T + 5, 40])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_attend_matches_reference(T, window, softcap):
    S = 50 + T  # T new tokens after 50 cached ones
    q, k, v = qkv(T, S, torch.float32, seed=T)
    mask = attention_mask(S - T, T, window)
    dense = causal_mask(S - T, T, window) if mask is not None else None
    got = attend(q, k, v, mask, 0.25, softcap)
    assert got.shape == q.shape and got.dtype == torch.float32
    assert (got.double() - reference(q, k, v, dense, 0.25, softcap)).abs().max() < 1e-5


@pytest.mark.parametrize("T", [1, 4, 30])
def test_attend_causal_from_start(T):
    q, k, v = qkv(T, T, torch.float32, seed=1)
    got = attend(q, k, v, CAUSAL, 0.3)
    assert (got.double() - reference(q, k, v, causal_mask(0, T), 0.3)).abs().max() < 1e-5


def test_attend_bfloat16_decode_is_accurate():
    """bf16 q/k/v: the decode path computes in float32, so the error is the inputs' rounding only."""
    q, k, v = qkv(1, 300, torch.bfloat16, seed=2)
    got = attend(q, k, v, None, 0.25)
    assert got.dtype == torch.bfloat16
    assert (got.double() - reference(q, k, v, None, 0.25)).abs().max() < 1e-2
