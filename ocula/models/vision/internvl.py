"""InternVL (InternVL 2.5 / 3 / 3.5, HF-native `InternVLForConditionalGeneration`): InternViT + pixel-shuffle MLP.

Numerical reference: HF transformers.

- Preprocessing = `GotOcr2ImageProcessor` as `InternVLProcessor` drives it (`crop_to_patches=True`): pick the
  tile grid whose aspect ratio is closest to the image's (ties: the larger grid while the image area exceeds half
  the grid area), stretch the image to that grid with PIL bicubic, cut it row by row into `image_size` tiles, and
  append a stretched thumbnail tile when there is more than one tile. Each tile: x/255 (float64 → float32), then
  (x - mean) / std in float32.
- Encoder (InternViT): patch conv, CLS token *prepended*, learned position table added in its stored order
  (llama.cpp appends CLS and so shifts the table by one patch — HF is followed here), pre-norm blocks (LayerNorm,
  or RMSNorm for InternViT-6B) with layer scales, exact-erf GELU MLP. CLS is dropped.
- Projector: pixel shuffle by `scale_factor` (= 1 / downsample_ratio) in HF's element order, LayerNorm (eps 1e-5)
  → linear → GELU → linear (`mm.model.mlp.{0,1,3}`).
- Prompt: one `<IMG_CONTEXT>` of the template becomes `<img>` + `<IMG_CONTEXT>` × (tiles × tokens per tile) + `</img>`.
"""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ocula.errors import GGUFError
from ocula.gguf import GGUFFile
from ocula.media import to_rgb
from ocula.models.layers import LayerNorm, RMSNorm, act, patch_embed, sdpa
from ocula.models.vision.base import (
    ImageOptions,
    ProcessedImage,
    VisionConfig,
    VisionModel,
    ViTBlock,
    register_projector,
)
from ocula.models.vision.pixels import normalized_chw, resize
from ocula.quant.linear import QLinear

DEFAULT_MIN_TILES = 1  # GotOcr2ImageProcessor defaults (min_patches / max_patches)
DEFAULT_MAX_TILES = 12
PROJECTOR_LN_EPS = 1e-5  # nn.LayerNorm default used by HF's InternVLMultiModalProjector
QK_NORM_EPS = 1e-6  # InternVLVisionRMSNorm default (InternViT-6B q/k norms)
ATTN_CHUNK_BYTES = 256 * 1024 * 1024  # cap on one attention score block when tiles are batched


# ---------------------------------------------------------------- tiling (GotOcr2 image processor)


def tile_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Candidate (columns, rows) grids with min_tiles <= columns*rows <= max_tiles, fewest tiles first
    (stable: within one tile count, by columns then rows)."""
    grids = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= cols * rows <= max_tiles
    ]
    return sorted(grids, key=lambda g: g[0] * g[1])


def best_tile_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) whose aspect ratio is closest to width/height; on an exact tie the later (larger) grid
    wins while the image area is more than half the grid's pixel area. (1, 1) when no grid qualifies."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in tile_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def tile_image(image: Image.Image, tile: int, min_tiles: int, max_tiles: int) -> tuple[list[np.ndarray], tuple[int, int]]:
    """RGB image → uint8 [S, S, 3] tiles (row-major) + thumbnail when there are several; and the
    (columns, rows) grid."""
    def stretched(w: int, h: int) -> np.ndarray:
        return np.asarray(resize(image, w, h, Image.Resampling.BICUBIC), dtype=np.uint8)

    if max_tiles <= 1:  # HF only crops when max_patches > 1; otherwise one stretched tile
        return [stretched(tile, tile)], (1, 1)
    cols, rows = best_tile_grid(image.width, image.height, tile, min_tiles, max_tiles)
    canvas = stretched(cols * tile, rows * tile)
    tiles = [canvas[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
    if len(tiles) != 1:
        tiles.append(stretched(tile, tile))
    return tiles, (cols, rows)


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """HF InternVL pixel shuffle: [B, G, G, C] → [B, G/f, G/f, C·f²] with HF's element order."""
    b, a, w, c = x.shape
    if a % factor or w % factor:
        raise ValueError(f"patch grid {a}x{w} is not divisible by the pixel-shuffle factor {factor}")
    x = x.reshape(b, a, w // factor, c * factor).permute(0, 2, 1, 3)
    x = x.reshape(b, w // factor, a // factor, c * factor * factor).permute(0, 2, 1, 3)
    return x.contiguous()


# ---------------------------------------------------------------- the model


@register_projector("internvl")
class InternVLVision(VisionModel):
    placeholder = "<IMG_CONTEXT>"
    image_token = "<IMG_CONTEXT>"
    start_token = "<img>"
    end_token = "</img>"

    def __init__(self, cfg: VisionConfig, f: GGUFFile):
        super().__init__(cfg, f)
        d, p, size = cfg.n_embd, cfg.patch_size, cfg.image_size
        if size % p:
            raise GGUFError(f"{f.path}: image_size {size} is not a multiple of patch_size {p}")
        self.grid = size // p
        self.factor = int(cfg.get("clip.vision.projector.scale_factor", 2) or 2)
        if self.grid % self.factor:
            raise GGUFError(f"{f.path}: a {self.grid}x{self.grid} patch grid cannot be pixel-shuffled by {self.factor}")
        self.tokens_per_tile = (self.grid // self.factor) ** 2
        self.min_tiles = int(cfg.get("clip.vision.preproc_min_tiles", 0) or DEFAULT_MIN_TILES)
        self.max_tiles = int(cfg.get("clip.vision.preproc_max_tiles", 0) or DEFAULT_MAX_TILES)

        # HF's hidden_act "gelu" is the exact (erf) GELU; the projector's act (projector_hidden_act) is always "gelu".
        self.act = F.silu if cfg.activation == "silu" else partial(act, name="gelu_erf", inplace=True)

        self.v = nn.Module()
        self.v.patch_embd = nn.Module()
        self.v.patch_embd.weight = nn.Parameter(torch.zeros(d, 3, p, p), requires_grad=False)
        if "v.patch_embd.bias" in f.tensors:
            self.v.patch_embd.bias = nn.Parameter(torch.zeros(d), requires_grad=False)
        self.v.class_embd = nn.Parameter(torch.zeros(f.tensor("v.class_embd").shape), requires_grad=False)
        if "v.position_embd.weight" in f.tensors:
            self.v.position_embd = nn.Module()
            shape = tuple(f.tensor("v.position_embd.weight").shape)
            self.v.position_embd.weight = nn.Parameter(torch.zeros(shape), requires_grad=False)
        norm = "layer" if "v.blk.0.ln1.bias" in f.tensors else "rms"  # InternViT-6B: RMSNorm, no biases
        blocks = []
        for i in range(cfg.n_layer):
            blk = ViTBlock(cfg, f, i, norm=norm)
            blk.act = self.act
            if f"v.blk.{i}.attn_q_norm.weight" in f.tensors:  # qk-norm over the full width (InternViT-6B)
                blk.attn_q_norm = RMSNorm(d, QK_NORM_EPS)
                blk.attn_k_norm = RMSNorm(d, QK_NORM_EPS)
            blocks.append(blk)
        self.v.blk = nn.ModuleList(blocks)

        merged = d * self.factor * self.factor
        w1, w3 = f.tensor("mm.model.mlp.1.weight"), f.tensor("mm.model.mlp.3.weight")
        if w1.shape[-1] != merged:
            raise GGUFError(f"{f.path}: mm.model.mlp.1 expects width {w1.shape[-1]}, pixel shuffle gives {merged}")
        self.mm = nn.Module()
        self.mm.model = nn.Module()
        self.mm.model.mlp = nn.ModuleDict({
            "0": LayerNorm(merged, PROJECTOR_LN_EPS, bias="mm.model.mlp.0.bias" in f.tensors),
            "1": QLinear(merged, w1.shape[0], bias="mm.model.mlp.1.bias" in f.tensors),
            "3": QLinear(w3.shape[-1], w3.shape[0], bias="mm.model.mlp.3.bias" in f.tensors),
        })
        self._out_dim = int(w3.shape[0])

    @property
    def output_dim(self) -> int:
        return self._out_dim

    def weight_aliases(self) -> dict[str, str]:
        out = {}
        for i, blk in enumerate(self.v.blk):
            out.update(blk.weight_aliases(f"v.blk.{i}."))
        return out

    # ------------------------------------------------------------ preprocessing

    @property
    def default_max_tokens(self) -> int:
        tiles = self.max_tiles + 1 if self.max_tiles > 1 else 1  # a grid of several tiles adds a thumbnail
        return tiles * self.tokens_per_tile

    def tile_limits(self, options: ImageOptions) -> tuple[int, int]:
        """Token budget → (min, max) grid tiles. A grid of n > 1 tiles also gets a thumbnail, so it costs
        (n + 1) tiles of tokens: max_tokens is a ceiling on the total, min_tokens a floor."""
        lo, hi = self.min_tiles, self.max_tiles
        t = self.tokens_per_tile
        if options.max_tokens is not None:
            budget = int(options.max_tokens) // t
            hi = budget - 1 if budget >= 3 else 1
        if options.min_tokens is not None:
            need = -(-int(options.min_tokens) // t)
            lo = need - 1 if need >= 3 else max(need, 1)
            if options.max_tokens is None:
                hi = max(hi, lo)
        lo = max(1, min(lo, hi))
        return lo, max(hi, 1)

    def preprocess(self, image: Image.Image, options: ImageOptions) -> ProcessedImage:
        image = to_rgb(image)
        lo, hi = self.tile_limits(options)
        tiles, (cols, rows) = tile_image(image, self.cfg.image_size, lo, hi)
        pixels = normalized_chw(tiles, self.cfg.image_mean, self.cfg.image_std)
        return ProcessedImage(
            pixel_values=pixels,
            n_tokens=len(tiles) * self.tokens_per_tile,
            extra={"grid": (cols, rows), "n_tiles": len(tiles), "thumbnail": len(tiles) > 1,
                   "image_size": image.size},
        )

    def prompt_text(self, image: ProcessedImage) -> str:
        return self.start_token + self.image_token * image.n_tokens + self.end_token

    # ------------------------------------------------------------ encoder

    def _positions(self, gh: int, gw: int, dtype: torch.dtype) -> torch.Tensor | None:
        if not hasattr(self.v, "position_embd"):
            return None
        table = self.v.position_embd.weight.reshape(1, -1, self.cfg.n_embd).to(dtype)
        n_pos = table.shape[1] - 1
        if n_pos == gh * gw and gh == gw:
            return table
        # HF interpolate_pos_encoding: bicubic resize of the patch table (CLS entry kept)
        side = int(math.isqrt(n_pos))
        grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(dtype)
        return torch.cat([table[:, :1], grid], dim=1)

    def _attention(self, blk: ViTBlock, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        if hasattr(blk, "attn_qkv"):
            q, k, v = blk.attn_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = blk.attn_q(x), blk.attn_k(x), blk.attn_v(x)
        if hasattr(blk, "attn_q_norm"):
            q, k = blk.attn_q_norm(q), blk.attn_k_norm(k)
        shape = (b, n, blk.n_head, blk.head_dim)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        step = max(1, ATTN_CHUNK_BYTES // max(1, blk.n_head * n * n * 4))
        out = torch.cat([
            sdpa(q[i : i + step], k[i : i + step], v[i : i + step])
            for i in range(0, b, step)
        ])
        return blk.attn_out(out.transpose(1, 2).reshape(b, n, d))

    def _block(self, blk: ViTBlock, x: torch.Tensor) -> torch.Tensor:
        h = self._attention(blk, blk.ln1(x))
        x = x + (h * blk.ls1.weight.to(x.dtype) if hasattr(blk, "ls1") else h)
        h = blk.mlp(blk.ln2(x))
        return x + (h * blk.ls2.weight.to(x.dtype) if hasattr(blk, "ls2") else h)

    def vit(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] → last hidden states [B, 1 + patches, d] (CLS first)."""
        w = self.v.patch_embd.weight
        bias = getattr(self.v.patch_embd, "bias", None)
        x = patch_embed(pixels.to(w.dtype), w, bias, self.cfg.patch_size)  # [B, gh * gw, d]
        b, d = x.shape[0], x.shape[2]
        gh, gw = pixels.shape[2] // self.cfg.patch_size, pixels.shape[3] // self.cfg.patch_size
        cls = self.v.class_embd.reshape(1, 1, d).to(x.dtype).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = self._positions(gh, gw, x.dtype)
        if pos is not None:
            x = x + pos
        for blk in self.v.blk:
            x = self._block(blk, x)
        return x

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """ViT output (CLS first) → projector rows [B * tokens_per_tile, out]."""
        x = hidden[:, 1:]
        b, n, d = x.shape
        side = int(math.isqrt(n))
        x = pixel_shuffle(x.reshape(b, side, side, d), self.factor)
        x = x.reshape(b, -1, x.shape[-1])
        mlp = self.mm.model.mlp
        x = mlp["3"](act(mlp["1"](mlp["0"](x)), "gelu_erf", inplace=True))
        return x.reshape(-1, x.shape[-1])

    def encode(self, image: ProcessedImage) -> torch.Tensor:
        return self.project(self.vit(image.pixel_values))
