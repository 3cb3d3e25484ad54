"""What every vision family provides, the `clip.*` keys they share, and the projector registry.

A family file (one per family) defines a `VisionModel` subclass: preprocessing that reproduces the
HF image processor, the encoder + projector as torch modules named after the GGUF tensors, and how
one image expands in the prompt. It registers itself with `@register_projector("type", ...)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from ocula.errors import GGUFError
from ocula.gguf import GGUFFile
from ocula.models.layers import act, sdpa


@dataclass
class VisionConfig:
    projector_type: str
    image_size: int
    patch_size: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    eps: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    activation: str  # "gelu" (tanh), "silu" or "quick_gelu"
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)  # every clip.* key, for family extras

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)


def read_vision_config(f: GGUFFile) -> VisionConfig:
    def req(key: str):
        if key not in f.metadata:
            raise GGUFError(f"{f.path}: mmproj metadata key {key!r} is missing")
        return f.metadata[key]

    ptype = f.get("clip.projector_type") or f.get("clip.vision.projector_type")
    if not ptype:
        raise GGUFError(f"{f.path}: not a vision projector (no clip.projector_type)")
    if f.get("clip.use_gelu"):
        act_name = "gelu"
    elif f.get("clip.use_silu"):
        act_name = "silu"
    else:
        act_name = "quick_gelu"
    return VisionConfig(
        projector_type=ptype,
        image_size=int(req("clip.vision.image_size")),
        patch_size=int(req("clip.vision.patch_size")),
        n_embd=int(req("clip.vision.embedding_length")),
        n_ff=int(f.get("clip.vision.feed_forward_length", 0)),
        n_layer=int(req("clip.vision.block_count")),
        n_head=int(req("clip.vision.attention.head_count")),
        eps=float(f.get("clip.vision.attention.layer_norm_epsilon", 1e-6)),
        image_mean=tuple(f.get("clip.vision.image_mean", (0.5, 0.5, 0.5))),
        image_std=tuple(f.get("clip.vision.image_std", (0.5, 0.5, 0.5))),
        activation=act_name,
        metadata={k: v for k, v in f.metadata.items() if k.startswith("clip.")},
    )


def activation(name: str):
    """The tower's activation: "gelu" (tanh), "gelu_erf", "silu" or "quick_gelu". It may overwrite its
    input: the towers apply it to fresh linear outputs."""
    kernel = {"gelu": "gelu_tanh", "gelu_erf": "gelu_erf", "silu": "silu"}.get(name, "quick_gelu")
    return lambda x: act(x, kernel, inplace=True)


@dataclass
class ImageOptions:
    """Per-call image-token budget; None means the family's HF default."""

    min_tokens: int | None = None
    max_tokens: int | None = None

    def key(self) -> str:
        return f"{self.min_tokens}:{self.max_tokens}"


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # laid out exactly as the HF processor's `pixel_values` for this family
    n_tokens: int  # embeddings the projector emits for this image (= placeholder tokens)
    grid_thw: tuple[int, int, int] | None = None  # Qwen-VL: patch grid (t, h, w) before merging
    extra: dict = field(default_factory=dict)  # family specifics (tile grid, sizes, ...)


class VisionModel(nn.Module):
    """Base class of a family's encoder + projector. Subclasses set the class attributes."""

    placeholder: str = "<image>"  # what the chat template writes for one image
    image_token: str = "<image>"  # token whose embedding rows are replaced by the features
    bidirectional: bool = False  # the image's tokens attend to each other both ways (Gemma 3)
    mrope: bool = False  # text positions of image tokens follow the 2-D grid (Qwen-VL)
    merge_size: int = 1  # grid cells per M-RoPE position, per side

    def __init__(self, cfg: VisionConfig, f: GGUFFile):
        super().__init__()
        self.cfg = cfg

    def preprocess(self, image: Image.Image, options: ImageOptions) -> ProcessedImage:
        raise NotImplementedError

    def encode(self, image: ProcessedImage) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Projector output [n_tokens, n_embd_text] (Qwen3-VL: and its deepstack features)."""
        raise NotImplementedError

    def prompt_text(self, image: ProcessedImage) -> str:
        """Text that replaces one `placeholder` in the rendered prompt (HF processor expansion)."""
        return self.image_token * image.n_tokens

    @property
    def default_max_tokens(self) -> int | None:
        """The most tokens one image takes under the processor's defaults, where an explicit max_tokens above
        it would raise the count (a server's default cap must not); None where max_tokens only ever lowers."""
        return None

    @property
    def output_dim(self) -> int:
        raise NotImplementedError

    def weight_aliases(self) -> dict[str, str]:
        return {}


PROJECTORS: dict[str, type[VisionModel]] = {}


def register_projector(*types: str):
    def deco(cls: type[VisionModel]) -> type[VisionModel]:
        for t in types:
            PROJECTORS[t] = cls
        return cls

    return deco


# ---------------------------------------------------------------- the transformer block all ViTs share


class ViTBlock(nn.Module):
    """Pre-norm ViT block named after GGUF `v.blk.N.*`: ln1 → attention → (ls1) → residual,
    ln2 → MLP (up/down, or SwiGLU with gate) → (ls2) → residual.

    Variants are picked from which tensors the file has: fused `attn_qkv`, `ffn_gate`, `ls1/ls2`
    layer scales, RMSNorm (`norm="rms"`) or LayerNorm.
    """

    def __init__(self, cfg: VisionConfig, f: GGUFFile, index: int, norm: str = "layer"):
        super().__init__()
        from ocula.models.layers import LayerNorm, RMSNorm
        from ocula.quant.linear import QLinear

        d, p = cfg.n_embd, f"v.blk.{index}."
        self.n_head, self.head_dim = cfg.n_head, d // cfg.n_head
        has = lambda name: p + name in f.tensors  # noqa: E731
        make_norm = (lambda: RMSNorm(d, cfg.eps)) if norm == "rms" else (
            lambda: LayerNorm(d, cfg.eps, bias=has("ln1.bias")))
        self.ln1, self.ln2 = make_norm(), make_norm()
        if has("attn_qkv.weight"):
            self.attn_qkv = QLinear(d, 3 * d, bias=has("attn_qkv.bias"))
        else:
            self.attn_q = QLinear(d, d, bias=has("attn_q.bias"))
            self.attn_k = QLinear(d, d, bias=has("attn_k.bias"))
            self.attn_v = QLinear(d, d, bias=has("attn_v.bias"))
        self.attn_out = QLinear(d, d, bias=has("attn_out.bias"))
        n_ff = f.tensor(p + "ffn_up.weight").shape[0]
        if f.tensor(p + "ffn_up.weight").shape[-1] != d:  # legacy files store up/down swapped
            self.swapped_ffn = True
            n_ff = f.tensor(p + "ffn_down.weight").shape[0]
        self.ffn_up = QLinear(d, n_ff, bias=has("ffn_up.bias"))
        self.ffn_down = QLinear(n_ff, d, bias=has("ffn_down.bias"))
        if has("ffn_gate.weight"):
            self.ffn_gate = QLinear(d, n_ff, bias=has("ffn_gate.bias"))
        if has("ls1.weight"):
            self.ls1 = nn.Module()
            self.ls1.weight = nn.Parameter(torch.ones(d), requires_grad=False)
            self.ls2 = nn.Module()
            self.ls2.weight = nn.Parameter(torch.ones(d), requires_grad=False)
        self.act = activation(cfg.activation)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] → q, k, v as [heads, N, head_dim]."""
        n = x.shape[0]
        if hasattr(self, "attn_qkv"):
            q, k, v = self.attn_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.attn_q(x), self.attn_k(x), self.attn_v(x)
        shape = (n, self.n_head, self.head_dim)
        return q.view(shape).transpose(0, 1), k.view(shape).transpose(0, 1), v.view(shape).transpose(0, 1)

    def attention(self, x: torch.Tensor, rope=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = sdpa(q[None], k[None], v[None], attn_mask=mask)[0]
        return self.attn_out(out.transpose(0, 1).reshape(x.shape[0], -1))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "ffn_gate"):
            return self.ffn_down(self.act(self.ffn_gate(x)) * self.ffn_up(x))
        return self.ffn_down(self.act(self.ffn_up(x)))

    def forward(self, x: torch.Tensor, rope=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.attention(self.ln1(x), rope, mask)
        x = x + (h * self.ls1.weight if hasattr(self, "ls1") else h)
        h = self.mlp(self.ln2(x))
        return x + (h * self.ls2.weight if hasattr(self, "ls2") else h)

    def weight_aliases(self, prefix: str) -> dict[str, str]:
        if not getattr(self, "swapped_ffn", False):
            return {}
        return {f"{prefix}ffn_up.{s}": f"{prefix}ffn_down.{s}" for s in ("weight", "bias")} | {
            f"{prefix}ffn_down.{s}": f"{prefix}ffn_up.{s}" for s in ("weight", "bias")}
