import pytest

from ocula.tools.hub import HubError, choose_files, parse_spec

QWEN_REPO = [
    "README.md", ".gitattributes",
    "Qwen2.5-VL-3B-Instruct-Q4_K_M.gguf", "Qwen2.5-VL-3B-Instruct-Q8_0.gguf", "Qwen2.5-VL-3B-Instruct-f16.gguf",
    "Qwen2.5-VL-3B-Instruct-Q4_K_S.gguf", "mmproj-Qwen2.5-VL-3B-Instruct-f16.gguf",
    "mmproj-Qwen2.5-VL-3B-Instruct-Q8_0.gguf",
]


def test_default_quant_and_mmproj():
    assert choose_files(QWEN_REPO) == ("Qwen2.5-VL-3B-Instruct-Q4_K_M.gguf", "mmproj-Qwen2.5-VL-3B-Instruct-f16.gguf")


def test_named_quant_case_insensitive():
    model, mmproj = choose_files(QWEN_REPO, "q8_0")
    assert model == "Qwen2.5-VL-3B-Instruct-Q8_0.gguf"
    assert mmproj.startswith("mmproj")
    # Q4_K must not match Q4_K_M or Q4_K_S by prefix
    with pytest.raises(HubError, match="no .gguf with quant 'Q4_K'"):
        choose_files(QWEN_REPO, "Q4_K")


def test_text_only_repo_and_split_files():
    files = ["big-Q4_K_M-00001-of-00003.gguf", "big-Q4_K_M-00002-of-00003.gguf", "big-Q4_K_M-00003-of-00003.gguf"]
    assert choose_files(files) == ("big-Q4_K_M-00001-of-00003.gguf", None)


def test_no_gguf():
    with pytest.raises(HubError, match="no model .gguf"):
        choose_files(["README.md", "mmproj-x-f16.gguf"])


def test_parse_spec():
    assert parse_spec("ggml-org/gemma-3-4b-it-GGUF:Q8_0") == ("ggml-org/gemma-3-4b-it-GGUF", "Q8_0")
    assert parse_spec("a/b") == ("a/b", None)
    with pytest.raises(HubError, match="ORG/REPO"):
        parse_spec("not a repo")
