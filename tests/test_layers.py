"""Attention in ocula.models.layers: every path (SDPA, grouped float32 matmuls, soft-capping) against a
plain float64 reference with the key/value heads repeated."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from ocula.models.layers import CAUSAL, GROUPED_MAX_T, attend, attention_mask, causal_mask, gated_act


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gelu", [False, True])
def test_gated_act_matches_torch(dtype, gelu):
    """The C kernel's SiLU / tanh-GELU times up, over the whole float range incl. huge and tiny inputs."""
    g = torch.cat([torch.randn(70001) * 4, torch.tensor([0.0, -0.0, 88.0, -88.0, 200.0, -200.0, 1e-30, -1e-30])])
    u = torch.randn_like(g)
    g, u = g.to(dtype), u.to(dtype)
    ref = (F.gelu(g.float(), approximate="tanh") if gelu else F.silu(g.float())) * u.float()
    got = gated_act(g.clone(), u, gelu)
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=1e-6)
    else:  # one rounding of the float32 result to bf16
        torch.testing.assert_close(got.float(), ref.to(dtype).float(), rtol=8e-3, atol=1e-6)
