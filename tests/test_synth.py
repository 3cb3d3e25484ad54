"""`ocula synth`: random-weight files shaped like real models load and run in ocula."""
from __future__ import annotations

import re

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from PIL import Image

import ocula
from ocula import synth
from ocula.gguf import GGUFFile

# one quantization per preset keeps the test fast and still covers all three mixes
CASES = [
    ("Qwen2.5-VL-3B", "Q4_K_M"),
    ("Qwen3-VL-2B", "Q8_0"),
    ("Gemma-3-4B", "Q4_K_M"),
    ("SmolVLM-256M", "F16"),
    ("SmolVLM2-2.2B", "Q4_K_M"),
    ("InternVL3-1B", "Q8_0"),
]


def _needs_vocab(preset: str) -> None:
    p = synth.get_preset(preset)
    if not p.text.vocab.startswith("bpe:") and synth._read_fixture_tokenizer(p.text.vocab) is None:
        pytest.skip("the real Qwen/Gemma vocabularies come from shared/fixtures, not found here")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8))


def test_every_preset_is_covered():
    assert {p for p, _ in CASES} == set(synth.PRESETS)
    assert {q for _, q in CASES} == set(synth.QUANTS)


@pytest.mark.parametrize("preset,quant", CASES)
def test_tiny_synth_loads_and_runs(tmp_path, image, preset, quant):
    _needs_vocab(preset)
    r = synth.synthesize(preset, quant, tmp_path, tiny_scale=True)
    f = GGUFFile(r.model)
    p = synth.tiny(synth.get_preset(preset))
    assert f.architecture == p.text.arch
    assert f.metadata["general.file_type"] == synth.FILE_TYPES[quant]
    assert len(f.metadata["tokenizer.ggml.tokens"]) == p.text.n_vocab
    assert f.metadata.get("tokenizer.chat_template")
    mm = GGUFFile(r.mmproj)
    assert mm.metadata["clip.projector_type"] == p.vision.projector
    assert mm.metadata["clip.vision.projection_dim"] == p.text.n_embd

    model = ocula.load(r.model, mmproj=r.mmproj)
    msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    ids = model.prompt_token_ids(msgs)
    assert model.vision.image_token_id in ids
    assert bool(np.isfinite(model.logits(msgs).numpy()).all())  # prefill with the image's embeddings
    out = model.generate(ids[:6], max_tokens=2, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 2


def test_quantization_recipe_matches_llama_quantize():
    p = synth.get_preset("Qwen2.5-VL-3B")
    types = {ts.name: synth.text_tensor_type(ts, "Q4_K_M", p.text) for ts in synth.text_tensors(p.text)}
    assert types["token_embd.weight"] == QT.Q6_K  # tied embeddings are quantized like output.weight
    assert types["blk.0.attn_v.weight"] == QT.Q6_K and types["blk.4.attn_v.weight"] == QT.Q4_K
    assert types["blk.6.ffn_down.weight"] == QT.Q6_K and types["blk.5.ffn_down.weight"] == QT.Q4_K
    assert types["blk.10.ffn_gate.weight"] == QT.Q4_K and types["blk.0.attn_norm.weight"] == QT.F32
    # 896 columns are not a multiple of 256: llama.cpp falls back to Q5_0 (and Q8_0 for Q6_K / output)
    iv = synth.get_preset("InternVL3-1B")
    types = {ts.name: synth.text_tensor_type(ts, "Q4_K_M", iv.text) for ts in synth.text_tensors(iv.text)}
    assert types["blk.3.attn_q.weight"] == QT.Q5_0 and types["blk.0.attn_v.weight"] == QT.Q8_0
    assert types["output.weight"] == QT.Q8_0 and types["blk.3.ffn_down.weight"] == QT.Q4_K


def _file_bytes(preset: str, quant: str | None) -> int:
    p = synth.get_preset(preset)
    if quant is None:
        specs = [(ts, synth.vision_tensor_type(ts)) for ts in synth.vision_tensors(p.vision, p.text.n_embd)]
    else:
        specs = [(ts, synth.text_tensor_type(ts, quant, p.text)) for ts in synth.text_tensors(p.text)]
    return sum(synth.tensor_nbytes(ts.shape, q) for ts, q in specs)


def test_sizes_match_the_published_files():
    # ggml-org/Qwen2.5-VL-3B-Instruct-GGUF: Q4_K_M 1,929,901,056 bytes, mmproj f16 1,338,428,128 bytes
    # (tensor data + a header of a few MiB of tokenizer metadata)
    assert 0 < 1_929_901_056 - _file_bytes("Qwen2.5-VL-3B", "Q4_K_M") < 8 * 2**20
    assert 0 < 1_338_428_128 - _file_bytes("Qwen2.5-VL-3B", None) < 2**20


@pytest.mark.parametrize("name", ["F16", "F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"])
def test_random_blocks_are_valid(name):
    from gguf import quants

    qt = QT[name]
    pool = synth.BlockPool(0).pool(qt)
    if name in ("F16", "F32"):
        values = pool.view(np.float16 if name == "F16" else np.float32)
    else:
        from gguf.constants import GGML_QUANT_SIZES

        values = quants.dequantize(pool[: 2048 * GGML_QUANT_SIZES[qt][1]].reshape(1, -1), qt)
    values = np.asarray(values, dtype=np.float32)
    assert np.isfinite(values).all()
    assert 0.01 < float(values.std()) < 0.04


def _normalize(name: str) -> str:
    return re.sub(r"\.(\d+)\.", ".N.", name)


@pytest.mark.parametrize("family,preset", [("qwen25vl", "Qwen2.5-VL-3B"), ("qwen3vl", "Qwen3-VL-2B"),
                                          ("gemma3", "Gemma-3-4B"), ("internvl", "InternVL3-1B"),
                                          ("smolvlm", "SmolVLM-256M")])
def test_tensor_names_and_types_match_converted_fixtures(family, preset):
    root = synth.fixtures_dir()
    if root is None or not (root / family).is_dir():
        pytest.skip("shared fixtures not found")
    p = synth.get_preset(preset)
    mm = GGUFFile(next((root / family).glob("mmproj-*.gguf")))
    want = {_normalize(t.name): t.type_name for t in mm.tensors.values()}
    got = {_normalize(ts.name): synth.vision_tensor_type(ts).name
           for ts in synth.vision_tensors(p.vision, p.text.n_embd)}
    assert got == want
    text = GGUFFile(next(f for f in (root / family).glob("*.gguf") if not f.name.startswith("mmproj")))
    want_names = {_normalize(n) for n in text.tensors} - {"output.weight"}
    got_names = {_normalize(ts.name) for ts in synth.text_tensors(p.text)} - {"output.weight"}
    assert got_names == want_names


def test_cli_lists_and_writes(tmp_path, capsys):
    from ocula.cli import main

    assert main(["synth", "--list"]) == 0
    assert "Gemma-3-4B" in capsys.readouterr().out
    assert main(["synth", "--preset", "smolvlm-256m", "--tiny", "--quant", "q8_0", "-o", str(tmp_path)]) == 0
    assert (tmp_path / "SmolVLM-256M-tiny-Q8_0.gguf").exists()
    assert (tmp_path / "mmproj-SmolVLM-256M-tiny-F16.gguf").exists()
