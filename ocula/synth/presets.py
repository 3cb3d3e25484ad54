"""Presets: the text and vision shapes of real models (from their HF config.json), and toy-size versions."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ocula.errors import OculaError


@dataclass
class TextSpec:
    arch: str  # llama.cpp general.architecture
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    head_dim: int
    rope_theta: float
    context_length: int
    norm_eps: float
    tied: bool
    vocab: str  # tokenizer source: fixture family name, or "bpe"
    qkv_bias: bool = False
    qk_norm: bool = False
    mrope_sections: tuple[int, ...] | None = None
    n_deepstack: int = 0
    sliding_window: int | None = None
    rope_freq_base_swa: float | None = None
    rope_linear_factor: float | None = None
    n_vocab_base: int | None = None  # BPE vocab: regular tokens before the appended special tokens
    # Mixture of Experts (0 = dense): n_expert experts of width n_ff_exp, n_expert_used per token, and a
    # router (ffn_gate_inp) in every block instead of the dense ffn_gate/up/down; n_ff stays the
    # config's dense intermediate_size, written as {arch}.feed_forward_length as the converter does
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0


@dataclass
class VisionSpec:
    projector: str  # clip.projector_type
    image_size: int
    patch_size: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    eps: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    act: str  # "gelu" or "silu"
    extra: dict = field(default_factory=dict)  # additional clip.* keys
    deepstack: tuple[int, ...] = ()  # qwen3vl
    scale_factor: int = 1  # idefics3 / internvl pixel shuffle, also written to clip.*


@dataclass
class Preset:
    name: str
    hf: str  # the HF repo the shapes come from
    text: TextSpec
    vision: VisionSpec | None = None  # None: a text-only model (no mmproj)
    notes: str = ""


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset(
        "Qwen2.5-VL-3B", "Qwen/Qwen2.5-VL-3B-Instruct",
        TextSpec("qwen2vl", 151936, 2048, 36, 16, 2, 11008, 128, 1e6, 128000, 1e-6, tied=True,
                 vocab="qwen25vl", qkv_bias=True, mrope_sections=(16, 24, 24, 0)),
        VisionSpec("qwen2.5vl_merger", 560, 14, 1280, 3420, 32, 16, 1e-6, CLIP_MEAN, CLIP_STD, "silu",
                   extra={"clip.vision.n_wa_pattern": 8}),
        "vision: window attention, full attention every 8th block (fullatt_block_indexes 7,15,23,31)",
    ),
    Preset(
        "Qwen3-VL-2B", "Qwen/Qwen3-VL-2B-Instruct",
        TextSpec("qwen3vl", 151936, 2048, 28, 16, 8, 6144, 128, 5e6, 262144, 1e-6, tied=True,
                 vocab="qwen3vl", qk_norm=True, mrope_sections=(24, 20, 20, 0), n_deepstack=3),
        VisionSpec("qwen3vl_merger", 768, 16, 1024, 4096, 24, 16, 1e-6, HALF, HALF, "gelu",
                   extra={"clip.vision.spatial_merge_size": 2}, deepstack=(5, 11, 17)),
        "image_size 768 = sqrt(num_position_embeddings 2304) * 16, as the converter computes it",
    ),
    Preset(
        "Gemma-3-4B", "google/gemma-3-4b-it",
        TextSpec("gemma3", 262208, 2560, 34, 8, 4, 10240, 256, 1e6, 131072, 1e-6, tied=True,
                 vocab="gemma3", qk_norm=True, sliding_window=1024, rope_freq_base_swa=1e4,
                 rope_linear_factor=8.0),
        VisionSpec("gemma3", 896, 14, 1152, 4304, 27, 16, 1e-6, HALF, HALF, "gelu"),
        "SigLIP-so400m 896px, 4x4 average pool to 256 tokens",
    ),
    Preset(
        "SmolVLM-256M", "HuggingFaceTB/SmolVLM-256M-Instruct",
        TextSpec("llama", 49280, 576, 30, 9, 3, 1536, 64, 1e5, 8192, 1e-5, tied=True,
                 vocab="bpe:smolvlm", n_vocab_base=49152),
        VisionSpec("idefics3", 512, 16, 768, 3072, 12, 12, 1e-6, HALF, HALF, "gelu",
                   extra={"clip.vision.preproc_image_size": 2048}, scale_factor=4),
        "SigLIP-base-patch16-512, pixel shuffle 4 -> 64 tokens per 512px tile",
    ),
    Preset(
        "SmolVLM2-2.2B", "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
        TextSpec("llama", 49280, 2048, 24, 32, 32, 8192, 64, 1.3e5, 8192, 1e-5, tied=False,
                 vocab="bpe:smolvlm", n_vocab_base=49152),
        VisionSpec("idefics3", 384, 14, 1152, 4304, 27, 16, 1e-6, HALF, HALF, "gelu",
                   extra={"clip.vision.preproc_image_size": 1536}, scale_factor=3),
        "text = SmolLM2-1.7B shapes (rope_theta 130000 assumed); SigLIP-so400m 384px, pixel shuffle 3 -> 81 tokens/tile",
    ),
    Preset(
        "InternVL3-1B", "OpenGVLab/InternVL3-1B",
        TextSpec("qwen2", 151674, 896, 24, 14, 2, 4864, 64, 1e6, 32768, 1e-6, tied=False,
                 vocab="internvl", qkv_bias=True),
        VisionSpec("internvl", 448, 14, 1024, 4096, 24, 16, 1e-6, IMAGENET_MEAN, IMAGENET_STD, "gelu",
                   extra={"clip.vision.preproc_min_tiles": 1, "clip.vision.preproc_max_tiles": 12},
                   scale_factor=2),
        "InternViT-300M-448px (layer scale), pixel shuffle 0.5 -> 256 tokens per 448px tile",
    ),
    Preset(
        "Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B",
        TextSpec("qwen3moe", 151936, 2048, 48, 32, 4, 6144, 128, 1e6, 40960, 1e-6, tied=False,
                 vocab="qwen3vl", qk_norm=True, n_expert=128, n_expert_used=8, n_ff_exp=768),
        notes="text only; 128 experts x 768, top 8, no shared expert; Qwen3 tokenizer (= Qwen3-VL's vocabulary)",
    ),
    Preset(
        "Qwen3-VL-30B-A3B", "Qwen/Qwen3-VL-30B-A3B-Instruct",
        TextSpec("qwen3vlmoe", 151936, 2048, 48, 32, 4, 6144, 128, 5e6, 262144, 1e-6, tied=False,
                 vocab="qwen3vl", qk_norm=True, mrope_sections=(24, 20, 20, 0), n_deepstack=3,
                 n_expert=128, n_expert_used=8, n_ff_exp=768),
        VisionSpec("qwen3vl_merger", 768, 16, 1152, 4304, 27, 16, 1e-6, HALF, HALF, "gelu",
                   extra={"clip.vision.spatial_merge_size": 2}, deepstack=(8, 16, 24)),
        "text = Qwen3-30B-A3B's MoE with Qwen3-VL's interleaved M-RoPE and deepstack; vision 27 x 1152, "
        "learned pos 48x48 (image_size 768), deepstack after vision blocks 8/16/24",
    ),
]}

ALIASES = {k.lower().replace("-", "").replace(".", "").replace("_", ""): k for k in PRESETS}
ALIASES.update({"smolvlm2b": "SmolVLM2-2.2B", "qwen25vl": "Qwen2.5-VL-3B", "gemma34b": "Gemma-3-4B",
                "qwen3moe": "Qwen3-30B-A3B", "qwen3vlmoe": "Qwen3-VL-30B-A3B"})


def get_preset(name: str) -> Preset:
    key = name.lower().replace("-", "").replace(".", "").replace("_", "")
    if key in ALIASES:
        return PRESETS[ALIASES[key]]
    raise OculaError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")


def tiny(p: Preset) -> Preset:
    """Same architecture, tokenizer and structural features at toy widths and depths (tests)."""
    t, v = p.text, p.vision
    heads = 4
    ratio = max(1, t.n_head // t.n_head_kv)
    kv = max(1, heads // min(ratio, heads))
    hd = 32
    sections = None
    if t.mrope_sections:
        s = [x * (hd // 2) // sum(t.mrope_sections) for x in t.mrope_sections]
        s[0] += hd // 2 - sum(s)
        sections = tuple(s)
    text = replace(t, n_embd=128, n_layer=2, n_head=heads, n_head_kv=kv, head_dim=hd, n_ff=256,
                   mrope_sections=sections, n_deepstack=2 if t.n_deepstack else 0,
                   context_length=min(t.context_length, 8192))
    if t.n_expert:  # 8 experts, top 2, 64 wide: llama-quantize's 8-expert rules apply (attn_k/v Q8_0, ...)
        text = replace(text, n_expert=8, n_expert_used=2, n_ff_exp=64)
    if t.vocab.startswith("bpe:"):  # a synthesized vocabulary: keep it small so it trains in a second
        text = replace(text, n_vocab=4096 + 128, n_vocab_base=4096)
    if v is None:
        return replace(p, text=text)
    extra = dict(v.extra)
    n_layer = 2
    deepstack: tuple[int, ...] = ()
    if "clip.vision.n_wa_pattern" in extra:
        extra["clip.vision.n_wa_pattern"] = 2
    if v.deepstack:
        n_layer, deepstack = 3, (0, 2)
    image_size = v.image_size
    if v.projector == "gemma3":
        image_size = 16 * v.patch_size  # 16x16 patches, pooled 4x4 -> 16 tokens
    if "clip.vision.preproc_image_size" in extra:
        extra["clip.vision.preproc_image_size"] = 2 * v.image_size  # at most 2x2 tiles
    if "clip.vision.preproc_max_tiles" in extra:
        extra["clip.vision.preproc_max_tiles"] = 2
    vision = replace(v, n_embd=64, n_ff=128, n_layer=n_layer, n_head=2, extra=extra, deepstack=deepstack,
                     image_size=image_size)
    return replace(p, text=text, vision=vision)

