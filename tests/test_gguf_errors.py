"""Broken, truncated or mismatched GGUF files give an error that names the problem."""
import gguf
import pytest
from tiny import FIXTURES, write_tiny_model

import ocula
from ocula.gguf import GGUFFile


def test_missing_file(tmp_path):
    with pytest.raises(ocula.GGUFError, match="no such file"):
        GGUFFile(tmp_path / "nope.gguf")


def test_directory(tmp_path):
    with pytest.raises(ocula.GGUFError, match="is a directory"):
        GGUFFile(tmp_path)


def test_bad_magic(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ocula.GGUFError, match="not a GGUF file"):
        GGUFFile(p)


def test_empty_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"")
    with pytest.raises(ocula.GGUFError, match="not a GGUF file"):
        GGUFFile(p)


def test_truncated_in_header(tiny_llama, tmp_path):
    p = tmp_path / "t.gguf"
    p.write_bytes(tiny_llama.read_bytes()[:2000])
    with pytest.raises(ocula.GGUFError, match="broken or truncated|truncated"):
        GGUFFile(p)


def test_truncated_tensor_data(tiny_llama, tmp_path):
    data = tiny_llama.read_bytes()
    p = tmp_path / "t.gguf"
    p.write_bytes(data[: len(data) - 5000])
    with pytest.raises(ocula.GGUFError, match="truncated"):
        GGUFFile(p)


def test_tensor_offset_past_end(tiny_llama, tmp_path):
    # Rewrite the last tensor's offset field in the header to point far beyond the end of the file.
    f = GGUFFile(tiny_llama)
    name, t = list(f.tensors.items())[-1]
    raw = bytearray(tiny_llama.read_bytes())
    at = raw.index(len(name).to_bytes(8, "little") + name.encode()) + 8 + len(name)
    at += 4 + 8 * len(t.shape) + 4  # n_dims, dims, type → the offset field
    raw[at : at + 8] = (10**9).to_bytes(8, "little")
    p = tmp_path / "o.gguf"
    p.write_bytes(bytes(raw))
    with pytest.raises(ocula.GGUFError, match=f"{name}.*ends at byte .* but the file has only"):
        GGUFFile(p)


def test_missing_tensor(tmp_path):
    p = write_tiny_model(tmp_path / "m.gguf", skip_tensors=("blk.1.ffn_up.weight",))
    with pytest.raises(ocula.GGUFError, match="blk.1.ffn_up.weight.* missing"):
        ocula.load(p)


def test_shape_mismatch(tmp_path):
    p = write_tiny_model(tmp_path / "m.gguf", bad_shapes={"blk.0.attn_q.weight": (32, 64)})
    with pytest.raises(ocula.GGUFError, match=r"blk.0.attn_q.weight.*shape \(32, 64\).*expects \(64, 64\)"):
        ocula.load(p)


def test_unknown_architecture(tmp_path):
    p = tmp_path / "u.gguf"
    w = gguf.GGUFWriter(str(p), "mamba9")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ocula.UnsupportedError, match="'mamba9' is not supported; supported: .*gemma3.*llama.*qwen2"):
        ocula.load(p)


@pytest.mark.skipif(not FIXTURES.exists(), reason="shared fixtures absent")
def test_mmproj_given_as_model():
    with pytest.raises(ocula.UnsupportedError, match="mmproj .* not a text model"):
        ocula.load(FIXTURES / "models/qwen2vl/mmproj-qwen2vl-f16.gguf")


def test_missing_required_key(tmp_path):
    p = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 4), dtype="float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ocula.GGUFError, match="llama.embedding_length"):
        ocula.load(p)
