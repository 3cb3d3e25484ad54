"""Random-weight GGUF model + mmproj files with the exact shapes and metadata of real models.

`ocula synth --preset Qwen2.5-VL-3B --quant Q4_K_M -o DIR` writes

    DIR/Qwen2.5-VL-3B-Q4_K_M.gguf        text model: architecture, hparams, tokenizer, chat template
    DIR/mmproj-Qwen2.5-VL-3B-F16.gguf    vision projector (always F16, as the usual release files)

Speed does not depend on weight values, so these files benchmark ocula and llama.cpp on
realistic shapes without downloading anything. Weights are random but every block is valid: block
bytes are random, and each block's f16 scale fields (d, dmin) are set so the dequantized weights
have a standard deviation of about 0.02 (finite activations, no NaN guards tripped).

Shapes come from the models' HF `config.json` and from what llama.cpp's `convert_hf_to_gguf.py`
writes for them (tensor names, which tensors stay F32, split Conv3D patch embeddings, ...).

Tokenizers: the real Qwen / Gemma / InternVL vocabularies (tokens, merges or scores, token types,
special ids, chat template) are copied from the llama.cpp-converted fixture files in
`shared/fixtures/models` when they are there. Otherwise, and always for SmolVLM (whose fixture has a
tiny vocabulary), a byte-level BPE of the right size is trained on local Python source text with HF
`tokenizers` (~10 s, cached in ~/.cache/ocula/synth) and the family's special tokens are appended.

Quantization mixes (`--quant`):
  F16     every 2-D weight F16, norms/biases F32 (llama.cpp `--outtype f16`).
  Q8_0    every 2-D weight Q8_0 (llama-quantize Q8_0).
  Q4_K_M  llama-quantize's recipe: Q4_K everywhere except output.weight (or the tied
          token_embd) Q6_K, and attn_v / ffn_down Q6_K on the "use_more_bits" layers
          (first 1/8, last 1/8, and every third layer in between); rows whose length is not a
          multiple of 256 fall back as llama.cpp does (Q4_K -> Q5_0, Q6_K -> Q8_0; output -> Q8_0).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import sysconfig
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ocula.errors import OculaError

QUANTS = ("F16", "Q8_0", "Q4_K_M")
FILE_TYPES = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15}  # llama_ftype
WEIGHT_STD = 0.02


def fixtures_dir() -> Path | None:
    """shared/fixtures/models beside the checkout (or $OCULA_FIXTURES)."""
    env = os.environ.get("OCULA_FIXTURES")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent.parent
    candidates += [here.parent / "shared" / "fixtures" / "models", Path("/work/shared/fixtures/models")]
    for c in candidates:
        if c.is_dir():
            return c
    return None


# ----------------------------------------------------------------------------- presets


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
    vision: VisionSpec
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
]}

ALIASES = {k.lower().replace("-", "").replace(".", "").replace("_", ""): k for k in PRESETS}
ALIASES.update({"smolvlm2b": "SmolVLM2-2.2B", "qwen25vl": "Qwen2.5-VL-3B", "gemma34b": "Gemma-3-4B"})


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
    if t.vocab.startswith("bpe:"):  # a synthesized vocabulary: keep it small so it trains in a second
        text = replace(text, n_vocab=4096 + 128, n_vocab_base=4096)
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


# ----------------------------------------------------------------------------- tensor lists


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order: outermost first (rows, cols) for 2-D weights
    kind: str = "weight"  # weight | norm (ones) | bias | f32 (random, kept F32) | f16 (random, kept F16)
    layer: int | None = None
    role: str = ""  # attn_v / ffn_down / output / token_embd for the quantization recipe


def text_tensors(t: TextSpec) -> list[TensorSpec]:
    d, hd = t.n_embd, t.head_dim
    out = [TensorSpec("token_embd.weight", (t.n_vocab, d), role="token_embd")]
    for i in range(t.n_layer):
        p = f"blk.{i}."
        out += [
            TensorSpec(p + "attn_norm.weight", (d,), "norm", i),
            TensorSpec(p + "attn_q.weight", (t.n_head * hd, d), layer=i, role="attn_q"),
            TensorSpec(p + "attn_k.weight", (t.n_head_kv * hd, d), layer=i, role="attn_k"),
            TensorSpec(p + "attn_v.weight", (t.n_head_kv * hd, d), layer=i, role="attn_v"),
            TensorSpec(p + "attn_output.weight", (d, t.n_head * hd), layer=i, role="attn_output"),
        ]
        if t.qkv_bias:
            out += [TensorSpec(p + "attn_q.bias", (t.n_head * hd,), "bias", i),
                    TensorSpec(p + "attn_k.bias", (t.n_head_kv * hd,), "bias", i),
                    TensorSpec(p + "attn_v.bias", (t.n_head_kv * hd,), "bias", i)]
        if t.qk_norm:
            out += [TensorSpec(p + "attn_q_norm.weight", (hd,), "norm", i),
                    TensorSpec(p + "attn_k_norm.weight", (hd,), "norm", i)]
        out += [
            TensorSpec(p + "ffn_norm.weight", (d,), "norm", i),
            TensorSpec(p + "ffn_gate.weight", (t.n_ff, d), layer=i, role="ffn_gate"),
            TensorSpec(p + "ffn_up.weight", (t.n_ff, d), layer=i, role="ffn_up"),
            TensorSpec(p + "ffn_down.weight", (d, t.n_ff), layer=i, role="ffn_down"),
        ]
        if t.arch == "gemma3":
            out += [TensorSpec(p + "post_attention_norm.weight", (d,), "norm", i),
                    TensorSpec(p + "post_ffw_norm.weight", (d,), "norm", i)]
    out.append(TensorSpec("output_norm.weight", (d,), "norm"))
    if not t.tied:
        out.append(TensorSpec("output.weight", (t.n_vocab, d), role="output"))
    return out


def _vit_block(i: int, d: int, n_ff: int, *, ln_bias: bool = True, fused_qkv: bool = False,
               gate: bool = False, layer_scale: bool = False) -> list[TensorSpec]:
    p = f"v.blk.{i}."
    out = [TensorSpec(p + "ln1.weight", (d,), "norm", i), TensorSpec(p + "ln2.weight", (d,), "norm", i)]
    if ln_bias:
        out += [TensorSpec(p + "ln1.bias", (d,), "bias", i), TensorSpec(p + "ln2.bias", (d,), "bias", i)]
    if fused_qkv:
        out += [TensorSpec(p + "attn_qkv.weight", (3 * d, d), layer=i), TensorSpec(p + "attn_qkv.bias", (3 * d,), "bias", i)]
    else:
        for n in ("q", "k", "v"):
            out += [TensorSpec(p + f"attn_{n}.weight", (d, d), layer=i), TensorSpec(p + f"attn_{n}.bias", (d,), "bias", i)]
    out += [TensorSpec(p + "attn_out.weight", (d, d), layer=i), TensorSpec(p + "attn_out.bias", (d,), "bias", i)]
    names = ("ffn_gate", "ffn_up") if gate else ("ffn_up",)
    for n in names:
        out += [TensorSpec(p + f"{n}.weight", (n_ff, d), layer=i), TensorSpec(p + f"{n}.bias", (n_ff,), "bias", i)]
    out += [TensorSpec(p + "ffn_down.weight", (d, n_ff), layer=i), TensorSpec(p + "ffn_down.bias", (d,), "bias", i)]
    if layer_scale:
        out += [TensorSpec(p + "ls1.weight", (d,), "scale", i), TensorSpec(p + "ls2.weight", (d,), "scale", i)]
    return out


def vision_tensors(v: VisionSpec, text_embd: int) -> list[TensorSpec]:
    d, ps, side = v.n_embd, v.patch_size, v.image_size // v.patch_size
    out: list[TensorSpec] = []
    if v.projector == "gemma3":
        out += [TensorSpec("v.patch_embd.weight", (d, 3, ps, ps), "f32"), TensorSpec("v.patch_embd.bias", (d,), "bias"),
                TensorSpec("v.position_embd.weight", (side * side, d), "f32")]
        for i in range(v.n_layer):
            out += _vit_block(i, d, v.n_ff)
        out += [TensorSpec("v.post_ln.weight", (d,), "norm"), TensorSpec("v.post_ln.bias", (d,), "bias"),
                TensorSpec("mm.soft_emb_norm.weight", (d,), "norm"),
                # HF's [vision, text] matrix as convert_hf_to_gguf writes it, forced to F16
                TensorSpec("mm.input_projection.weight", (d, text_embd), "f16")]
    elif v.projector == "idefics3":
        out += [TensorSpec("v.patch_embd.weight", (d, 3, ps, ps), "f32"), TensorSpec("v.patch_embd.bias", (d,), "bias"),
                TensorSpec("v.position_embd.weight", (side * side, d), "f32")]
        for i in range(v.n_layer):
            out += _vit_block(i, d, v.n_ff)
        out += [TensorSpec("v.post_ln.weight", (d,), "norm"), TensorSpec("v.post_ln.bias", (d,), "bias"),
                TensorSpec("mm.model.fc.weight", (text_embd, d * v.scale_factor ** 2))]
    elif v.projector == "internvl":
        merged = d * v.scale_factor ** 2
        out += [TensorSpec("v.class_embd", (1, 1, d), "f32"),
                TensorSpec("v.patch_embd.weight", (d, 3, ps, ps), "f16"), TensorSpec("v.patch_embd.bias", (d,), "bias"),
                TensorSpec("v.position_embd.weight", (1, side * side + 1, d), "f32")]
        for i in range(v.n_layer):
            out += _vit_block(i, d, v.n_ff, layer_scale=True)
        out += [TensorSpec("mm.model.mlp.0.weight", (merged,), "norm"), TensorSpec("mm.model.mlp.0.bias", (merged,), "bias"),
                TensorSpec("mm.model.mlp.1.weight", (text_embd, merged)), TensorSpec("mm.model.mlp.1.bias", (text_embd,), "bias"),
                TensorSpec("mm.model.mlp.3.weight", (text_embd, text_embd)),
                TensorSpec("mm.model.mlp.3.bias", (text_embd,), "bias")]
    elif v.projector in ("qwen2.5vl_merger", "qwen3vl_merger"):
        q3 = v.projector == "qwen3vl_merger"
        merged = d * 4  # 2x2 spatial merge
        out += [TensorSpec("v.patch_embd.weight", (d, 3, ps, ps), "f16"),
                TensorSpec("v.patch_embd.weight.1", (d, 3, ps, ps), "f16")]
        if q3:
            out += [TensorSpec("v.patch_embd.bias", (d,), "bias"),
                    TensorSpec("v.position_embd.weight", (side * side, d), "f32")]
        for i in range(v.n_layer):
            out += _vit_block(i, d, v.n_ff, ln_bias=q3, fused_qkv=q3, gate=not q3)
        for i in v.deepstack:
            p = f"v.deepstack.{i}."
            out += [TensorSpec(p + "norm.weight", (merged,), "norm"), TensorSpec(p + "norm.bias", (merged,), "bias"),
                    TensorSpec(p + "fc1.weight", (merged, merged)), TensorSpec(p + "fc1.bias", (merged,), "bias"),
                    TensorSpec(p + "fc2.weight", (text_embd, merged)), TensorSpec(p + "fc2.bias", (text_embd,), "bias")]
        out.append(TensorSpec("v.post_ln.weight", (d,), "norm"))
        if q3:
            out.append(TensorSpec("v.post_ln.bias", (d,), "bias"))
        out += [TensorSpec("mm.0.weight", (merged, merged)), TensorSpec("mm.0.bias", (merged,), "bias"),
                TensorSpec("mm.2.weight", (text_embd, merged)), TensorSpec("mm.2.bias", (text_embd,), "bias")]
    else:
        raise OculaError(f"no tensor layout for projector {v.projector!r}")
    return out


# ----------------------------------------------------------------------------- quantization recipe


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def text_tensor_type(ts: TensorSpec, quant: str, t: TextSpec):
    from gguf import GGMLQuantizationType as QT

    if len(ts.shape) == 1 or ts.kind != "weight":
        return QT.F32
    cols = ts.shape[-1]
    if quant == "F16":
        return QT.F16
    if quant == "Q8_0":
        return QT.Q8_0 if cols % 32 == 0 else QT.F16
    if quant != "Q4_K_M":
        raise OculaError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    qt = QT.Q4_K
    if ts.role == "output" or (t.tied and ts.role == "token_embd"):
        return QT.Q8_0 if cols % 256 else QT.Q6_K
    if ts.role in ("attn_v", "ffn_down") and _use_more_bits(ts.layer, t.n_layer):
        qt = QT.Q6_K
    if cols % 256:  # llama.cpp's tensor_type_fallback
        qt = {QT.Q4_K: QT.Q5_0, QT.Q6_K: QT.Q8_0}[qt]
        if cols % 32:
            qt = QT.F16
    return qt


def vision_tensor_type(ts: TensorSpec):
    from gguf import GGMLQuantizationType as QT

    if ts.kind == "f16" or (ts.kind == "weight" and len(ts.shape) >= 2):
        return QT.F16
    return QT.F32


# ----------------------------------------------------------------------------- random valid blocks

# f16 scale fields (byte offsets) of each block type; everything else in a block is random bits
_SCALE_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
POOL_BLOCKS = 1 << 16


class BlockPool:
    """A few MiB of random valid blocks per tensor type, reused (rotated) to fill every tensor."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.pools: dict[int, np.ndarray] = {}

    def pool(self, qtype) -> np.ndarray:
        from gguf import GGMLQuantizationType as QT
        from gguf.constants import GGML_QUANT_SIZES

        qtype = QT(qtype)
        if qtype in self.pools:
            return self.pools[qtype]
        if qtype in (QT.F16, QT.F32):
            dt = np.float16 if qtype == QT.F16 else np.float32
            pool = (self.rng.standard_normal(POOL_BLOCKS * 64, dtype=np.float32) * WEIGHT_STD).astype(dt)
            self.pools[qtype] = pool.view(np.uint8)
            return self.pools[qtype]
        if qtype.name not in _SCALE_FIELDS:
            raise OculaError(f"synth cannot write {qtype.name} blocks")
        _, nbytes = GGML_QUANT_SIZES[qtype]
        blocks = self.rng.integers(0, 256, size=(POOL_BLOCKS, nbytes), dtype=np.uint8)
        if qtype == QT.Q6_K:  # int8 sub-block scales: keep them moderate
            blocks[:, 192:208] = self.rng.integers(-24, 25, size=(POOL_BLOCKS, 16)).astype(np.int8).view(np.uint8)
        fields = _SCALE_FIELDS[qtype.name]
        self._set_scales(blocks, fields, 1.0)
        std = float(self._dequant(blocks[:256], qtype).std())
        self._set_scales(blocks, fields, WEIGHT_STD / std)
        self.pools[qtype] = blocks.reshape(-1)
        return self.pools[qtype]

    def _set_scales(self, blocks: np.ndarray, fields, value: float) -> None:
        # jitter each block's scale by +-25% so blocks differ
        jitter = self.rng.uniform(0.75, 1.25, size=(blocks.shape[0],)).astype(np.float32)
        for off in fields:
            blocks[:, off : off + 2] = (jitter * value).astype(np.float16).view(np.uint8).reshape(-1, 2)

    @staticmethod
    def _dequant(blocks: np.ndarray, qtype) -> np.ndarray:
        from gguf import quants

        return quants.dequantize(blocks.reshape(1, -1), qtype).reshape(-1)


class PoolTensor:
    """Duck-typed stand-in for a numpy array in GGUFWriter.write_tensor_data: streams pool bytes."""

    def __init__(self, pool: np.ndarray, nbytes: int, unit: int, start: int):
        self.pool, self.nbytes, self.unit, self.start = pool, nbytes, unit, start

    def tofile(self, fout) -> None:
        left, pos = self.nbytes, (self.start * self.unit) % len(self.pool)
        pos -= pos % self.unit
        while left:
            chunk = self.pool[pos : pos + left]
            fout.write(chunk.data)
            left -= len(chunk)
            pos = 0


def tensor_nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf.constants import GGML_QUANT_SIZES

    block, nbytes = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    if shape[-1] % block:
        raise OculaError(f"row length {shape[-1]} is not a multiple of the {block}-element block")
    return n // block * nbytes


def tensor_data(ts: TensorSpec, qtype, pools: BlockPool, rng: np.random.Generator):
    from gguf import GGMLQuantizationType as QT

    nbytes = tensor_nbytes(ts.shape, qtype)
    if ts.kind in ("norm", "scale", "bias"):
        value = {"norm": 1.0, "scale": 0.1, "bias": 0.0}[ts.kind]
        arr = np.full(ts.shape, value, dtype=np.float32)
        if ts.kind == "bias":
            arr += rng.standard_normal(ts.shape, dtype=np.float32) * WEIGHT_STD
        return arr.astype(np.float16) if qtype == QT.F16 else arr
    from gguf.constants import GGML_QUANT_SIZES

    _, unit = GGML_QUANT_SIZES[qtype]
    pool = pools.pool(qtype)
    return PoolTensor(pool, nbytes, unit, int(rng.integers(0, len(pool) // unit)))


# ----------------------------------------------------------------------------- tokenizers


def _read_fixture_tokenizer(family: str) -> dict[str, Any] | None:
    root = fixtures_dir()
    if root is None:
        return None
    files = sorted(glob.glob(str(root / family / "*.gguf")))
    files = [f for f in files if not Path(f).name.startswith("mmproj")]
    if not files:
        return None
    from ocula.gguf import GGUFFile

    md = GGUFFile(files[0]).metadata
    return {k: v for k, v in md.items() if k.startswith("tokenizer.")}


SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}IMAGE_MARKUP{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# special tokens of the families whose vocabulary must be synthesized (fixtures absent)
SPECIALS = {
    "smolvlm": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
                + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]),
    "qwen": ([], ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<img>", "</img>",
                  "<IMG_CONTEXT>"]),
    "gemma": (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"],
              ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]),
}
IMAGE_MARKUP = {
    "qwen25vl": "<|vision_start|><|image_pad|><|vision_end|>", "qwen3vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "internvl": "<img><IMG_CONTEXT></img>", "gemma3": "<start_of_image>",
}


def _cache_dir() -> Path:
    d = Path(os.environ.get("OCULA_CACHE", Path.home() / ".cache" / "ocula")) / "synth"
    d.mkdir(parents=True, exist_ok=True)
    return d


def train_bpe(n_tokens: int) -> tuple[list[str], list[str]]:
    """A byte-level BPE of exactly `n_tokens` tokens (256 bytes + merges) trained on local Python
    source text; cached. Returns (tokens, merges) in GPT-2 byte-unicode form."""
    cache = _cache_dir() / f"bpe-{n_tokens}.json"
    if cache.exists():
        data = json.loads(cache.read_text())
        return data["tokens"], data["merges"]
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(root + "/**/*.py", recursive=True)
                   if "site-packages" not in f and "/test" not in f)

    def texts():
        total = 0
        for f in files:
            try:
                s = Path(f).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            total += len(s)
            yield s
            if total > 16_000_000:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=n_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    # the corpus may be too small to reach n_tokens: pad with merges of existing tokens
    have = set(tokens)
    i = 0
    while len(tokens) < n_tokens:
        a, b = tokens[256 + i % 4096], tokens[256 + (i * 7919) % 4096]
        i += 1
        if a + b not in have and " " not in a + b:
            tokens.append(a + b)
            merges.append(f"{a} {b}")
            have.add(a + b)
    cache.write_text(json.dumps({"tokens": tokens, "merges": merges}))
    return tokens, merges


def synth_bpe_tokenizer(n_vocab: int, family: str, n_base: int | None = None) -> dict[str, Any]:
    lead, added = SPECIALS[family]
    n_base = n_base or (n_vocab - len(added) - 8)
    tokens, merges = train_bpe(n_base - len(lead))
    toks = lead + tokens + added
    types = [3] * len(lead) + [1] * len(tokens) + [3] * len(added)
    while len(toks) < n_vocab:
        toks.append(f"[PAD{len(toks)}]")
        types.append(5)
    toks, types = toks[:n_vocab], types[:n_vocab]
    idx = {t: i for i, t in enumerate(toks)}
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": toks,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
    }
    if family == "smolvlm":
        md.update({"tokenizer.ggml.pre": "smollm", "tokenizer.ggml.bos_token_id": idx["<|im_start|>"],
                   "tokenizer.ggml.eos_token_id": idx["<end_of_utterance>"], "tokenizer.ggml.unknown_token_id": 0,
                   "tokenizer.ggml.padding_token_id": idx["<|im_end|>"], "tokenizer.chat_template": SMOLVLM_TEMPLATE})
    elif family == "qwen":
        md.update({"tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.bos_token_id": idx["<|endoftext|>"],
                   "tokenizer.ggml.eos_token_id": idx["<|im_end|>"],
                   "tokenizer.ggml.padding_token_id": idx["<|endoftext|>"]})
    else:  # gemma with a BPE vocabulary (the real one is SentencePiece)
        md.update({"tokenizer.ggml.pre": "default", "tokenizer.ggml.bos_token_id": idx["<bos>"],
                   "tokenizer.ggml.eos_token_id": idx["<end_of_turn>"], "tokenizer.ggml.padding_token_id": 0,
                   "tokenizer.ggml.add_bos_token": True})
    return md


def tokenizer_metadata(t: TextSpec) -> dict[str, Any]:
    if t.vocab.startswith("bpe:"):
        return synth_bpe_tokenizer(t.n_vocab, t.vocab[4:], t.n_vocab_base)
    md = _read_fixture_tokenizer(t.vocab)
    if md is not None and len(md.get("tokenizer.ggml.tokens", [])) == t.n_vocab:
        return md
    family = "gemma" if t.vocab == "gemma3" else "qwen"
    md = synth_bpe_tokenizer(t.n_vocab, family)
    md["tokenizer.chat_template"] = CHATML_TEMPLATE.replace("IMAGE_MARKUP", IMAGE_MARKUP[t.vocab])
    return md


# ----------------------------------------------------------------------------- writing


def _add_kv(w, key: str, value) -> None:
    from gguf import GGUFValueType as VT

    if key == "tokenizer.ggml.tokens":
        w.add_token_list(value)
    elif key == "tokenizer.ggml.scores":
        w.add_token_scores([float(x) for x in value])
    elif key == "tokenizer.ggml.token_type":
        w.add_token_types([int(x) for x in value])
    elif key == "tokenizer.ggml.merges":
        w.add_token_merges(value)
    elif isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value) if value >= 0 else w.add_int32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        if value and isinstance(value[0], bool):
            w.add_array(key, list(value))
        elif value and isinstance(value[0], int):
            w.add_key_value(key, list(value), VT.ARRAY, sub_type=VT.INT32)
        elif value and isinstance(value[0], float):
            w.add_key_value(key, [float(x) for x in value], VT.ARRAY, sub_type=VT.FLOAT32)
        else:
            w.add_array(key, list(value))
    else:
        raise OculaError(f"cannot write metadata {key}={value!r}")


def _write(path: Path, arch: str, kv: dict[str, Any], tensors: list[tuple[TensorSpec, Any]], seed: int) -> None:
    from gguf import GGUFWriter

    pools = BlockPool(seed)
    rng = np.random.default_rng(seed + 1)
    w = GGUFWriter(str(path), arch)
    for k, v in kv.items():
        _add_kv(w, k, v)
    for ts, qtype in tensors:
        w.add_tensor_info(ts.name, ts.shape, np.dtype(np.float32), tensor_nbytes(ts.shape, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for ts, qtype in tensors:
        w.write_tensor_data(tensor_data(ts, qtype, pools, rng))
    w.close()


def text_metadata(p: Preset, quant: str) -> dict[str, Any]:
    t = p.text
    a = t.arch
    kv: dict[str, Any] = {
        "general.type": "model",
        "general.name": f"{p.name} (synthetic random weights)",
        "general.description": f"ocula synth: random weights with the shapes of {p.hf}",
        "general.file_type": FILE_TYPES[quant],
        "general.quantization_version": 2,
        f"{a}.block_count": t.n_layer,
        f"{a}.context_length": t.context_length,
        f"{a}.embedding_length": t.n_embd,
        f"{a}.feed_forward_length": t.n_ff,
        f"{a}.attention.head_count": t.n_head,
        f"{a}.attention.head_count_kv": t.n_head_kv,
        f"{a}.rope.freq_base": float(t.rope_theta),
        f"{a}.attention.layer_norm_rms_epsilon": float(t.norm_eps),
    }
    if t.head_dim != t.n_embd // t.n_head or a in ("gemma3", "qwen3vl", "llama"):
        kv[f"{a}.attention.key_length"] = t.head_dim
        kv[f"{a}.attention.value_length"] = t.head_dim
    if a == "llama":
        kv[f"{a}.vocab_size"] = t.n_vocab
        kv[f"{a}.rope.dimension_count"] = t.head_dim
    if t.mrope_sections:
        kv[f"{a}.rope.dimension_sections"] = list(t.mrope_sections)
    if t.n_deepstack:
        kv[f"{a}.n_deepstack_layers"] = t.n_deepstack
    if t.sliding_window:
        kv[f"{a}.attention.sliding_window"] = t.sliding_window
    if t.rope_freq_base_swa:
        kv[f"{a}.rope.freq_base_swa"] = float(t.rope_freq_base_swa)
    if t.rope_linear_factor:
        kv[f"{a}.rope.scaling.type"] = "linear"
        kv[f"{a}.rope.scaling.factor"] = float(t.rope_linear_factor)
    kv.update(tokenizer_metadata(t))
    return kv


def vision_metadata(p: Preset) -> dict[str, Any]:
    v = p.vision
    kv: dict[str, Any] = {
        "general.type": "mmproj",
        "general.name": f"{p.name} (synthetic random weights)",
        "general.file_type": 1,
        "general.quantization_version": 2,
        "clip.has_vision_encoder": True,
        "clip.projector_type": v.projector,
        "clip.vision.projection_dim": p.text.n_embd,
        "clip.vision.image_size": v.image_size,
        "clip.vision.patch_size": v.patch_size,
        "clip.vision.embedding_length": v.n_embd,
        "clip.vision.feed_forward_length": v.n_ff,
        "clip.vision.block_count": v.n_layer,
        "clip.vision.attention.head_count": v.n_head,
        "clip.vision.attention.layer_norm_epsilon": float(v.eps),
        "clip.vision.image_mean": [float(x) for x in v.mean],
        "clip.vision.image_std": [float(x) for x in v.std],
        f"clip.use_{v.act}": True,
    }
    if v.projector in ("idefics3", "internvl"):
        kv["clip.vision.projector.scale_factor"] = v.scale_factor
    if v.deepstack:
        kv["clip.vision.is_deepstack_layers"] = [i in v.deepstack for i in range(v.n_layer)]
    kv.update(v.extra)
    return kv


@dataclass
class SynthResult:
    model: Path
    mmproj: Path | None
    seconds: float
    model_bytes: int
    mmproj_bytes: int


def synthesize(preset: str | Preset, quant: str = "Q4_K_M", out_dir: str | os.PathLike = ".", *,
               tiny_scale: bool = False, layers: int | None = None, vision_layers: int | None = None,
               mmproj: bool = True, seed: int = 0, force: bool = False) -> SynthResult:
    """Write the text model (and its F16 mmproj) for a preset. Returns the paths."""
    p = preset if isinstance(preset, Preset) else get_preset(preset)
    quant = quant.upper()
    if quant not in QUANTS:
        raise OculaError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    if tiny_scale:
        p = tiny(p)
    if layers:
        p = replace(p, text=replace(p.text, n_layer=layers, n_deepstack=min(p.text.n_deepstack, layers)))
    if vision_layers:
        v = p.vision
        extra = dict(v.extra)
        if "clip.vision.n_wa_pattern" in extra:
            extra["clip.vision.n_wa_pattern"] = min(extra["clip.vision.n_wa_pattern"], vision_layers)
        ds = tuple(i for i in v.deepstack if i < vision_layers)
        if v.deepstack and len(ds) < p.text.n_deepstack:
            ds = tuple(range(min(p.text.n_deepstack, vision_layers)))
        p = replace(p, vision=replace(v, n_layer=vision_layers, extra=extra, deepstack=ds))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-tiny" if tiny_scale else (f"-L{layers}" if layers else "")
    model_path = out / f"{p.name}{suffix}-{quant}.gguf"
    vsuffix = "-tiny" if tiny_scale else (f"-L{vision_layers}" if vision_layers else "")
    mmproj_path = out / f"mmproj-{p.name}{vsuffix}-F16.gguf" if mmproj else None
    t0 = time.perf_counter()
    if force or not model_path.exists():
        tensors = [(ts, text_tensor_type(ts, quant, p.text)) for ts in text_tensors(p.text)]
        tmp = model_path.with_suffix(".gguf.part")
        _write(tmp, p.text.arch, text_metadata(p, quant), tensors, seed)
        tmp.replace(model_path)
    if mmproj_path is not None and (force or not mmproj_path.exists()):
        tensors = [(ts, vision_tensor_type(ts)) for ts in vision_tensors(p.vision, p.text.n_embd)]
        tmp = mmproj_path.with_suffix(".gguf.part")
        _write(tmp, "clip", vision_metadata(p), tensors, seed + 7)
        tmp.replace(mmproj_path)
    return SynthResult(model_path, mmproj_path, time.perf_counter() - t0, model_path.stat().st_size,
                       mmproj_path.stat().st_size if mmproj_path else 0)


# ----------------------------------------------------------------------------- CLI


def cmd_synth(args) -> int:
    if args.list:
        for p in PRESETS.values():
            t, v = p.text, p.vision
            print(f"{p.name:15} {p.hf:40} {t.arch:8} d={t.n_embd} L={t.n_layer} H={t.n_head}/{t.n_head_kv} "
                  f"ff={t.n_ff} V={t.n_vocab} | {v.projector} {v.image_size}px d={v.n_embd} L={v.n_layer}")
        return 0
    if not args.preset:
        raise OculaError("--preset is required (see --list)")
    names = list(PRESETS) if args.preset == "all" else [args.preset]
    for name in names:
        for quant in args.quant:
            r = synthesize(name, quant, args.output, tiny_scale=args.tiny, layers=args.layers,
                           vision_layers=args.vision_layers, mmproj=not args.no_mmproj, seed=args.seed,
                           force=args.force)
            msg = f"{r.model} ({r.model_bytes / 2**20:.1f} MiB)"
            if r.mmproj:
                msg += f" + {r.mmproj} ({r.mmproj_bytes / 2**20:.1f} MiB)"
            print(f"{msg} in {r.seconds:.1f} s", file=sys.stderr)
            print(json.dumps({"model": str(r.model), "mmproj": str(r.mmproj) if r.mmproj else None}))
    return 0


def add_parser(sub, add_model_args=None) -> None:
    p = sub.add_parser("synth", help="write random-weight GGUF + mmproj files shaped like real models")
    p.add_argument("--preset", help=f"one of: {', '.join(PRESETS)} (or 'all')")
    p.add_argument("--quant", action="append", type=str.upper, choices=QUANTS, default=None,
                   help="F16, Q8_0 or Q4_K_M (repeatable; default Q4_K_M)")
    p.add_argument("-o", "--output", default=".", help="output directory")
    p.add_argument("--tiny", action="store_true", help="toy widths/depths with the same structure and tokenizer (tests)")
    p.add_argument("--layers", type=int, default=None, help="override the text block count (real widths)")
    p.add_argument("--vision-layers", type=int, default=None, help="override the vision block count")
    p.add_argument("--no-mmproj", action="store_true", help="write only the text model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rewrite files that already exist")
    p.add_argument("--list", action="store_true", help="list presets and exit")
    p.set_defaults(func=lambda a: cmd_synth(_defaults(a)))


def _defaults(args):
    if args.quant is None:
        args.quant = ["Q4_K_M"]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ocula synth")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["synth", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
