"""The shared sparse feed-forward (ocula.models.moe) on hand-made weights against a direct computation: the
routing variants other MoE families need (sigmoid gates, no renormalisation, a weight scale, a shared expert),
the fused gate/up layout, and tokens grouped by expert."""
import pytest
import torch

from ocula.models.moe import MoEConfig, SparseMoE, route
from ocula.quant.linear import F32, QuantizedWeight

D, FF, E = 32, 64, 6


def f32_weight(t: torch.Tensor) -> QuantizedWeight:
    return QuantizedWeight(t.contiguous().view(torch.uint8).reshape(t.shape[0], -1), F32, tuple(t.shape))


def build(cfg: MoEConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = {"router": torch.randn(E, D, generator=g), "gate": torch.randn(E, FF, D, generator=g) / D ** 0.5,
         "up": torch.randn(E, FF, D, generator=g) / D ** 0.5, "down": torch.randn(E, D, FF, generator=g) / FF ** 0.5}
    if cfg.n_ff_shared:
        w.update(sg=torch.randn(cfg.n_ff_shared, D, generator=g) / D ** 0.5,
                 su=torch.randn(cfg.n_ff_shared, D, generator=g) / D ** 0.5,
                 sd=torch.randn(D, cfg.n_ff_shared, generator=g) / cfg.n_ff_shared ** 0.5)
    m = SparseMoE(D, cfg)
    m.ffn_gate_inp.weight = f32_weight(w["router"])
    if cfg.fused_gate_up:
        m.ffn_gate_up_exps.set_weight(f32_weight(torch.cat([w["gate"], w["up"]], dim=1).reshape(E * 2 * FF, D)))
    else:
        m.ffn_gate_exps.set_weight(f32_weight(w["gate"].reshape(E * FF, D)))
        m.ffn_up_exps.set_weight(f32_weight(w["up"].reshape(E * FF, D)))
    m.ffn_down_exps.set_weight(f32_weight(w["down"].reshape(E * D, FF)))
    if cfg.n_ff_shared:
        m.shared.ffn_gate_shexp.weight = f32_weight(w["sg"])
        m.shared.ffn_up_shexp.weight = f32_weight(w["su"])
        m.shared.ffn_down_shexp.weight = f32_weight(w["sd"])
    return m, w


def direct(x: torch.Tensor, cfg: MoEConfig, w: dict) -> torch.Tensor:
    """Every token through its k experts one at a time, as the reference models' eager loops do."""
    logits = x @ w["router"].T
    probs = torch.softmax(logits, -1) if cfg.gating == "softmax" else torch.sigmoid(logits)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        top = torch.topk(probs[t], cfg.n_expert_used)
        weights = top.values / top.values.sum() if cfg.norm_topk else top.values
        for weight, e in zip(weights * cfg.weights_scale, top.indices.tolist()):
            h = torch.nn.functional.silu(w["gate"][e] @ x[t]) * (w["up"][e] @ x[t])
            out[t] += weight * (w["down"][e] @ h)
        if cfg.n_ff_shared:
            out[t] += w["sd"] @ (torch.nn.functional.silu(w["sg"] @ x[t]) * (w["su"] @ x[t]))
    return out


CONFIGS = {
    "softmax-renormalised": MoEConfig(E, 2, FF),
    "fused-gate-up": MoEConfig(E, 3, FF, fused_gate_up=True),
    "sigmoid-scaled": MoEConfig(E, 2, FF, gating="sigmoid", norm_topk=False, weights_scale=2.5),
    "shared-expert": MoEConfig(E, 2, FF, n_ff_shared=48),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("n_tokens", [1, 5, 40])
def test_sparse_moe_equals_direct_loop(name, n_tokens):
    cfg = CONFIGS[name]
    m, w = build(cfg)
    x = torch.randn(n_tokens, D, generator=torch.Generator().manual_seed(n_tokens))
    torch.testing.assert_close(m(x[None])[0], direct(x, cfg, w), rtol=1e-5, atol=1e-5)


def test_route_picks_most_probable_and_renormalises():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    weights, ids = route(logits, MoEConfig(4, 2, 8))
    assert ids.tolist() == [[1, 3]]
    p = torch.softmax(logits[0], -1)
    torch.testing.assert_close(weights[0], torch.stack([p[1], p[3]]) / (p[1] + p[3]))
