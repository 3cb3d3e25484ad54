"""LLaVA-1.5 and LLaVA-1.6 (NeXT) vision: CLIP ViT + 2-layer MLP projector ("mlp" mmproj).

Numerical reference: HF transformers (`CLIPImageProcessor` / `LlavaNextImageProcessor`, PIL backend;
`LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration`), not llama.cpp.

Preprocessing
- LLaVA-1.5 (no `clip.vision.image_grid_pinpoints`): RGB, Pillow bicubic resize so the shorter side becomes
  `image_size` (the longer side is `int(image_size * long / short)`, truncated, as HF computes it), center crop
  to `image_size` x `image_size` (offsets `(dim - crop) // 2`; zero padding if the image is smaller),
  x/255 in float64 then float32, (x - mean) / std in float32. llama.cpp letterboxes to a square with a grey
  pad colour instead; HF is followed.
- LLaVA-1.6 (pinpoints present, "anyres"): the pinpoints are (height, width) pairs as HF reads them. The best
  one maximises the effective resolution `min(int(w*s) * int(h*s), w*h)` with `s = min(W/w, H/h)`, ties broken by
  the least wasted area (first wins on a full tie). The image is resized (bicubic, aspect kept, the scaled side
  rounded up and capped) to fit it, centred on a black canvas of that size (extra pixel on the right/bottom),
  cut row-major into `image_size` tiles, and preceded by a base tile: the whole image stretched to
  `image_size` x `image_size`. Every tile is then rescaled and normalized as above.
  `pixel_values` is [1 + tiles, 3, S, S] (HF's per-image slice).

Encoder (HF `CLIPVisionModel`)
- Patch conv (bias if the file has one), CLS (`v.class_embd`) *prepended* and the position table added in its
  stored order (llama.cpp appends CLS, shifting every patch's position by one), `v.pre_ln`, pre-norm
  LayerNorm blocks (quick GELU unless `clip.use_gelu`, which is HF's exact-erf "gelu").
- Feature layer: HF takes `hidden_states[vision_feature_layer]` (-2 for LLaVA), where hidden_states[0] is the
  pre-LN output and [i] the output of block i. The legacy converter stores only the blocks HF needs:
  without `clip.vision.feature_layer` it already dropped HF's last block, so *every* stored block runs
  (llama.cpp runs one fewer); with `clip.vision.feature_layer` (non-negative hidden-state indices) the blocks
  up to the largest index run and the selected hidden states are concatenated on the channel axis.
  `v.post_ln` is never applied (HF's post-layernorm only touches the pooled CLS output).
- CLS row dropped (strategy "default"), projector `mm.0` -> GELU (erf, HF `projector_hidden_act="gelu"`) -> `mm.2`.

LLaVA-1.6 packing (HF `LlavaNextModel.pack_image_features`)
- Base-tile rows first; then the tile features are laid out as one [rows*g, cols*g] grid (g = S / patch),
  the rows/columns the padding added are cut away (HF `unpad_image`), and, when the file has the learned
  newline embedding (`model.image_newline` from the legacy converter, or `v.image_newline`), one newline row
  is appended after each grid row.
- Tokens = g² + H'·W' + H' (newline) where H' x W' is the unpadded grid, exactly as `LlavaNextProcessor`
  counts them.

Prompt: the template's `<image>` becomes `<image>` x n_tokens (`LlavaProcessor` / `LlavaNextProcessor`).

Token budgets (`ImageOptions`): LLaVA-1.5 always emits (S/p)² tokens, budgets do not apply. LLaVA-1.6 keeps
HF's choice by default; with a budget the pinpoints whose token count for this image falls outside
[min_tokens, max_tokens] are dropped before the best-fit choice (max wins a conflict; if none fits, the
pinpoint giving the fewest tokens when max is violated, else the most).

Projector types `mlp_norm` (Yi-VL), `ldp`/`ldpv2` (MobileVLM) have no HF transformers model and are not
supported (`mlp` files holding `mm.3` are really `mlp_norm` and are refused).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import nn

from ocula.errors import GGUFError, UnsupportedError
from ocula.gguf import GGUFFile
from ocula.media import to_rgb
from ocula.models.layers import LayerNorm, act, patch_embed, sdpa
from ocula.models.vision.base import (
    ImageOptions,
    ProcessedImage,
    VisionConfig,
    VisionModel,
    ViTBlock,
    activation,
    register_projector,
)
from ocula.models.vision.pixels import normalized_chw, resize
from ocula.quant.linear import QLinear

NEWLINE_TENSORS = ("model.image_newline", "v.image_newline")
ATTN_CHUNK_BYTES = 256 * 1024 * 1024  # cap on one attention-score block when tiles are batched


# ---------------------------------------------------------------- geometry (HF image-processing rules)


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """HF `get_resize_output_image_size(default_to_square=False)`: shorter side -> size, longer side
    `int(size * long / short)` (truncated). Returns (height, width)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def select_best_resolution(image_hw: tuple[int, int], resolutions: list[tuple[int, int]]) -> tuple[int, int]:
    """HF `select_best_resolution`: (height, width) candidate with the largest effective resolution, then the
    least waste; the first candidate wins a full tie."""
    h, w = image_hw
    best, best_eff, best_waste = None, 0, float("inf")
    for ch, cw in resolutions:
        scale = min(cw / w, ch / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = ch * cw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ch, cw), eff, waste
    return best


def patch_output_size(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """HF `get_patch_output_size`: aspect-preserving size inside target (the scaled side rounded up, capped)."""
    h, w = image_hw
    th, tw = target_hw
    sw, sh = tw / w, th / h
    if sw < sh:
        return min(math.ceil(h * sw), th), tw
    return th, min(math.ceil(w * sh), tw)


def unpad_bounds(image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """HF `unpad_image` on a [C, gh, gw] feature grid of an image of size image_hw.
    Returns (row_start, row_stop, col_start, col_stop) of the kept region."""
    oh, ow = image_hw
    gh, gw = grid_hw
    if ow / oh > gw / gh:
        new_h = int(round(oh * (gw / ow), 7))
        pad = (gh - new_h) // 2
        return pad, gh - pad, 0, gw
    new_w = int(round(ow * (gh / oh), 7))
    pad = (gw - new_w) // 2
    return 0, gh, pad, gw - pad


def anyres_token_count(image_hw: tuple[int, int], resolution: tuple[int, int], image_size: int, patch_size: int,
                       newline: bool = True) -> int:
    """Image tokens of a LLaVA-NeXT image placed on `resolution` (CLS dropped): base g² + unpadded grid
    + one newline per kept row."""
    g = image_size // patch_size
    rows, cols = resolution[0] // image_size, resolution[1] // image_size
    r0, r1, c0, c1 = unpad_bounds(image_hw, (rows * g, cols * g))
    kept_rows = r1 - r0
    return g * g + kept_rows * (c1 - c0) + (kept_rows if newline else 0)


def center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """HF numpy `center_crop` on an [H, W, C] array: offsets (dim - crop) // 2, zero padding when the image is
    smaller than the crop (padding offsets rounded up, as HF does)."""
    h, w = arr.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return arr[top : top + crop_h, left : left + crop_w]
    nh, nw = max(crop_h, h), max(crop_w, w)
    canvas = np.zeros((nh, nw) + arr.shape[2:], dtype=arr.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas[tp : tp + h, lp : lp + w] = arr
    top, left = top + tp, left + lp
    return canvas[max(0, top) : min(nh, top + crop_h), max(0, left) : min(nw, left + crop_w)]


# ---------------------------------------------------------------- the model


@register_projector("mlp")
class LlavaVision(VisionModel):
    placeholder = "<image>"
    image_token = "<image>"

    def __init__(self, cfg: VisionConfig, f: GGUFFile):
        super().__init__(cfg, f)
        d, p, size = cfg.n_embd, cfg.patch_size, cfg.image_size
        if size % p:
            raise GGUFError(f"{f.path}: image_size {size} is not a multiple of patch_size {p}")
        if "mm.3.weight" in f.tensors:
            raise UnsupportedError(
                f"{f.path}: this 'mlp' projector has mm.3 (a Yi-VL 'mlp_norm' projector), which is not supported")
        self.grid = size // p

        layers = [int(i) for i in cfg.get("clip.vision.feature_layer") or [] if int(i) >= 0]  # -1 = unset
        if layers:
            if max(layers) > cfg.n_layer:
                raise GGUFError(f"{f.path}: clip.vision.feature_layer {layers} is outside 0..{cfg.n_layer}")
        else:  # legacy converter: the stored blocks are exactly the ones HF's feature layer needs
            layers = [cfg.n_layer]
        self.feature_layers = layers
        n_run = max(layers)

        self.v = nn.Module()
        self.v.patch_embd = nn.Module()
        self.v.patch_embd.weight = nn.Parameter(torch.zeros(d, 3, p, p), requires_grad=False)
        if "v.patch_embd.bias" in f.tensors:
            self.v.patch_embd.bias = nn.Parameter(torch.zeros(d), requires_grad=False)
        self.has_cls = "v.class_embd" in f.tensors
        if self.has_cls:
            self.v.class_embd = nn.Parameter(torch.zeros(d), requires_grad=False)
        n_pos = self.grid * self.grid + int(self.has_cls)
        if "v.position_embd.weight" in f.tensors:
            got = tuple(f.tensor("v.position_embd.weight").shape)
            if got != (n_pos, d):
                raise GGUFError(f"{f.path}: v.position_embd.weight has shape {got}, expected {(n_pos, d)} "
                                f"for {size}px images with {p}px patches")
            self.v.position_embd = nn.Module()
            self.v.position_embd.weight = nn.Parameter(torch.zeros(n_pos, d), requires_grad=False)
        if "v.pre_ln.weight" in f.tensors:
            self.v.pre_ln = LayerNorm(d, cfg.eps, bias="v.pre_ln.bias" in f.tensors)

        # HF CLIP: "quick_gelu" (llama.cpp's default) or "gelu" = exact erf GELU (clip.use_gelu)
        act_name = "gelu_erf" if cfg.activation == "gelu" else cfg.activation
        blocks = []
        for i in range(n_run):
            blk = ViTBlock(cfg, f, i)
            if any(hasattr(blk, a) for a in ("attn_qkv", "ls1", "ffn_gate")):
                raise UnsupportedError(
                    f"{f.path}: CLIP blocks with fused qkv, layer scales or gated FFNs are not supported for 'mlp'")
            blk.act = activation(act_name)
            blocks.append(blk)
        self.v.blk = nn.ModuleList(blocks)

        w0, w2 = f.tensor("mm.0.weight"), f.tensor("mm.2.weight")
        feat = d * len(layers)
        if w0.shape[-1] != feat:
            raise GGUFError(f"{f.path}: mm.0 expects width {w0.shape[-1]} but the feature layers give {feat}")
        self.mm = nn.ModuleDict({
            "0": QLinear(feat, w0.shape[0], bias="mm.0.bias" in f.tensors),
            "2": QLinear(w2.shape[-1], w2.shape[0], bias="mm.2.bias" in f.tensors),
        })
        self._out_dim = int(w2.shape[0])

        # LLaVA-1.6 anyres
        pins = cfg.get("clip.vision.image_grid_pinpoints")
        self.pinpoints: list[tuple[int, int]] | None = None
        if pins:
            pins = [int(v) for v in pins]
            if len(pins) % 2:
                raise GGUFError(f"{f.path}: clip.vision.image_grid_pinpoints has an odd length {len(pins)}")
            self.pinpoints = [(pins[i], pins[i + 1]) for i in range(0, len(pins), 2)]  # (height, width) as HF
            bad = [r for r in self.pinpoints if r[0] % size or r[1] % size or min(r) <= 0]
            if bad:
                raise GGUFError(f"{f.path}: grid pinpoints {bad} are not positive multiples of image_size {size}")
        newline = next((n for n in NEWLINE_TENSORS if n in f.tensors), None)
        if newline is not None:
            from ocula.models.weights import float_tensor

            value = float_tensor(f.tensor(newline)).reshape(-1)
            if value.numel() != self._out_dim:
                raise GGUFError(f"{f.path}: {newline} has {value.numel()} values, the projector emits {self._out_dim}")
            self.register_buffer("image_newline", value, persistent=False)
        else:
            self.image_newline = None

    @property
    def output_dim(self) -> int:
        return self._out_dim

    def weight_aliases(self) -> dict[str, str]:
        out = {}
        for i, blk in enumerate(self.v.blk):
            out.update(blk.weight_aliases(f"v.blk.{i}."))
        return out

    # ------------------------------------------------------------ preprocessing

    def token_count(self, image_hw: tuple[int, int], resolution: tuple[int, int] | None = None) -> int:
        if self.pinpoints is None:
            return self.grid * self.grid
        if resolution is None:
            resolution = select_best_resolution(image_hw, self.pinpoints)
        return anyres_token_count(image_hw, resolution, self.cfg.image_size, self.cfg.patch_size,
                                  newline=self.image_newline is not None)

    def candidate_resolutions(self, image_hw: tuple[int, int], options: ImageOptions) -> list[tuple[int, int]]:
        """Pinpoints allowed by the token budget for this image (all of them by default)."""
        pins = self.pinpoints
        lo, hi = options.min_tokens, options.max_tokens
        if lo is None and hi is None:
            return pins
        counts = {r: self.token_count(image_hw, r) for r in pins}
        ok = [r for r in pins if (lo is None or counts[r] >= lo) and (hi is None or counts[r] <= hi)]
        if ok:
            return ok
        if hi is not None and any(counts[r] <= hi for r in pins):  # max wins when both cannot be met
            return [r for r in pins if counts[r] <= hi]
        if hi is not None:
            fewest = min(counts.values())
            return [r for r in pins if counts[r] == fewest]
        most = max(counts.values())
        return [r for r in pins if counts[r] == most]

    def _finish(self, tile: np.ndarray) -> np.ndarray:
        """Per-tile `resize(shortest_edge)` + `center_crop` of the HF processor (no-ops on S x S tiles)."""
        s = self.cfg.image_size
        h, w = tile.shape[:2]
        nh, nw = shortest_edge_size(h, w, s)
        if (nh, nw) != (h, w):
            tile = np.asarray(resize(Image.fromarray(tile), nw, nh, Image.Resampling.BICUBIC))
        return center_crop(tile, s, s)

    def preprocess(self, image: Image.Image, options: ImageOptions) -> ProcessedImage:
        rgb = to_rgb(image)
        s = self.cfg.image_size
        hw = (rgb.height, rgb.width)
        if self.pinpoints is None:
            tile = self._finish(np.asarray(rgb, dtype=np.uint8))
            pixels = normalized_chw([tile], self.cfg.image_mean, self.cfg.image_std)
            return ProcessedImage(pixel_values=pixels, n_tokens=self.grid * self.grid, extra={"image_size": hw})

        best = select_best_resolution(hw, self.candidate_resolutions(hw, options or ImageOptions()))
        nh, nw = patch_output_size(hw, best)
        resized = np.asarray(resize(rgb, nw, nh, Image.Resampling.BICUBIC), dtype=np.uint8)
        canvas = np.zeros((best[0], best[1], 3), dtype=np.uint8)
        top, left = (best[0] - nh) // 2, (best[1] - nw) // 2
        canvas[top : top + nh, left : left + nw] = resized
        rows, cols = best[0] // s, best[1] // s
        tiles = [np.asarray(resize(rgb, s, s, Image.Resampling.BICUBIC), dtype=np.uint8)]
        tiles += [canvas[r * s : (r + 1) * s, c * s : (c + 1) * s] for r in range(rows) for c in range(cols)]
        pixels = normalized_chw([self._finish(t) for t in tiles], self.cfg.image_mean, self.cfg.image_std)
        return ProcessedImage(
            pixel_values=pixels,
            n_tokens=self.token_count(hw, best),
            extra={"image_size": hw, "best_resolution": best, "grid": (rows, cols)},
        )

    # ------------------------------------------------------------ encoder

    def _attention(self, blk: ViTBlock, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = blk.attn_q(x), blk.attn_k(x), blk.attn_v(x)
        shape = (b, n, blk.n_head, blk.head_dim)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        step = max(1, ATTN_CHUNK_BYTES // max(1, blk.n_head * n * n * x.element_size()))
        out = torch.cat([
            sdpa(q[i : i + step], k[i : i + step], v[i : i + step])
            for i in range(0, b, step)
        ])
        return blk.attn_out(out.transpose(1, 2).reshape(b, n, d))

    def _block(self, blk: ViTBlock, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attention(blk, blk.ln1(x))
        return x + blk.mlp(blk.ln2(x))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> selected hidden states [B, patches, d * n_layers] (CLS removed)."""
        w = self.v.patch_embd.weight
        x = patch_embed(pixels.to(w.dtype), w, getattr(self.v.patch_embd, "bias", None), self.cfg.patch_size)
        b, d = x.shape[0], x.shape[2]
        if self.has_cls:
            x = torch.cat([self.v.class_embd.reshape(1, 1, d).to(x.dtype).expand(b, -1, -1), x], dim=1)
        if hasattr(self.v, "position_embd"):
            x = x + self.v.position_embd.weight.to(x.dtype)
        if hasattr(self.v, "pre_ln"):
            x = self.v.pre_ln(x)
        hidden = [x]
        for blk in self.v.blk:
            x = self._block(blk, x)
            hidden.append(x)
        out = torch.cat([hidden[i] for i in self.feature_layers], dim=-1)
        return out[:, 1:] if self.has_cls else out

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.mm["2"](act(self.mm["0"](x), "gelu_erf", inplace=True))

    def pack(self, tiles: torch.Tensor, image: ProcessedImage) -> torch.Tensor:
        """HF LlavaNext `pack_image_features` for one image: tiles [1 + rows*cols, g*g, C] -> [n_tokens, C]."""
        g = self.grid
        rows, cols = image.extra["grid"]
        c = tiles.shape[-1]
        base, rest = tiles[0], tiles[1:]
        grid = rest.reshape(rows, cols, g, g, c).permute(4, 0, 2, 1, 3).reshape(c, rows * g, cols * g)
        r0, r1, c0, c1 = unpad_bounds(image.extra["image_size"], (rows * g, cols * g))
        grid = grid[:, r0:r1, c0:c1]
        if self.image_newline is not None:
            nl = self.image_newline.to(grid.device, grid.dtype)[:, None, None].expand(c, grid.shape[1], 1)
            grid = torch.cat([grid, nl], dim=-1)
        return torch.cat([base, grid.reshape(c, -1).transpose(0, 1)], dim=0)

    def encode(self, image: ProcessedImage) -> torch.Tensor:
        out = self.project(self.features(image.pixel_values))
        if self.pinpoints is None:
            return out.reshape(-1, out.shape[-1])
        return self.pack(out, image)
