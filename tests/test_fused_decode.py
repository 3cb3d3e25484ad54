"""The one-call C decode step (ocula.models.text.fused_decode) gives what the torch modules give."""
import numpy as np
import pytest
import torch
from tiny import Q, write_tiny_model

from ocula.gguf import GGUFFile
from ocula.models.text import fused_decode
from ocula.models.text import build_text_model
from ocula.models.text.base import StepInput
from ocula.models.weights import load_gguf_weights
from ocula.quant import kernels
from ocula.quant.linear import QuantizedWeight, use_kernels

pytestmark = pytest.mark.skipif(kernels.native_lib() is None, reason="native kernels not built (no C compiler)")


def load(path, dtype=torch.float32, mode="exact"):
    f = GGUFFile(path)
    m = build_text_model(f)
    load_gguf_weights(m, f, dtype=dtype, aliases=m.weight_aliases())
    use_kernels(m, dtype, mode)
    return m


def decode_logits(model, monkeypatch, fused: bool, prompt, steps, kv_dtype=None):
    """Logits of `steps` decode steps after `prompt`, with the fused step on or off."""
    monkeypatch.setenv("OCULA_FUSED_DECODE", "1" if fused else "0")
    calls = []
    run = fused_decode.FusedDecode.run
    monkeypatch.setattr(fused_decode.FusedDecode, "run", lambda self, *a: calls.append(1) or run(self, *a))
    cache = model.new_cache(dtype=kv_dtype)
    model(model.embed(torch.tensor([prompt])), StepInput(torch.arange(len(prompt)), cache))
    out = []
    for j, tok in enumerate(steps):
        h = model(model.embed(torch.tensor([[tok]])), StepInput(torch.tensor([len(prompt) + j]), cache))
        out.append(model.logits(h)[0, -1])
    assert len(calls) == (len(steps) if fused and model.fused_decode() is not None else 0)
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0])
@torch.inference_mode()
def test_fused_step_matches_modules(tmp_path, monkeypatch, arch, qtype):
    """float32, exact kernels: the same numbers up to summation order. Gemma 3's window of 4 keys is
    crossed (the prompt is longer), so its sliding layers drop keys in both paths."""
    model = load(write_tiny_model(tmp_path / f"{arch}.gguf", arch, qtype=qtype))
    assert model.fused_decode() is not None
    prompt, steps = [5, 9, 200, 31, 7, 8], [40, 41, 250, 3, 17]
    ref = decode_logits(model, monkeypatch, False, prompt, steps)
    got = decode_logits(model, monkeypatch, True, prompt, steps)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_fused_step_leaves_the_callers_float_mode(tmp_path, monkeypatch):
    """The step flushes denormals to zero in its threads (see pointwise.c) and restores this thread's mode."""
    tiny = lambda: np.float32(1e-38) * np.float32(0.25)  # a denormal unless flushed
    assert tiny() != 0
    model = load(write_tiny_model(tmp_path / "gemma3.gguf", "gemma3"))
    decode_logits(model, monkeypatch, True, [5, 9, 200], [40, 41])
    assert tiny() != 0


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
@torch.inference_mode()
def test_fused_step_reads_and_writes_half_caches(tmp_path, monkeypatch, kv_dtype):
    if not kernels.native_lib().ocula_step_supports_kv(fused_decode.KV_TYPES[kv_dtype]):
        pytest.skip("this build's decode step does not read such caches (float16 needs F16C)")
    model = load(write_tiny_model(tmp_path / "qwen3.gguf", "qwen3"))
    prompt, steps = [5, 9, 200, 31], [40, 41, 250]
    ref = decode_logits(model, monkeypatch, False, prompt, steps, kv_dtype)
    got = decode_logits(model, monkeypatch, True, prompt, steps, kv_dtype)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not kernels.q8_supported(int(Q.Q8_0)),
                    reason="int8-activation kernels need the native build on an x86 CPU with AVX2 or VNNI")
@torch.inference_mode()
def test_fused_step_with_int8_kernels_in_bfloat16(tmp_path, monkeypatch):
    """bf16 compute with the int8-activation kernels: the fused step keeps float32 activations where
    the modules round each op's output to bf16, so the two agree to bf16 precision, not bitwise."""
    model = load(write_tiny_model(tmp_path / "llama.gguf", "llama", qtype=Q.Q8_0), torch.bfloat16, "q8")
    fused = model.fused_decode()
    assert fused is not None and {lin.xbits for layer in fused.layers for lin in (layer.attn_q, layer.ffn_down)} == {8}
    prompt, steps = [5, 9, 200, 31], [40, 41, 250]
    ref = decode_logits(model, monkeypatch, False, prompt, steps)
    got = decode_logits(model, monkeypatch, True, prompt, steps)
    scale = ref.abs().max()
    assert (got - ref).abs().max() < 0.05 * scale


def random_q6_k(rows: int, cols: int, seed: int) -> QuantizedWeight:
    """Random Q6_K blocks (gguf-py cannot quantize to K types) with weights of magnitude ~0.1-1."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * cols // 256, 210), dtype=np.uint8)
    raw[:, 208:210] = (rng.uniform(2e-4, 5e-4, len(raw)).astype(np.float16).view(np.uint8).reshape(-1, 2))
    return QuantizedWeight(torch.from_numpy(raw), int(Q.Q6_K), (rows, cols))


@pytest.mark.skipif(not kernels.q16_supported(int(Q.Q6_K)),
                    reason="int16-activation kernels need the native build on an AVX2 CPU without AVX-512")
@torch.inference_mode()
def test_fused_step_with_int16_ffn_down_in_bfloat16(tmp_path, monkeypatch):
    """ffn_down on the int16-activation kernel (as "auto" gives it), the rest int8: the step passes
    each projection its own kernel."""
    model = load(write_tiny_model(tmp_path / "llama.gguf", "llama", qtype=Q.Q8_0, n_ff=256), torch.bfloat16, "q8")
    for i, blk in enumerate(model.blk):
        blk.ffn_down.weight = random_q6_k(64, 256, i)
        use_kernels(blk.ffn_down, torch.bfloat16, "q16")
    fused = model.fused_decode()
    assert fused is not None and {(layer.attn_q.xbits, layer.ffn_down.xbits) for layer in fused.layers} == {(8, 16)}
    prompt, steps = [5, 9, 200, 31], [40, 41, 250]
    ref = decode_logits(model, monkeypatch, False, prompt, steps)
    got = decode_logits(model, monkeypatch, True, prompt, steps)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


@torch.inference_mode()
def test_fused_step_follows_kernel_changes(tmp_path, monkeypatch):
    """A layer given a kernel the C step cannot run (torch tiles) turns the fused step off; giving the
    native kernels back turns it on again."""
    model = load(write_tiny_model(tmp_path / "llama.gguf", "llama"))
    assert model.fused_decode() is not None
    use_kernels(model, torch.float32, "torch")
    assert model.fused_decode() is None
    prompt, steps = [5, 9, 200], [40, 41]
    ref = decode_logits(model, monkeypatch, True, prompt, steps)  # modules (torch kernels)
    use_kernels(model, torch.float32, "exact")
    assert model.fused_decode() is not None
    torch.testing.assert_close(decode_logits(model, monkeypatch, True, prompt, steps), ref, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("OCULA_FUSED_DECODE", "0")
    assert model.fused_decode() is None


@torch.inference_mode()
def test_fused_step_grows_the_cache(tmp_path, monkeypatch):
    """Past the cache's first capacity (256 tokens) the step rebinds the grown tensors."""
    model = load(write_tiny_model(tmp_path / "qwen2.gguf", "qwen2"))
    prompt = list(range(3, 253))
    steps = [40 + j for j in range(10)]
    ref = decode_logits(model, monkeypatch, False, prompt, steps)
    got = decode_logits(model, monkeypatch, True, prompt, steps)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
@torch.inference_mode()
def test_fused_batch_matches_modules(tmp_path, monkeypatch, arch):
    """Several sequences of different lengths (Gemma 3: some past its 4-key window) in one C call."""
    model = load(write_tiny_model(tmp_path / f"{arch}.gguf", arch))
    prompts = [[5, 9, 200, 31, 7, 8, 100], [17, 3], [250, 251, 252]]

    def batched(fused: bool):
        monkeypatch.setenv("OCULA_FUSED_DECODE", "1" if fused else "0")
        caches = []
        for ids in prompts:
            caches.append(model.new_cache())
            model(model.embed(torch.tensor([ids])), StepInput(torch.arange(len(ids)), caches[-1]))
        out = []
        for j in range(3):
            x = model.embed(torch.tensor([[40 + j]] * len(prompts)))
            steps = [StepInput(torch.tensor([len(ids) + j]), c) for ids, c in zip(prompts, caches)]
            out.append(model.logits(model(x, steps))[:, -1])
        return torch.stack(out)

    torch.testing.assert_close(batched(True), batched(False), rtol=1e-4, atol=1e-4)
