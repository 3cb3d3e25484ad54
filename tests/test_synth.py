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
# Mixture-of-Experts presets (tested on their own: the text-only one has no mmproj)
MOE_CASES = [
    ("Qwen3-30B-A3B", "Q4_K_M"),
    ("Qwen3-VL-30B-A3B", "Q8_0"),
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
    assert {p for p, _ in CASES + MOE_CASES} == set(synth.PRESETS)
    assert {q for _, q in CASES} == set(synth.QUANTS)
    assert {p for p, _ in MOE_CASES} == {n for n, p in synth.PRESETS.items() if p.text.n_expert}


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
                                          ("smolvlm", "SmolVLM-256M"), ("qwen3vlmoe", "Qwen3-VL-30B-A3B")])
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
    listing = capsys.readouterr().out
    assert "Gemma-3-4B" in listing and "experts=128/8x768" in listing and "text only" in listing
    assert main(["synth", "--preset", "smolvlm-256m", "--tiny", "--quant", "q8_0", "-o", str(tmp_path)]) == 0
    assert (tmp_path / "SmolVLM-256M-tiny-Q8_0.gguf").exists()
    assert (tmp_path / "mmproj-SmolVLM-256M-tiny-F16.gguf").exists()


# ----------------------------------------------------------------------------- Mixture of Experts


def _tiny_moe(preset: str):
    p = synth.tiny(synth.get_preset(preset))
    return p, p.text


@pytest.mark.parametrize("preset,quant", MOE_CASES)
def test_tiny_moe_synth_writes_experts(tmp_path, preset, quant):
    _needs_vocab(preset)
    r = synth.synthesize(preset, quant, tmp_path, tiny_scale=True)
    p, t = _tiny_moe(preset)
    e, d, ff = t.n_expert, t.n_embd, t.n_ff_exp
    assert (e, t.n_expert_used, ff) == (8, 2, 64)
    f = GGUFFile(r.model)
    a, md = t.arch, f.metadata
    assert f.architecture == a and a == synth.get_preset(preset).text.arch
    assert md[f"{a}.expert_count"] == e and md[f"{a}.expert_used_count"] == 2
    assert md[f"{a}.expert_feed_forward_length"] == ff and md[f"{a}.feed_forward_length"] == t.n_ff
    assert md[f"{a}.attention.key_length"] == t.head_dim == md[f"{a}.attention.value_length"]
    assert md[f"{a}.block_count"] == t.n_layer and "output.weight" in f.tensors  # untied
    for i in range(t.n_layer):
        b = f"blk.{i}."
        assert not {b + "ffn_gate.weight", b + "ffn_up.weight", b + "ffn_down.weight"} & set(f.tensors)
        assert f.tensor(b + "ffn_gate_inp.weight").shape == (e, d)  # torch order, ggml ne {d, e}
        assert f.tensor(b + "ffn_gate_exps.weight").shape == (e, ff, d)
        assert f.tensor(b + "ffn_up_exps.weight").shape == (e, ff, d)
        assert f.tensor(b + "ffn_down_exps.weight").shape == (e, d, ff)
    types = {n: x.type_name for n, x in f.tensors.items()}
    assert all(types[n] == "F32" for n in types if n.endswith(("norm.weight", "ffn_gate_inp.weight")))
    if quant == "Q8_0":
        assert {types[n] for n in types if not n.endswith(("norm.weight", "ffn_gate_inp.weight"))} == {"Q8_0"}
    else:  # Q4_K_M on 128/64-wide rows: the fallbacks, and llama-quantize's 8-expert rules
        assert types["token_embd.weight"] == "Q5_0" and types["output.weight"] == "Q8_0"
        for i in range(t.n_layer):
            b = f"blk.{i}."
            assert types[b + "attn_q.weight"] == "Q5_0" and types[b + "attn_output.weight"] == "Q5_1"  # Q5_K
            assert types[b + "attn_k.weight"] == types[b + "attn_v.weight"] == "Q8_0"
            assert types[b + "ffn_gate_exps.weight"] == types[b + "ffn_up_exps.weight"] == "Q5_0"
        assert types["blk.0.ffn_down_exps.weight"] == "Q5_0" and types["blk.1.ffn_down_exps.weight"] == "Q8_0"
    # experts differ from each other, and the router's logits are large enough to separate them
    for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        raw = f.tensor(f"blk.0.{name}.weight").data.reshape(e, -1)
        assert len({bytes(x) for x in raw}) == e
    router = f.tensor("blk.1.ffn_gate_inp.weight").data.view(np.float32)
    assert abs(float(router.std()) * d ** 0.5 / synth.ROUTER_SCALE - 1) < 0.2
    if p.vision is None:
        assert r.mmproj is None and not list(tmp_path.glob("mmproj-*"))
    else:
        mm = GGUFFile(r.mmproj)
        assert mm.metadata["clip.projector_type"] == "qwen3vl_merger"
        assert mm.metadata["clip.vision.projection_dim"] == d
        assert md[f"{a}.n_deepstack_layers"] == len(p.vision.deepstack) == 2
        assert md[f"{a}.rope.dimension_sections"] == list(t.mrope_sections)


@pytest.mark.parametrize("preset,quant", MOE_CASES)
def test_tiny_moe_loads_and_chats(tmp_path, image, preset, quant):
    # needs the qwen3moe / qwen3vlmoe text models (ocula/models/moe.py)
    _needs_vocab(preset)
    r = synth.synthesize(preset, quant, tmp_path, tiny_scale=True)
    model = ocula.load(r.model, mmproj=r.mmproj)
    if r.mmproj is None:
        msgs = [{"role": "user", "content": "Hello! Who are you?"}]
    else:
        content = [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]
        msgs = [{"role": "user", "content": content}]
        assert model.vision.image_token_id in model.prompt_token_ids(msgs)
    assert bool(np.isfinite(model.logits(msgs).numpy()).all())
    out = model.chat(msgs, max_tokens=3, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 3 and isinstance(out.text, str)


def test_moe_quantization_recipe_matches_llama_quantize():
    from dataclasses import replace

    p = synth.get_preset("Qwen3-30B-A3B")
    t = p.text
    types = {ts.name: synth.text_tensor_type(ts, "Q4_K_M", t) for ts in synth.text_tensors(t)}
    assert types["token_embd.weight"] == QT.Q4_K and types["output.weight"] == QT.Q6_K  # untied
    more_bits = [0, 1, 2, 3, 4, 5, *range(8, 42, 3), 42, 43, 44, 45, 46, 47]  # use_more_bits(i, 48)
    assert [i for i in range(48) if types[f"blk.{i}.ffn_down_exps.weight"] == QT.Q6_K] == more_bits
    assert [i for i in range(48) if types[f"blk.{i}.attn_v.weight"] == QT.Q6_K] == more_bits
    assert {types[f"blk.{i}.ffn_down_exps.weight"] for i in range(48)} == {QT.Q4_K, QT.Q6_K}
    for i in range(48):
        b = f"blk.{i}."
        assert types[b + "ffn_gate_exps.weight"] == types[b + "ffn_up_exps.weight"] == QT.Q4_K
        assert types[b + "attn_k.weight"] == types[b + "attn_output.weight"] == QT.Q4_K
        assert types[b + "ffn_gate_inp.weight"] == QT.F32
    q8 = {ts.name: synth.text_tensor_type(ts, "Q8_0", t) for ts in synth.text_tensors(t)}
    assert {q for n, q in q8.items() if "norm" not in n and "gate_inp" not in n} == {QT.Q8_0}
    # only models with exactly 8 experts get the Mixtral rules (attn_k / attn_v Q8_0, attn_output Q5_K)
    t8 = replace(t, n_expert=8)
    types8 = {ts.name: synth.text_tensor_type(ts, "Q4_K_M", t8) for ts in synth.text_tensors(t8)}
    assert types8["blk.7.attn_k.weight"] == types8["blk.7.attn_v.weight"] == QT.Q8_0
    assert types8["blk.7.attn_output.weight"] == QT.Q5_K and types8["blk.0.ffn_down_exps.weight"] == QT.Q6_K


def _fixture_text_spec(f: GGUFFile) -> synth.TextSpec:
    a, md = f.architecture, f.metadata
    sections = md.get(f"{a}.rope.dimension_sections")
    return synth.TextSpec(
        a, f.tensors["token_embd.weight"].shape[0], md[f"{a}.embedding_length"], md[f"{a}.block_count"],
        md[f"{a}.attention.head_count"], md[f"{a}.attention.head_count_kv"], md[f"{a}.feed_forward_length"],
        md[f"{a}.attention.key_length"], md[f"{a}.rope.freq_base"], md[f"{a}.context_length"],
        md[f"{a}.attention.layer_norm_rms_epsilon"], tied="output.weight" not in f.tensors, vocab="qwen3vl",
        qk_norm=True, mrope_sections=tuple(sections) if sections else None,
        n_deepstack=md.get(f"{a}.n_deepstack_layers", 0), n_expert=md[f"{a}.expert_count"],
        n_expert_used=md[f"{a}.expert_used_count"], n_ff_exp=md[f"{a}.expert_feed_forward_length"])


@pytest.mark.parametrize("family,file,quant", [("qwen3moe", "qwen3moe-Q4_K_M.gguf", "Q4_K_M"),
                                               ("qwen3moe", "qwen3moe-Q8_0.gguf", "Q8_0"),
                                               ("qwen3moe", "qwen3moe-f16.gguf", "F16"),
                                               ("qwen3vlmoe", "qwen3vlmoe-f16.gguf", "F16")])
def test_moe_tensors_and_metadata_match_llama_cpp_files(family, file, quant):
    # small MoE models converted (and quantized) by llama.cpp: the same hparams give the same
    # tensor names, shapes and types, and the same {arch}.* metadata keys and values
    root = synth.fixtures_dir()
    if root is None or not (root / family / file).is_file():
        pytest.skip("shared fixtures not found")
    f = GGUFFile(root / family / file)
    t = _fixture_text_spec(f)
    want = {n: (x.type_name, tuple(x.shape)) for n, x in f.tensors.items()}
    got = {ts.name: (synth.text_tensor_type(ts, quant, t).name, ts.shape) for ts in synth.text_tensors(t)}
    assert got == want
    kv = synth.text_metadata(synth.Preset("fixture", "fixture", t), quant)
    want_kv = {k: v for k, v in f.metadata.items() if k.startswith(t.arch + ".")}
    got_kv = {k: v for k, v in kv.items() if k.startswith(t.arch + ".")}
    assert set(got_kv) == set(want_kv)
    for k, v in want_kv.items():
        assert got_kv[k] == (pytest.approx(v) if isinstance(v, float) else v), k


def test_moe_sizes_match_the_published_files():
    # Qwen3-30B-A3B GGUF releases: Q4_K_M 18.6 GB (17.28 GiB), Q8_0 32.48 GB, bf16 61.10 GB (= F16's
    # size); tensor data + a header of a few MB of tokenizer metadata. Both presets share the text shapes.
    assert abs(_file_bytes("Qwen3-30B-A3B", "Q4_K_M") / 2**30 - 17.28) < 0.01
    assert abs(_file_bytes("Qwen3-VL-30B-A3B", "Q4_K_M") / 1e9 - 18.6) < 0.05
    assert abs(_file_bytes("Qwen3-30B-A3B", "Q8_0") / 1e9 - 32.48) < 0.01
    assert abs(_file_bytes("Qwen3-30B-A3B", "F16") / 1e9 - 61.10) < 0.02


@pytest.mark.parametrize("preset", ["Qwen3-30B-A3B"])
def test_synth_moe_routes_tokens_to_many_experts(tmp_path, preset, monkeypatch):
    """Random weights whose blocks all decode to the same nonzero mean give every hidden state one shared
    direction, and then the router sends every token to the same k experts: benchmarks would measure a model
    that never reads most of its experts. The synthesized blocks have scales of both signs and MoE embeddings
    large enough to keep tokens apart, so a 64-token prompt uses every expert in every layer, none for more than
    30% of the choices (with one sign and 0.02 embeddings: 5-8 of 8 experts, some picked by almost every token)."""
    _needs_vocab(preset)
    from ocula.models import moe

    r = synth.synthesize(preset, "Q4_K_M", tmp_path, tiny_scale=True, layers=6)
    model = ocula.load(r.model)
    chosen = []
    real = moe.route

    def spy(logits, cfg):
        weights, ids = real(logits, cfg)
        chosen.append(ids)
        return weights, ids

    monkeypatch.setattr(moe, "route", spy)
    ids = np.random.default_rng(0).integers(0, model.text.cfg.n_vocab, 64).tolist()
    model.logits(ids)
    n_expert = model.text.cfg.moe.n_expert
    counts = [np.bincount(i.flatten().numpy(), minlength=n_expert) for i in chosen]
    assert len(counts) == model.text.cfg.n_layer
    assert all((c > 0).all() and c.max() <= 0.3 * c.sum() for c in counts), counts
