"""An mmproj of another model is refused at load with the reason, even when the widths agree; every fixture
family's own pair (InternVL on a Qwen3-MoE decoder included) is accepted."""
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import needs_shared
from parity import FIXTURES, manifest

import ocula
from ocula.errors import GGUFError
from ocula.gguf import GGUFFile
from ocula.models.vision.base import read_vision_config
from ocula.models.vision.pairing import check_pairing, qwen_vl_version

PAIRS = {n: m["gguf"] for n, m in manifest().get("models", {}).items() if m["gguf"].get("mmproj")} \
    if FIXTURES.exists() else {}


def files(name: str) -> tuple[Path, Path]:
    return FIXTURES / PAIRS[name]["text"], FIXTURES / PAIRS[name]["mmproj"]


def check_files(text: Path, mmproj: Path) -> None:
    t, v = GGUFFile(text), GGUFFile(mmproj)
    vocab = set(t.get("tokenizer.ggml.tokens"))
    cfg = read_vision_config(v)
    check_pairing(cfg.projector_type, v.path.name, t, vocab.__contains__, cfg)


@needs_shared
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_every_fixture_family_own_pair_is_accepted(name):
    check_files(*files(name))


# (text model, mmproj of another model, words of the reason): pairs whose widths agree, so only the pairing check
# can tell; the first two were accepted silently before
MISMATCHES = [
    ("llava", "smolvlm", "needs the token(s) <fake_token_around_image>, <global-img>, <row_1_col_1>"),
    ("qwen25vl", "qwen2vl", "named as Qwen2.5-VL ('Qwen25Vl') and the mmproj is Qwen2-VL's"),
    ("qwen2vl", "qwen25vl", "named as Qwen2-VL ('Qwen2Vl') and the mmproj is Qwen2.5-VL's"),
    ("smolvlm", "llava", "carries the image tokens of the Idefics3/SmolVLM format"),
    ("internvl", "qwen2vl", "that projector feeds a 'qwen2vl' decoder, and this one is 'qwen2'"),
    ("qwen3vl", "qwen25vl", "that projector feeds a 'qwen2vl' decoder, and this one is 'qwen3vl'"),
    ("qwen2vl", "qwen3vl", "feeds a 'qwen3vl' or 'qwen3vlmoe' decoder"),
    ("qwen25vl", "internvl", "a 'qwen2vl' decoder takes images from qwen2.5vl_merger or qwen2vl_merger projectors"),
    ("internvlmoe", "qwen3vlmoe", "this one is 'qwen3moe'"),
    ("qwen3vlmoe", "internvlmoe", "a 'qwen3vlmoe' decoder takes images from qwen3vl_merger projectors only"),
]


@needs_shared
@pytest.mark.parametrize("text, mmproj, reason", MISMATCHES, ids=[f"{t}+{m}" for t, m, _ in MISMATCHES])
def test_mmproj_of_another_model_is_refused_with_the_reason(text, mmproj, reason):
    if text not in PAIRS or mmproj not in PAIRS:
        pytest.skip("fixture missing")
    with pytest.raises(GGUFError) as e:
        ocula.load(files(text)[0], mmproj=files(mmproj)[1])
    message = str(e.value)
    assert f"mmproj {files(mmproj)[1].name}" in message and f"does not belong to {files(text)[0].name}" in message
    assert reason in message, message


class FakeText(SimpleNamespace):
    def get(self, key, default=None):
        return self.metadata.get(key, default)


def fake_text(arch: str, name: str | None = None, **extra) -> FakeText:
    metadata = {"general.architecture": arch, **({"general.name": name} if name else {}), **extra}
    return FakeText(architecture=arch, metadata=metadata, path=Path(f"{name or arch}.gguf"))


QWEN_TOKENS = {"<|vision_start|>", "<|image_pad|>", "<|vision_end|>"}


@pytest.mark.parametrize("name, version", [
    ("Qwen2.5 VL 7B Instruct", "2.5"), ("Qwen2.5-VL-3B-Instruct", "2.5"), ("Qwen25Vl", "2.5"), ("qwen2_vl", "2"),
    ("Qwen2-VL-7B-Instruct", "2"), ("Qwen3-VL-8B-Instruct", "3"), ("My Finetune", None), (None, None),
    ("Qwen2.5 7B", None),  # a Qwen2.5 text name that does not say VL
])
def test_qwen_vl_version_from_the_name(name, version):
    assert qwen_vl_version(fake_text("qwen2vl", name)) == version


def test_qwen_names_decide_only_when_they_say_a_version():
    check_pairing("qwen2.5vl_merger", "m.gguf", fake_text("qwen2vl", "Qwen2.5-VL-7B-Instruct"), QWEN_TOKENS.__contains__)
    check_pairing("qwen2vl_merger", "m.gguf", fake_text("qwen2vl", "Some Finetune 7B"), QWEN_TOKENS.__contains__)
    with pytest.raises(GGUFError, match="named as Qwen2.5-VL"):
        check_pairing("qwen2vl_merger", "m.gguf", fake_text("qwen2vl", "Qwen2.5-VL-7B-Instruct"),
                      QWEN_TOKENS.__contains__)


def test_qwen3vl_deepstack_layers_must_agree():
    cfg = SimpleNamespace(get=lambda key, default=None: [True, False, True, True] if "deepstack" in key else default)
    text = fake_text("qwen3vl", "Qwen3-VL-8B", **{"qwen3vl.n_deepstack_layers": 3})
    check_pairing("qwen3vl_merger", "m.gguf", text, QWEN_TOKENS.__contains__, cfg)
    text = fake_text("qwen3vl", "Qwen3-VL-8B", **{"qwen3vl.n_deepstack_layers": 2})
    with pytest.raises(GGUFError, match="3 deepstack layer"):
        check_pairing("qwen3vl_merger", "m.gguf", text, QWEN_TOKENS.__contains__, cfg)


def test_llava_projector_on_a_vocabulary_with_only_image_token_and_other_families_tokens():
    # a Qwen2 LM with <image> added (LLaVA-OneVision style) keeps taking an mlp projector: Qwen's tokens are not a
    # superset of LLaVA's
    vocab = QWEN_TOKENS | {"<image>"}
    check_pairing("mlp", "m.gguf", fake_text("qwen2", "llava-qwen"), vocab.__contains__)
