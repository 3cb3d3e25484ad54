"""SmolVLM / Idefics3 vision: SigLIP ViT + pixel shuffle + one linear ("idefics3" mmproj).

Reference: HF `SmolVLMImageProcessorPil` / `Idefics3ImageProcessor` (PIL backend), `SmolVLMConnector`
and `SmolVLMProcessor` (prompt expansion).

Preprocessing (every resize is a Pillow resize of the uint8 image, LANCZOS by default):

1. resize so the longest edge is `L` (`clip.vision.preproc_image_size`, HF `size.longest_edge`); the
   other edge is `int(L / aspect)` (or `int(L * aspect)`), bumped to the next even number. Small images
   are scaled *up*. A longest edge above 4096 is then scaled below 4096 (HF's MAX_IMAGE_SIZE).
2. image splitting: resize again so both edges are multiples of the tile size `S`
   (`clip.vision.image_size`, HF `max_image_size.longest_edge`), with HF's rounding: the longer edge is
   rounded up to a multiple of S, the other edge is `int(longer / aspect)` rounded up to a multiple of S.
   If the result is larger than one tile, it is cut into rows x cols tiles (row-major) and the whole
   image, resized to S x S, is appended as the global image. Otherwise the single S x S image is used
   and there is no grid (rows = cols = 0).
3. x/255 in float64 → float32, (x - mean) / std. `pixel_values` is [n_tiles (+1 global), 3, S, S];
   HF's `pixel_attention_mask` is all ones for one image (padding only appears in batches).

Token budget (`ImageOptions`): the number of tokens is (rows * cols + 1) * T, or T without a grid,
where T = (S / patch)^2 / scale^2 tokens per tile. A budget is mapped to the longest-edge target `L`
of step 1 (the same as calling HF with `size={"longest_edge": L}`):
- max_tokens: if the default `L` gives more tokens than max_tokens, `L` becomes the largest multiple
  of S below it whose grid fits (computed for this image's aspect ratio); `L = S` (one tile, T
  tokens) is the floor, so a budget below T still yields T tokens.
- min_tokens: if the default gives fewer, `L` grows in steps of S (up to 4096) until the count
  reaches min_tokens; max_tokens wins when both cannot be met.

Encoder: patch conv (+bias), learned position table (position ids computed exactly as HF's
fractional bucketing, which for full tiles is 0..N-1), pre-norm LayerNorm blocks with GELU(tanh),
`v.post_ln`. Connector: HF pixel shuffle by `clip.vision.projector.scale_factor` (the token of
output cell (i, j) concatenates patches (i*s + a, j*s + b) in (a, b) row-major order), then
`mm.model.fc` (no bias).

Prompt: one `<image>` placeholder becomes, with a grid,
  for each row r, for each col c: "<fake_token_around_image><row_r_col_c>" + "<image>" * T, then "\n"
  after every row; then "\n<fake_token_around_image><global-img>" + "<image>" * T + "<fake_token_around_image>"
and without a grid only "<fake_token_around_image><global-img>" + "<image>" * T + "<fake_token_around_image>".
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import nn

from ocula.errors import GGUFError
from ocula.gguf import GGUFFile
from ocula.models.layers import LayerNorm, patch_embed
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

MAX_IMAGE_SIZE = 4096  # HF: absolute cap on the resized longest edge
DEFAULT_LONGEST_EDGE_TILES = 4  # HF default size.longest_edge = 4 * max_image_size.longest_edge

FAKE, GLOBAL, IMAGE = "<fake_token_around_image>", "<global-img>", "<image>"


# ---------------------------------------------------------------- size arithmetic (HF rounding)


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """(h, w) after scaling the longest edge to `longest` (even other edge), then capping at 4096."""
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        if height % 2:
            height += 1
    else:
        height = longest
        width = int(height * aspect)
        if width % 2:
            width += 1
    height, width = max(height, 1), max(width, 1)
    # scale below the upper bound
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width = MAX_IMAGE_SIZE
        height = int(width / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height = MAX_IMAGE_SIZE
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(h, w) rounded up to multiples of the tile size, HF `resize_for_vision_encoder` rounding."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = int(width / aspect)
        height = math.ceil(height / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = int(height * aspect)
        width = math.ceil(width / tile) * tile
    return height, width


def _resize(img: Image.Image, height: int, width: int, resample) -> Image.Image:
    if img.size == (width, height):  # HF's resize to the same size is a copy: nothing to do
        return img
    return resize(img, width, height, resample)


@register_projector("idefics3")
class Idefics3Vision(VisionModel):
    placeholder = IMAGE
    image_token = IMAGE

    def __init__(self, cfg: VisionConfig, f: GGUFFile):
        super().__init__(cfg, f)
        d, p, size = cfg.n_embd, cfg.patch_size, cfg.image_size
        self.side = size // p  # patches per side (valid conv: a remainder is dropped, as in HF)
        if self.side < 1:
            raise GGUFError(f"{f.path}: image_size {size} is smaller than patch_size {p}")
        self.scale = int(cfg.get("clip.vision.projector.scale_factor", 0) or 0)
        if self.scale < 1 or self.side % self.scale:
            raise GGUFError(
                f"{f.path}: projector scale_factor {self.scale} does not divide {self.side} patches per side")
        self.tokens_per_tile = (self.side // self.scale) ** 2
        self.longest_edge = int(cfg.get("clip.vision.preproc_image_size", 0) or DEFAULT_LONGEST_EDGE_TILES * size)
        self.resample = Image.Resampling.LANCZOS

        pos = tuple(f.tensor("v.position_embd.weight").shape)
        if pos[0] != self.side * self.side:
            raise GGUFError(
                f"{f.path}: position table has {pos[0]} rows but image_size/patch_size gives "
                f"{self.side}x{self.side} patches")
        fc = tuple(f.tensor("mm.model.fc.weight").shape)
        if len(fc) != 2 or fc[1] != d * self.scale ** 2:
            raise GGUFError(
                f"{f.path}: mm.model.fc.weight has shape {fc}; expected [n_embd_text, {d * self.scale ** 2}]")
        self._out_dim = fc[0]

        self.v = nn.Module()
        self.v.patch_embd = nn.Module()
        self.v.patch_embd.weight = nn.Parameter(torch.zeros(d, 3, p, p), requires_grad=False)
        if "v.patch_embd.bias" in f.tensors:
            self.v.patch_embd.bias = nn.Parameter(torch.zeros(d), requires_grad=False)
        self.v.position_embd = nn.Module()
        self.v.position_embd.weight = nn.Parameter(torch.zeros(pos[0], d), requires_grad=False)
        self.v.blk = nn.ModuleList(ViTBlock(cfg, f, i) for i in range(cfg.n_layer))
        self.v.post_ln = LayerNorm(d, cfg.eps, bias="v.post_ln.bias" in f.tensors)
        self.mm = nn.Module()
        self.mm.model = nn.Module()
        self.mm.model.fc = QLinear(fc[1], fc[0], bias="mm.model.fc.bias" in f.tensors)
        self.register_buffer("position_ids", self._position_ids(), persistent=False)

    # ------------------------------------------------------------ preprocessing

    def grid_for(self, height: int, width: int, longest: int) -> tuple[int, int]:
        """(rows, cols) of the tile grid HF produces for an image of this size (0, 0 = no grid)."""
        h, w = longest_edge_size(height, width, longest)
        h, w = tile_multiple_size(h, w, self.cfg.image_size)
        s = self.cfg.image_size
        if h > s or w > s:
            return (h - s) // s + 1, (w - s) // s + 1
        return 0, 0

    def tokens_for(self, height: int, width: int, longest: int) -> int:
        rows, cols = self.grid_for(height, width, longest)
        return (rows * cols + 1) * self.tokens_per_tile

    def choose_longest_edge(self, height: int, width: int, options: ImageOptions) -> int:
        """The longest-edge target that honours the token budget (see the module docstring)."""
        s, longest = self.cfg.image_size, self.longest_edge
        lo, hi = options.min_tokens, options.max_tokens
        if lo is not None and self.tokens_for(height, width, longest) < lo:
            k = longest // s + 1
            while k * s <= MAX_IMAGE_SIZE:
                longest = k * s
                if self.tokens_for(height, width, longest) >= lo:
                    break
                k += 1
        if hi is not None and self.tokens_for(height, width, longest) > hi:
            k = math.ceil(longest / s) - 1
            while k > 1 and self.tokens_for(height, width, k * s) > hi:
                k -= 1
            longest = max(k, 1) * s
        return longest

    def preprocess(self, image: Image.Image, options: ImageOptions) -> ProcessedImage:
        from ocula.media import to_rgb

        s = self.cfg.image_size
        rgb = to_rgb(image)
        width, height = rgb.size
        longest = self.choose_longest_edge(height, width, options or ImageOptions())
        h, w = longest_edge_size(height, width, longest)
        img = _resize(rgb, h, w, self.resample)
        h, w = tile_multiple_size(h, w, s)
        img = _resize(img, h, w, self.resample)
        if h > s or w > s:
            rows, cols = (h - s) // s + 1, (w - s) // s + 1
            arr = np.asarray(img, dtype=np.uint8)
            tiles = [arr[r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(rows) for c in range(cols)]
            tiles.append(np.asarray(_resize(img, s, s, self.resample), dtype=np.uint8))
        else:
            rows = cols = 0
            tiles = [np.asarray(img, dtype=np.uint8)]
        pixels = normalized_chw(tiles, self.cfg.image_mean, self.cfg.image_std)
        n_tokens = len(tiles) * self.tokens_per_tile
        # HF's mask is all ones for a single image; a broadcast view holds it without 8 bytes per pixel
        mask = torch.ones((), dtype=torch.int64).expand(len(tiles), s, s)
        return ProcessedImage(
            pixel_values=pixels,
            n_tokens=n_tokens,
            extra={"rows": rows, "cols": cols, "longest_edge": longest, "pixel_attention_mask": mask},
        )

    # ------------------------------------------------------------ encoder + projector

    def _position_ids(self) -> torch.Tensor:
        """HF's fractional-coordinate bucketing for a full tile (no padded patches)."""
        n = self.side
        boundaries = torch.arange(1 / n, 1.0, 1 / n)
        step = 1.0 / torch.tensor([n], dtype=torch.long)  # as HF: 1 / (mask sum)
        idx = torch.arange(n, dtype=torch.float32)
        frac = torch.clamp(idx[None, :] * step[:, None], max=1.0 - 1e-6)
        buckets = torch.bucketize(frac, boundaries, right=True)[0]
        return (buckets[:, None] * n + buckets[None, :]).reshape(-1)

    def vit(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] → last hidden state after post_ln, [B, P*P, d] in row-major patch order."""
        dtype = self.v.patch_embd.weight.dtype
        bias = getattr(self.v.patch_embd, "bias", None)
        x = patch_embed(pixels.to(dtype), self.v.patch_embd.weight, bias, self.cfg.patch_size)  # [B, N, d]
        x = x + self.v.position_embd.weight[self.position_ids].to(x.dtype)
        out = []
        for h in x:  # tiles are independent sequences
            for blk in self.v.blk:
                h = blk(h)
            out.append(self.v.post_ln(h))
        return torch.stack(out)

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """[B, P*P, d] → [B, (P/s)^2, d*s*s], HF SmolVLMConnector element order."""
        b, n, d = x.shape
        s, p = self.scale, self.side
        x = x.reshape(b, p, p // s, d * s)
        x = x.permute(0, 2, 1, 3)
        x = x.reshape(b, p // s, p // s, d * s * s)
        x = x.permute(0, 2, 1, 3)
        return x.reshape(b, n // (s * s), d * s * s)

    def encode(self, image: ProcessedImage) -> torch.Tensor:
        pixels = image.pixel_values
        if pixels.dim() == 3:
            pixels = pixels[None]
        s = self.cfg.image_size
        if tuple(pixels.shape[-3:]) != (3, s, s):
            raise ValueError(f"Idefics3 expects pixel values [n, 3, {s}, {s}], got {tuple(pixels.shape)}")
        feats = self.mm.model.fc(self.pixel_shuffle(self.vit(pixels)))
        return feats.reshape(-1, feats.shape[-1])

    # ------------------------------------------------------------ prompt

    def prompt_text(self, image: ProcessedImage) -> str:
        run = IMAGE * self.tokens_per_tile
        rows, cols = image.extra.get("rows", 0), image.extra.get("cols", 0)
        glob = f"{FAKE}{GLOBAL}{run}{FAKE}"
        if rows == 0 and cols == 0:
            return glob
        text = ""
        for r in range(rows):
            for c in range(cols):
                text += f"{FAKE}<row_{r + 1}_col_{c + 1}>{run}"
            text += "\n"
        return text + "\n" + glob

    @property
    def output_dim(self) -> int:
        return self._out_dim
