"""Mixture-of-Experts models (qwen3moe, qwen3vlmoe, InternVL + qwen3moe) against the HF references of the shared
fixtures: logits, greedy tokens and, layer by layer, the router's choices; the fused gate/up layout; that a step
reads only the experts it chose; and the errors of broken MoE files."""
import copy

import numpy as np
import pytest
import torch
from conftest import needs_shared
from gguf import GGUFValueType
from gguf_edit import fuse_gate_up, rewrite_gguf
from parity import FIXTURES, case_by_id, case_messages, manifest, model_for

import ocula
from ocula.errors import GGUFError
from ocula.models import moe
from ocula.models.text.base import StepInput

pytestmark = needs_shared
QWEN3MOE = "models/qwen3moe/qwen3moe-{}.gguf"
VARIANTS = [("f16", "reference/qwen3moe_text.npz"), ("Q8_0", "reference/qwen3moe_text.Q8_0.npz"),
            ("Q4_K_M", "reference/qwen3moe_text.Q4_K_M.npz")]


def have(path: str) -> bool:
    return (FIXTURES / path).exists()


class RoutingRecorder:
    """Records (router logits, weights, expert ids) of every sparse layer's forward, in layer order."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        real = moe.route

        def spy(logits, cfg):
            weights, ids = real(logits, cfg)
            self.calls.append((logits.float().clone(), weights.clone(), ids.clone()))
            return weights, ids

        monkeypatch.setattr(moe, "route", spy)


def check_routing(calls, ref, n_layers: int):
    """The prompt forward's routing against the npz's moe_* arrays: the same experts at every position of every
    layer, weights within 1e-4, router logits within 1e-3 (the logits tolerance)."""
    assert len(calls) >= n_layers
    for layer in range(n_layers):
        logits, weights, ids = calls[layer]
        assert ids.tolist() == ref["moe_topk_ids"][layer].tolist(), f"layer {layer} chose other experts"
        np.testing.assert_allclose(weights.numpy(), ref["moe_topk_weights"][layer], rtol=0, atol=1e-4)
        np.testing.assert_allclose(logits.numpy(), ref["moe_router_logits"][layer], rtol=0, atol=1e-3)


@pytest.mark.parametrize("variant, ref_name", VARIANTS, ids=[v for v, _ in VARIANTS])
def test_qwen3moe_text_variants(variant, ref_name, monkeypatch):
    if not have(QWEN3MOE.format(variant)):
        pytest.skip("qwen3moe fixture absent")
    ref = np.load(FIXTURES / ref_name)
    model = ocula.load(FIXTURES / QWEN3MOE.format(variant), dtype="float32")
    ids = ref["input_ids"].tolist()
    assert model.prompt_token_ids(case_messages(case_by_id("qwen3moe_text"))) == ids
    recorder = RoutingRecorder(monkeypatch)
    logits = model.logits(ids).numpy()
    np.testing.assert_allclose(logits, ref["logits_last"], rtol=0, atol=1e-3)
    assert logits.argmax() == ref["logits_last"].argmax()
    if "moe_topk_ids" in ref.files:
        check_routing(recorder.calls, ref, model.text.cfg.n_layer)
    out = model.generate(ids, max_tokens=16, temperature=0, ignore_eos=True)
    assert out.token_ids == ref["greedy_tokens"].tolist()


MOE_IMAGE_CASES = [c["id"] for c in manifest()["cases"] if c["model"] in ("qwen3vlmoe", "internvlmoe")]


@pytest.mark.parametrize("case_id", MOE_IMAGE_CASES)
def test_image_prompt_routing(case_id, monkeypatch):
    """Image tokens are routed too: the whole prompt's choices equal HF's, layer by layer."""
    case = case_by_id(case_id)
    ref = np.load(FIXTURES / case["reference_npz"])
    model = model_for(case["model"])
    monkeypatch.setattr(model.engine, "prefix_cache", False)  # every position through the layers
    recorder = RoutingRecorder(monkeypatch)
    model.logits(case_messages(case))
    check_routing(recorder.calls, ref, model.text.cfg.n_layer)


@pytest.mark.parametrize("variant", ["f16", "Q4_K_M"])
def test_fused_gate_up_equals_split(variant, tmp_path):
    """A file whose experts store gate and up as one ffn_gate_up_exps tensor (gate half first) gives the logits of
    the split file it was built from."""
    src = FIXTURES / QWEN3MOE.format(variant)
    if not src.exists():
        pytest.skip("qwen3moe fixture absent")
    fused = rewrite_gguf(src, tmp_path / "fused.gguf", tensors=fuse_gate_up)
    ids = np.load(FIXTURES / "reference/qwen3moe_text.npz")["input_ids"].tolist()
    split_model, fused_model = ocula.load(src), ocula.load(fused)
    assert fused_model.text.cfg.moe.fused_gate_up and not split_model.text.cfg.moe.fused_gate_up
    torch.testing.assert_close(fused_model.logits(ids), split_model.logits(ids), rtol=0, atol=1e-5)
    a = split_model.generate(ids, max_tokens=8, temperature=0, ignore_eos=True).token_ids
    assert fused_model.generate(ids, max_tokens=8, temperature=0, ignore_eos=True).token_ids == a


# ---------------------------------------------------------------- a step reads only the experts it chose

def poison_experts(src, dst, keep: dict[int, set[int]]):
    """A copy of `src` whose expert matrices outside keep[layer] are all 0xFF bytes: NaN in every GGML type
    (F16 NaNs; each block's float scale NaN), so any product that reads them turns the output to NaN."""
    def edit(tensors):
        out = []
        for name, data, qtype in tensors:
            if "_exps." in name:
                layer = int(name.split(".")[1])
                raw = data.view(np.uint8).copy().reshape(data.shape[0], -1)
                for e in range(data.shape[0]):
                    if e not in keep[layer]:
                        raw[e] = 0xFF
                data = raw.view(data.dtype).reshape(data.shape)
            out.append((name, data, qtype))
        return out

    return rewrite_gguf(src, dst, tensors=edit)


def prefill(model, prompts):
    caches, last = [], []
    for ids in prompts:
        cache = model.text.new_cache()
        x = model.text.embed(torch.tensor([ids]))
        model.text(x, StepInput(torch.arange(len(ids)), cache))
        caches.append(cache)
        last.append(ids[-1])
    return caches


def decode(model, caches, next_ids, expert_rows=None):
    """One decode step for each cache's sequence: through the C step (which then counts the rows each expert
    multiplied into `expert_rows`) when that is given, else through the modules."""
    x = model.text.embed(torch.tensor(next_ids).view(-1, 1))
    if expert_rows is not None:
        fused = model.text.fused_decode()
        assert fused is not None and fused.accepts(caches)
        return model.text.output_norm(fused.run(x, [torch.tensor([c.length]) for c in caches], caches, expert_rows))
    steps = [StepInput(torch.tensor([c.length]), c) for c in caches]
    return model.text(x, steps if len(steps) > 1 else steps[0])


@pytest.mark.parametrize("variant", ["f16", "Q4_K_M"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_step_reads_only_chosen_experts(variant, dtype, batch, tmp_path, monkeypatch):
    """The C decode step multiplies each sequence's k chosen experts and no other: it counts B * k expert rows per
    layer, those of the experts the modules' routing picks, and with every other expert poisoned (NaN) it gives
    the same hidden states bit for bit."""
    src = FIXTURES / QWEN3MOE.format(variant)
    if not src.exists():
        pytest.skip("qwen3moe fixture absent")
    prompts = [np.load(FIXTURES / "reference/qwen3moe_text.npz")["input_ids"].tolist(), [5, 77, 300, 9, 1000]][:batch]
    next_ids = [p[-1] for p in prompts]
    clean = ocula.load(src, dtype=dtype)
    cfg = clean.text.cfg
    caches = prefill(clean, prompts)
    kept = [copy.deepcopy(c) for c in caches]
    if clean.text.fused_decode() is None:
        pytest.skip("no C decode step on this machine (no C compiler)")
    counts = torch.zeros(cfg.n_layer, cfg.moe.n_expert, dtype=torch.int32)
    want = decode(clean, [copy.deepcopy(c) for c in caches], next_ids, counts)
    assert (counts.sum(dim=1) == batch * cfg.moe.n_expert_used).all()
    if dtype == "float32":  # the modules route the same way (in bfloat16 their activations round differently)
        recorder = RoutingRecorder(monkeypatch)
        monkeypatch.setenv("OCULA_FUSED_DECODE", "0")
        torch.testing.assert_close(decode(clean, [copy.deepcopy(c) for c in caches], next_ids), want,
                                   rtol=0, atol=1e-4)
        monkeypatch.delenv("OCULA_FUSED_DECODE")
        for layer in range(cfg.n_layer):
            chosen = torch.bincount(recorder.calls[layer][2].flatten(), minlength=cfg.moe.n_expert)
            assert chosen.tolist() == counts[layer].tolist()
    keep = {layer: set(torch.nonzero(counts[layer]).flatten().tolist()) for layer in range(cfg.n_layer)}
    poisoned = ocula.load(poison_experts(src, tmp_path / "poisoned.gguf", keep), dtype=dtype)
    got = decode(poisoned, kept, next_ids, torch.zeros_like(counts))
    assert torch.equal(got, want)


# ---------------------------------------------------------------- broken files

def broken(tmp_path, **kwargs):
    return rewrite_gguf(FIXTURES / QWEN3MOE.format("f16"), tmp_path / "broken.gguf", **kwargs)


@pytest.mark.parametrize("used, message", [(0, "expert_used_count' is 0"), (7, "expert_used_count' is 7")])
def test_bad_expert_used_count(tmp_path, used, message):
    path = broken(tmp_path, metadata={"qwen3moe.expert_used_count": (used, GGUFValueType.UINT32)})
    with pytest.raises(GGUFError, match=message):
        ocula.load(path)


def test_missing_expert_tensor(tmp_path):
    path = broken(tmp_path, tensors=lambda ts: [t for t in ts if t[0] != "blk.1.ffn_down_exps.weight"])
    with pytest.raises(GGUFError, match="blk.1.ffn_down_exps.weight"):
        ocula.load(path)


def test_misshaped_expert_tensor(tmp_path):
    def edit(ts):
        return [(n, d[:5] if n == "blk.0.ffn_up_exps.weight" else d, q) for n, d, q in ts]

    with pytest.raises(GGUFError, match="blk.0.ffn_up_exps.weight"):
        ocula.load(broken(tmp_path, tensors=edit))


def test_fused_and_split_in_one_file(tmp_path):
    def edit(ts):
        gate = next(d for n, d, q in ts if n == "blk.0.ffn_gate_exps.weight")
        up = next(d for n, d, q in ts if n == "blk.0.ffn_up_exps.weight")
        return ts + [("blk.0.ffn_gate_up_exps.weight", np.concatenate([gate, up], axis=1), 1)]

    with pytest.raises(GGUFError, match="both 'blk.0.ffn_gate_up_exps.weight' and split"):
        ocula.load(broken(tmp_path, tensors=edit))


def test_missing_expert_count(tmp_path):
    with pytest.raises(GGUFError, match="qwen3moe.expert_count"):
        ocula.load(broken(tmp_path, drop_keys=("qwen3moe.expert_count",)))


def test_inspect_shows_experts(capsys):
    from ocula.cli import main

    assert main(["inspect", str(FIXTURES / QWEN3MOE.format("Q4_K_M"))]) == 0
    assert "6 per layer, top-2 per token, expert ffn 256, 2 of 2 layers sparse, gate/up split" in capsys.readouterr().out


def test_mmproj_of_another_width():
    """InternVL3.5-MoE's mmproj (width 16 here) in front of a qwen3moe text model of width 256."""
    mmproj = FIXTURES / "models/internvlmoe/mmproj-internvlmoe-f16.gguf"
    if not mmproj.exists():
        pytest.skip("internvlmoe fixture absent")
    with pytest.raises(ocula.OculaError, match="width 16 but the text model's embedding width is 256"):
        ocula.load(FIXTURES / QWEN3MOE.format("f16"), mmproj=mmproj)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_experts_in_c(dtype, monkeypatch):
    """The C call that runs a prompt's lightly used experts (whole experts per thread): in float32 the logits of
    the per-expert matmuls from Python; in bf16 within the fast mode's bound of the float32 logits (5% of their
    range, as the per-expert matmuls are: 2.7% here)."""
    path = FIXTURES / QWEN3MOE.format("Q4_K_M")
    if not path.exists():
        pytest.skip("qwen3moe fixture absent")
    model = ocula.load(path, dtype=dtype)
    if model.text.blk[0].moe.native_plan(model.text.compute_dtype) is None:
        pytest.skip("no C library")
    ids = np.load(FIXTURES / "reference/qwen3moe_text.npz")["input_ids"].tolist()
    monkeypatch.setattr(model.engine, "prefix_cache", False)
    with_c = model.logits(ids)
    if dtype == "bfloat16":
        want = ocula.load(path).logits(ids)
        assert (with_c - want).abs().max() <= 0.05 * (want.max() - want.min())
        return
    monkeypatch.setattr(moe.SparseMoE, "native_plan", lambda self, dtype: None)
    torch.testing.assert_close(with_c, model.logits(ids), rtol=0, atol=1e-4)
