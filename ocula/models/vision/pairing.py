"""Does this mmproj belong to this text model? Decided from what both files say, before any image is encoded.

A wrong pairing whose widths happen to agree would otherwise run and answer from garbage features. Checks, in order:
1. The text architecture and the projector agree: the Qwen-VL mergers feed M-RoPE decoders (`qwen2vl` for Qwen2-VL
   and Qwen2.5-VL, `qwen3vl` / `qwen3vlmoe` for Qwen3-VL), Gemma 3's projector feeds `gemma3`, and those decoders take
   no other projector.
2. The vocabulary has every token the projector's prompt format writes (Idefics3's `<fake_token_around_image>`,
   `<global-img>`, `<row_1_col_1>`, InternVL's `<img>` ... `<IMG_CONTEXT>`, ...), and it is not the vocabulary of a
   more specific format: a vocabulary with all of Idefics3's tokens was made for an Idefics3 projector, not for
   LLaVA's, which needs only `<image>` (a subset of them).
3. Qwen-VL versions: Qwen2-VL and Qwen2.5-VL decoders share one architecture and vocabulary, so the text model's
   name (`general.name` / `general.basename`, e.g. "Qwen2.5 VL 7B Instruct", "Qwen25Vl") decides when it names a
   version, against the merger's version (`qwen2vl_merger`, `qwen2.5vl_merger`, `qwen3vl_merger`).
4. Qwen3-VL deepstack: the mmproj's deepstack layers and the decoder's `n_deepstack_layers` agree.
(The projector's output width against the text embedding width is checked where the mmproj is built.)
"""
from __future__ import annotations

import re

from ocula.errors import GGUFError

# the tokens each projector family's prompt expansion writes (all must be in the text vocabulary)
FORMAT_TOKENS: dict[str, tuple[str, ...]] = {
    "qwen2vl_merger": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "qwen2.5vl_merger": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "qwen3vl_merger": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "gemma3": ("<start_of_image>", "<image_soft_token>", "<end_of_image>"),
    "internvl": ("<img>", "<IMG_CONTEXT>", "</img>"),
    "idefics3": ("<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<image>"),
    "mlp": ("<image>",),
}
# projector type -> the text architectures it feeds (projectors not listed feed any decoder)
PROJECTOR_ARCHS: dict[str, tuple[str, ...]] = {
    "qwen2vl_merger": ("qwen2vl",),
    "qwen2.5vl_merger": ("qwen2vl",),
    "qwen3vl_merger": ("qwen3vl", "qwen3vlmoe"),
    "gemma3": ("gemma3",),
}
QWEN_MERGER_VERSION = {"qwen2vl_merger": "2", "qwen2.5vl_merger": "2.5", "qwen3vl_merger": "3"}
FAMILY_NAMES = {"qwen2vl_merger": "Qwen2-VL", "qwen2.5vl_merger": "Qwen2.5-VL", "qwen3vl_merger": "Qwen3-VL",
                "gemma3": "Gemma 3", "internvl": "InternVL", "idefics3": "Idefics3/SmolVLM", "mlp": "LLaVA"}


def check_pairing(projector_type: str, mmproj_name: str, text_gguf, has_token, vision_cfg=None) -> None:
    """Raise a GGUFError naming the reason when the mmproj (`projector_type`, file name `mmproj_name`) does not
    belong to the text model (`text_gguf`: its GGUFFile; `has_token(str) -> bool` looks up its vocabulary)."""
    arch = text_gguf.architecture
    family = FAMILY_NAMES.get(projector_type, projector_type)
    prefix = f"mmproj {mmproj_name} ({family} projector, {projector_type}) does not belong to {text_gguf.path.name}"

    def refuse(reason: str) -> None:
        raise GGUFError(f"{prefix}: {reason}; pass the mmproj made for this model")

    wanted = PROJECTOR_ARCHS.get(projector_type)
    if wanted is not None and arch not in wanted:
        refuse(f"that projector feeds a {' or '.join(repr(a) for a in wanted)} decoder, and this one is {arch!r}")
    takes = sorted(p for p, archs in PROJECTOR_ARCHS.items() if arch in archs)
    if takes and projector_type not in takes:
        refuse(f"a {arch!r} decoder takes images from {' or '.join(takes)} projectors only")

    needed = FORMAT_TOKENS.get(projector_type, ())
    missing = [t for t in needed if not has_token(t)]
    if missing:
        refuse(f"its prompt format needs the token(s) {', '.join(missing)}, which the text model's vocabulary "
               "does not have")
    for other, tokens in FORMAT_TOKENS.items():
        if set(needed) < set(tokens) and all(has_token(t) for t in tokens):
            refuse(f"the text model's vocabulary carries the image tokens of the {FAMILY_NAMES[other]} format "
                   f"({', '.join(tokens)}), a {FAMILY_NAMES[other]} model's, not the {family} format's "
                   f"({', '.join(needed)}) alone")

    version = QWEN_MERGER_VERSION.get(projector_type)
    named = qwen_vl_version(text_gguf)
    if version is not None and named is not None and named != version:
        refuse(f"the text model is named as Qwen{named}-VL ({model_name(text_gguf)!r}) and the mmproj is "
               f"Qwen{version}-VL's")

    if projector_type == "qwen3vl_merger" and vision_cfg is not None:
        flags = vision_cfg.get("clip.vision.is_deepstack_layers") or []
        n_mmproj = sum(bool(x) for x in flags)
        n_text = text_gguf.get(f"{arch}.n_deepstack_layers")
        if n_text is not None and int(n_text) != n_mmproj:
            refuse(f"the mmproj has {n_mmproj} deepstack layer(s) and the decoder takes {int(n_text)}")


def model_name(f) -> str:
    return " ".join(str(f.get(k)) for k in ("general.name", "general.basename") if f.get(k))


def qwen_vl_version(f) -> str | None:
    """'2', '2.5' or '3' when the text model's name says which Qwen-VL it is (e.g. 'Qwen2.5-VL-7B-Instruct',
    'Qwen25Vl', 'qwen2_vl'), else None."""
    names = re.sub(r"[\s_\-]", "", model_name(f).lower())
    found = {m.group(1) for m in re.finditer(r"qwen(\d+(?:\.\d+)?)vl", names)}
    versions = {"2.5" if v == "25" else v for v in found}
    return versions.pop() if len(versions) == 1 else None
