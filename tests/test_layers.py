"""Attention in ocula.models.layers: every path (SDPA, grouped float32 matmuls, soft-capping) against a
plain float64 reference with the key/value heads repeated."""
from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from ocula.models.layers import (CAUSAL, GROUPED_MAX_T, act, attend, attention_mask, causal_mask, gated_act,
                                 patch_embed)
from ocula.quant.kernels import native_lib


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


X86 = platform.machine().lower() in ("x86_64", "amd64")


def keeps_denormals() -> bool:
    return bool(np.float32(1e-38) * np.float32(0.25) != 0)


@pytest.mark.skipif(not X86 or native_lib() is None, reason="needs the native kernels on x86 (MXCSR)")
def test_kernels_flush_denormals_and_give_the_callers_mode_back():
    """SiLU(-80) x 1e-6 is ~1.4e-39, a denormal (x86 takes a microcode assist per denormal operation):
    the C kernel's threads flush it to zero, and this thread keeps its own mode (denormals) after."""
    assert keeps_denormals()
    g = torch.full((40000,), -80.0)  # above the kernel's 2-thread threshold
    u = torch.full_like(g, 1e-6)
    ref = F.silu(g) * u
    got = gated_act(g.clone(), u, False)
    assert (ref != 0).all() and (got == 0).all()
    assert keeps_denormals()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [  # B, H, Hk, T, S, D, causal
    (1, 16, 16, 130, 130, 64, False), (2, 4, 2, 100, 100, 72, True), (1, 8, 4, 37, 130, 80, False),
    (1, 4, 1, 64, 64, 256, True), (3, 2, 2, 17, 5, 128, False), (1, 6, 2, 70, 70, 40, True)])
def test_sdpa_c_kernel_matches_float64(dtype, shape, monkeypatch):
    """ocula's C attention (taken for >= C_ATTENTION_MIN_T queries without a mask; forced here on CPUs
    where torch's is preferred): block edges, GQA, head sizes that are not multiples of 16 or 64, more
    keys than queries, batches; float32 to ~1e-6, bfloat16 no worse than torch's own SDPA."""
    from ocula.models import layers
    from ocula.models.layers import sdpa
    from ocula.quant.kernels import native_lib

    if native_lib() is None:
        pytest.skip("native kernels not built")
    monkeypatch.setattr(layers, "C_ATTENTION_ALWAYS", True)
    calls = []
    c_attention = native_lib().ocula_attention
    monkeypatch.setattr(native_lib(), "ocula_attention", lambda *a: calls.append(1) or c_attention(*a))
    B, H, Hk, T, S, D, causal = shape
    g = torch.Generator().manual_seed(T * D)
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(dtype) for h, n in ((H, T), (Hk, S), (Hk, S)))
    rep = H // Hk
    ref = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(rep, 1),
                                         v.double().repeat_interleave(rep, 1), is_causal=causal)
    got = sdpa(q, k, v, is_causal=causal, enable_gqa=rep > 1)
    assert got.dtype == dtype and got.shape == ref.shape and calls
    err = (got.double() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err < 5e-6
    else:
        torch_err = (F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=rep > 1).double() - ref)
        assert err <= 1.5 * torch_err.abs().max().item() + 1e-3
    # 3-D inputs ([H, T, D], as the vision towers pass them) and transposed (strided) rows
    if B == 1:
        got3 = sdpa(q[0], k[0], v[0], is_causal=causal, enable_gqa=rep > 1)
        torch.testing.assert_close(got3, got[0], rtol=0, atol=0)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(sdpa(qt, k, v, is_causal=causal, enable_gqa=rep > 1), got, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["silu", "gelu_tanh", "quick_gelu", "gelu_erf"])
def test_unary_act_matches_torch(dtype, name):
    """The vision towers' activations through the same C kernel, out of place (x is left as it was)."""
    x = torch.cat([torch.randn(50001) * 4, torch.tensor([0.0, 88.0, -88.0, 300.0, -300.0])]).to(dtype)
    before = x.clone()
    ref = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu_erf": F.gelu,
           "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t)}[name](x.float())
    got = act(x, name)
    assert torch.equal(x, before) and got.dtype == dtype
    if dtype == torch.float32:  # gelu_erf: torch's own (the kernel's erf is within 1.5e-7)
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=1e-6)
    else:
        torch.testing.assert_close(got.float(), ref.to(dtype).float(), rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize("half_native", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_embed_is_the_strided_conv(dtype, half_native, monkeypatch):
    """One GEMM over the patches = conv2d with stride = kernel (a ragged edge dropped as conv2d does),
    batches, with or without bias; bf16 as bf16 GEMM or, on CPUs without bf16 matrix instructions, in
    float32 and rounded back."""
    from ocula.quant import kernels

    monkeypatch.setattr(kernels, "half_gemm_is_native", lambda dt: half_native)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 45, 31, generator=g)
    w, b = torch.randn(16, 3, 7, 7, generator=g), torch.randn(16, generator=g)
    for bias in (b, None):
        b64 = None if bias is None else bias.to(dtype).double()
        ref = F.conv2d(pixels.to(dtype).double(), w.to(dtype).double(), b64, stride=7)
        got = patch_embed(pixels.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype), 7)
        assert got.dtype == dtype and got.shape == (2, 6 * 4, 16)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.double(), ref.flatten(2).transpose(1, 2), rtol=tol, atol=tol)
