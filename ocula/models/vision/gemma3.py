"""Gemma 3 vision: SigLIP ViT + average-pool / RMSNorm / projection ("gemma3" mmproj).

Reference: HF `Gemma3ImageProcessor` (PIL backend) and `Gemma3MultiModalProjector`.

- Preprocessing: RGB, Pillow bilinear *stretch* to image_size x image_size (llama.cpp letterboxes
  instead; we follow HF), x/255 (in float64, then float32), (x - mean) / std.
  Pan-and-scan (off in HF by default) is not implemented: its crops would be separate images with
  their own text between them.
- Encoder: patch conv (+bias) + learned position table, pre-norm LayerNorm blocks with GELU(tanh),
  `v.post_ln`.
- Projector: the patch grid P x P is average-pooled with a k x k kernel (k = stride;
  `clip.vision.projector.scale_factor`, 4 when absent, as in every released Gemma 3), then RMSNorm
  (`mm.soft_emb_norm`, the GGUF weight already holds Gemma's 1 + w) and `x @ W` with
  `mm.input_projection.weight` stored as HF keeps it: [vision width, text width] (the transpose of a
  linear layer's weight), so it is a plain float parameter here, not a QLinear.
- Prompt: HF replaces every `<start_of_image>` by
  "\n\n<start_of_image>" + "<image_soft_token>" * n + "<end_of_image>\n\n"; the image's soft tokens
  attend to each other bidirectionally in the text model.
- The features are *not* scaled by sqrt(n_embd); only text-token embeddings are.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ocula.errors import GGUFError
from ocula.gguf import GGUFFile
from ocula.models.layers import LayerNorm, RMSNorm, patch_embed
from ocula.models.vision.base import (
    ImageOptions,
    ProcessedImage,
    VisionConfig,
    VisionModel,
    ViTBlock,
    register_projector,
)
from ocula.models.vision.pixels import normalized_chw, resize

DEFAULT_POOL = 4  # llama.cpp's default for `clip.vision.projector.scale_factor` (HF: 64 patches -> 16 per side)

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"


@register_projector("gemma3")
class Gemma3Vision(VisionModel):
    placeholder = BOI
    image_token = SOFT
    bidirectional = True

    def __init__(self, cfg: VisionConfig, f: GGUFFile):
        super().__init__(cfg, f)
        d, p, size = cfg.n_embd, cfg.patch_size, cfg.image_size
        if size % p:
            raise GGUFError(f"{f.path}: image_size {size} is not a multiple of patch_size {p}")
        self.side = size // p  # patches per side
        self.pool = int(cfg.get("clip.vision.projector.scale_factor", DEFAULT_POOL) or DEFAULT_POOL)
        if not 1 <= self.pool <= self.side:
            raise GGUFError(f"{f.path}: projector scale_factor {self.pool} does not fit {self.side} patches per side")
        self.tokens_side = self.side // self.pool  # AvgPool2d(k, stride=k) output size

        pos = f.tensor("v.position_embd.weight").shape
        if pos[0] != self.side * self.side:
            raise GGUFError(
                f"{f.path}: position table has {pos[0]} rows but image_size/patch_size gives "
                f"{self.side}x{self.side} patches")

        proj = tuple(f.tensor("mm.input_projection.weight").shape)
        if len(proj) != 2 or d not in proj:
            raise GGUFError(f"{f.path}: mm.input_projection.weight has shape {proj}; expected [{d}, n_embd_text]")
        # convert_hf_to_gguf writes HF's [vision, text] matrix as is; accept a linear-style
        # [text, vision] layout too when the shape says so unambiguously.
        self.proj_transposed = proj[0] != d
        self._out_dim = proj[0] if self.proj_transposed else proj[1]

        self.v = nn.Module()
        self.v.patch_embd = nn.Module()
        self.v.patch_embd.weight = nn.Parameter(torch.zeros(d, 3, p, p), requires_grad=False)
        self.v.patch_embd.bias = nn.Parameter(torch.zeros(d), requires_grad=False)
        self.v.position_embd = nn.Module()
        self.v.position_embd.weight = nn.Parameter(torch.zeros(pos[0], d), requires_grad=False)
        self.v.blk = nn.ModuleList(ViTBlock(cfg, f, i) for i in range(cfg.n_layer))
        self.v.post_ln = LayerNorm(d, cfg.eps, bias="v.post_ln.bias" in f.tensors)

        self.mm = nn.Module()
        self.mm.soft_emb_norm = RMSNorm(d, cfg.eps)
        self.mm.input_projection = nn.Module()
        self.mm.input_projection.weight = nn.Parameter(torch.zeros(proj), requires_grad=False)

    # ------------------------------------------------------------ preprocessing

    def preprocess(self, image: Image.Image, options: ImageOptions) -> ProcessedImage:
        """HF Gemma3ImageProcessorPil: stretch to image_size², rescale, normalize.

        Gemma 3 emits a fixed number of tokens per image: `options` (token budgets) do not apply.
        """
        from ocula.media import to_rgb

        size = self.cfg.image_size
        rgb = to_rgb(image)
        if rgb.size != (size, size):
            rgb = resize(rgb, size, size, Image.Resampling.BILINEAR)
        pixels = normalized_chw([np.asarray(rgb, dtype=np.uint8)], self.cfg.image_mean, self.cfg.image_std)
        return ProcessedImage(pixel_values=pixels, n_tokens=self.tokens_side ** 2)

    # ------------------------------------------------------------ encoder + projector

    def vit(self, pixels: torch.Tensor) -> torch.Tensor:
        """[1, 3, S, S] → last hidden state after post_ln, [P*P, d] in row-major patch order."""
        dtype = self.v.patch_embd.weight.dtype
        x = patch_embed(pixels.to(dtype), self.v.patch_embd.weight, self.v.patch_embd.bias,
                        self.cfg.patch_size)[0]  # [N, d]
        x = x + self.v.position_embd.weight.to(x.dtype)
        for blk in self.v.blk:
            x = blk(x)
        return self.v.post_ln(x)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """[P*P, d] → pooled, normed, projected [(P/k)², n_embd_text]."""
        d = hidden.shape[-1]
        grid = hidden.transpose(0, 1).reshape(1, d, self.side, self.side)
        pooled = F.avg_pool2d(grid, kernel_size=self.pool, stride=self.pool)
        x = pooled.flatten(2)[0].transpose(0, 1)
        x = self.mm.soft_emb_norm(x)
        w = self.mm.input_projection.weight.to(x.dtype)
        return x @ (w.t() if self.proj_transposed else w)

    def encode(self, image: ProcessedImage) -> torch.Tensor:
        pixels = image.pixel_values
        if pixels.dim() == 3:
            pixels = pixels[None]
        s = self.cfg.image_size
        if tuple(pixels.shape[-3:]) != (3, s, s):
            raise ValueError(f"Gemma 3 expects pixel values [.., 3, {s}, {s}], got {tuple(pixels.shape)}")
        feats = [self.project(self.vit(pixels[i : i + 1])) for i in range(pixels.shape[0])]
        return torch.cat(feats, 0)

    # ------------------------------------------------------------ prompt

    def prompt_text(self, image: ProcessedImage) -> str:
        return f"\n\n{BOI}{SOFT * image.n_tokens}{EOI}\n\n"

    @property
    def output_dim(self) -> int:
        return self._out_dim
