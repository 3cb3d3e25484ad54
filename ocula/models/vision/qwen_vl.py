"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers ("qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger").

Numerical reference: HF transformers (`Qwen2VLImageProcessorPil` and the three `*VisionModel` forwards).

Preprocessing (the same processor class for all three; Qwen3-VL only changes its settings):
- RGB, then `smart_resize`: both sides rounded to a multiple of factor = patch * merge, and scaled into
  [min_pixels, max_pixels] keeping the aspect ratio; HF resizes *straight* to that size with PIL bicubic
  (no letterbox — llama.cpp pads instead, HF is followed here). x/255 in float64 → float32, then
  (x - mean) / std in float32.
- The frame is repeated to `temporal_patch_size` (2) frames and cut into p x p patches whose rows are
  ordered by 2x2 merge block (block row-major, then row-major inside the block); each row is laid out
  (channel, frame, y, x) → `pixel_values` [n_patches, 3 * 2 * p * p] and grid (t, h, w) in patches.
- Default pixel budget: `clip.vision.image_min_pixels` / `image_max_pixels` when the mmproj has them,
  else the released models' processor settings (Qwen2/2.5-VL 56² .. 28²·16384 px = 4 .. 16384 tokens,
  Qwen3-VL 65536 .. 16777216 px = 64 .. 16384 tokens). `ImageOptions(min_tokens, max_tokens)` sets the
  budget in merged tokens: pixels = tokens * (patch * merge)².

Encoder:
- Conv3d patch embedding = one matmul over the patch rows; the GGUF stores the kernel as two 2-D slices
  (`v.patch_embd.weight` for frame 0, `v.patch_embd.weight.1` for frame 1), Qwen3-VL with a bias.
- Qwen3-VL adds a learned position table (`v.position_embd.weight`, side² rows) bilinearly resampled to
  the patch grid exactly as HF's `fast_pos_embed_interpolate` (linspace corners, 4 weighted taps).
- 2-D rotary on q/k (theta 10000, head_dim/2 rotated pairs: the first half driven by the patch row, the
  second by the column; rotate-half style), attention only within one frame of one image.
- Blocks: Qwen2-VL LayerNorm + quick-GELU MLP; Qwen2.5-VL RMSNorm + SiLU-gated MLP with window attention
  (windows of `window_size / patch / merge` merged tokens per side, 112 px by default; patches are
  reordered window by window, layers with (i + 1) % n_wa_pattern == 0 attend over the whole frame, and
  the merger output is put back in raster order); Qwen3-VL LayerNorm + GELU(tanh) MLP with fused qkv.
- Merger: norm (`v.post_ln`; LayerNorm, RMSNorm for 2.5) then the 2x2 group of patch vectors is
  concatenated → `mm.0` → GELU(erf) → `mm.2`. Qwen3-VL deepstack mergers `v.deepstack.N` read the hidden
  state after absolute ViT layer N and normalise *after* the concatenation (HF `use_postshuffle_norm`,
  detected from the norm width); their outputs go to text layers 0..K-1 in increasing N.

Prompt: the template writes `<|vision_start|><|image_pad|><|vision_end|>`; the pad becomes n_tokens pads.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ocula.errors import GGUFError, MediaError, RequestError
from ocula.gguf import GGUFFile
from ocula.media import to_rgb
from ocula.models.layers import LayerNorm, RMSNorm, act, sdpa
from ocula.models.vision.base import (
    ImageOptions,
    ProcessedImage,
    VisionConfig,
    VisionModel,
    ViTBlock,
    register_projector,
)
from ocula.models.vision.pixels import resize, value_table
from ocula.models.weights import float_tensor
from ocula.quant.linear import QLinear

IMAGE_PAD = "<|image_pad|>"
MERGER_EPS = 1e-6  # HF PatchMerger ln_q / Qwen3 merger norms
VIT_ROPE_THETA = 10000.0
DEFAULT_WINDOW_PX = 112  # Qwen2.5-VL window_size
MAX_ASPECT = 200  # smart_resize refuses more extreme aspect ratios
# (min_pixels, max_pixels) of the released processors, used when the mmproj carries none
QWEN2_PIXELS = (56 * 56, 28 * 28 * 16384)
QWEN3_PIXELS = (65536, 16777216)
ATTN_SCORE_BYTES = 256 * 1024 * 1024  # cap on one attention call's score block (windows batched, long rows chunked)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """HF `smart_resize`: (height, width) multiples of `factor` with min_pixels <= area <= max_pixels
    (rounding first, then scaling down with floor or up with ceil), keeping the aspect ratio."""
    if min(height, width) <= 0:
        raise MediaError(f"image of size {width}x{height} is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise MediaError(
            f"image aspect ratio {max(height, width) / min(height, width):.1f} is too extreme "
            f"(Qwen-VL accepts at most {MAX_ASPECT}:1)")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _DeepstackMerger(nn.Module):
    """`v.deepstack.N.{norm,fc1,fc2}`: norm → fc1 → GELU → fc2 over 2x2-merged patches."""

    def __init__(self, f: GGUFFile, prefix: str, eps: float):
        super().__init__()
        norm_dim = f.tensor(prefix + "norm.weight").shape[0]
        fc1, fc2 = f.tensor(prefix + "fc1.weight").shape, f.tensor(prefix + "fc2.weight").shape
        self.norm = LayerNorm(norm_dim, eps, bias=prefix + "norm.bias" in f.tensors)
        self.fc1 = QLinear(fc1[1], fc1[0], bias=prefix + "fc1.bias" in f.tensors)
        self.fc2 = QLinear(fc2[1], fc2[0], bias=prefix + "fc2.bias" in f.tensors)


@register_projector("qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger")
class QwenVLVision(VisionModel):
    placeholder = IMAGE_PAD
    image_token = IMAGE_PAD
    mrope = True
    merge_size = 2

    def __init__(self, cfg: VisionConfig, f: GGUFFile):
        super().__init__(cfg, f)
        ptype = cfg.projector_type
        self.version = 3 if ptype == "qwen3vl_merger" else 25 if ptype == "qwen2.5vl_merger" else 2
        d, p = cfg.n_embd, cfg.patch_size
        if d % cfg.n_head or (d // cfg.n_head) % 4:
            raise GGUFError(f"{f.path}: vision width {d} / {cfg.n_head} heads does not suit 2-D rotary")
        self.head_dim = d // cfg.n_head
        self.merge_size = int(cfg.get("clip.vision.spatial_merge_size", 2) or 2)
        m = self.merge_size
        self.unit = m * m  # patches per merged token
        has = lambda name: name in f.tensors  # noqa: E731

        # ---- patch embedding (Conv3d over `temporal` frames, stored as 2-D slices)
        self.v = nn.Module()
        self.v.patch_embd = nn.Module()
        self.v.patch_embd.weight = nn.Parameter(torch.zeros(d, 3, p, p), requires_grad=False)
        if has("v.patch_embd.bias"):
            self.v.patch_embd.bias = nn.Parameter(torch.zeros(d), requires_grad=False)
        self.temporal = 2 if has("v.patch_embd.weight.1") else 1
        if self.temporal == 2:
            t1 = f.tensor("v.patch_embd.weight.1")
            if tuple(t1.shape) != (d, 3, p, p):
                raise GGUFError(f"{f.path}: v.patch_embd.weight.1 has shape {tuple(t1.shape)}, expected {(d, 3, p, p)}")
            self.v.patch_embd.register_buffer("weight_1", float_tensor(t1), persistent=False)

        # ---- learned position table (Qwen3-VL)
        self.pos_side = 0
        if has("v.position_embd.weight"):
            rows = f.tensor("v.position_embd.weight").shape[0]
            side = math.isqrt(rows)
            if side * side != rows:
                raise GGUFError(f"{f.path}: v.position_embd.weight has {rows} rows, not a square grid")
            self.pos_side = side
            self.v.position_embd = nn.Module()
            self.v.position_embd.weight = nn.Parameter(torch.zeros(rows, d), requires_grad=False)

        # ---- blocks
        norm = "rms" if self.version == 25 else "layer"
        self.v.blk = nn.ModuleList(ViTBlock(cfg, f, i, norm=norm) for i in range(cfg.n_layer))
        rot = self.head_dim // 2  # rotary width per axis pair: head_dim/4 row frequencies + head_dim/4 column ones
        inv = 1.0 / (VIT_ROPE_THETA ** (torch.arange(0, rot, 2, dtype=torch.float) / rot))
        self.register_buffer("rope_inv_freq", inv, persistent=False)

        # ---- window attention (Qwen2.5-VL)
        self.full_layers = [True] * cfg.n_layer
        self.window = 0  # merged tokens per window side; 0 = no window attention
        if self.version == 25:
            explicit = cfg.get("clip.vision.wa_layer_indexes")
            n_wa = int(cfg.get("clip.vision.n_wa_pattern", 0) or 0)
            if explicit:
                full = {int(i) for i in explicit}
                self.full_layers = [i in full for i in range(cfg.n_layer)]
            elif n_wa > 0:
                self.full_layers = [(i + 1) % n_wa == 0 for i in range(cfg.n_layer)]
            else:
                raise GGUFError(f"{f.path}: qwen2.5vl_merger needs clip.vision.n_wa_pattern (full-attention layers)")
            window_px = int(cfg.get("clip.vision.window_size", 0) or DEFAULT_WINDOW_PX)
            self.window = max(1, window_px // m // p)

        # ---- merger: v.post_ln → mm.0 → GELU → mm.2
        post = f.tensor("v.post_ln.weight").shape[0]
        if post not in (d, d * self.unit):
            raise GGUFError(f"{f.path}: v.post_ln has width {post}, expected {d} or {d * self.unit}")
        self.v.post_ln = (RMSNorm(post, MERGER_EPS) if self.version == 25 and not has("v.post_ln.bias")
                          else LayerNorm(post, MERGER_EPS, bias=has("v.post_ln.bias")))
        mm0, mm2 = f.tensor("mm.0.weight").shape, f.tensor("mm.2.weight").shape
        if mm0[1] != d * self.unit:
            raise GGUFError(f"{f.path}: mm.0.weight takes {mm0[1]} inputs, expected {d * self.unit} "
                            f"({self.unit} patches of width {d})")
        self.mm = nn.Module()
        self.mm.add_module("0", QLinear(mm0[1], mm0[0], bias=has("mm.0.bias")))
        self.mm.add_module("2", QLinear(mm2[1], mm2[0], bias=has("mm.2.bias")))
        self._out_dim = mm2[0]

        # ---- deepstack mergers (Qwen3-VL), keyed by absolute ViT layer
        layers = sorted({int(n.split(".")[2]) for n in f.tensors if n.startswith("v.deepstack.")})
        if layers:
            if layers[-1] >= cfg.n_layer:
                raise GGUFError(f"{f.path}: deepstack merger on layer {layers[-1]} but the ViT has {cfg.n_layer}")
            self.v.deepstack = nn.ModuleDict(
                {str(n): _DeepstackMerger(f, f"v.deepstack.{n}.", MERGER_EPS) for n in layers})
            for n in layers:
                ds = self.v.deepstack[str(n)]
                if ds.fc1.in_features != d * self.unit or ds.fc2.out_features != self._out_dim:
                    raise GGUFError(f"{f.path}: v.deepstack.{n} shapes do not fit the merger")
        self.deepstack_layers = layers
        self.pixel_defaults = self._default_pixels(cfg)

    def _default_pixels(self, cfg: VisionConfig) -> tuple[int, int]:
        lo, hi = QWEN3_PIXELS if self.version == 3 else QWEN2_PIXELS
        lo = int(cfg.get("clip.vision.image_min_pixels", 0) or lo)
        hi = int(cfg.get("clip.vision.image_max_pixels", 0) or hi)
        return lo, hi

    # ------------------------------------------------------------ preprocessing

    @property
    def default_max_tokens(self) -> int:
        return self.pixel_defaults[1] // (self.cfg.patch_size * self.merge_size) ** 2

    def pixel_budget(self, options: ImageOptions | None) -> tuple[int, int]:
        lo, hi = self.pixel_defaults
        if options is None:
            return lo, hi
        per_token = (self.cfg.patch_size * self.merge_size) ** 2
        for name in ("min_tokens", "max_tokens"):
            value = getattr(options, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise RequestError(f"image {name} must be a positive integer, got {value!r}")
        if options.min_tokens is not None and options.max_tokens is not None \
                and options.min_tokens > options.max_tokens:
            raise RequestError(f"image token budget is empty: min_tokens {options.min_tokens} > "
                               f"max_tokens {options.max_tokens}")
        # a bound given alone wins over the other bound's default (e.g. max 16 tokens under Qwen3-VL's min 64)
        if options.min_tokens is not None:
            lo = options.min_tokens * per_token
            hi = max(hi, lo)
        if options.max_tokens is not None:
            hi = options.max_tokens * per_token
            lo = min(lo, hi)
        return lo, hi

    def preprocess(self, image: Image.Image, options: ImageOptions) -> ProcessedImage:
        p, m, T = self.cfg.patch_size, self.merge_size, self.temporal
        rgb = to_rgb(image)
        width, height = rgb.size
        lo, hi = self.pixel_budget(options)
        rh, rw = smart_resize(height, width, p * m, lo, hi)
        if (rw, rh) != (width, height):
            rgb = resize(rgb, rw, rh, Image.Resampling.BICUBIC)
        arr = np.asarray(rgb, dtype=np.uint8)  # [H, W, 3]
        gh, gw = rh // p, rw // p
        # HF's patch order: merge blocks row-major, the m x m patches of a block, then channel, time, p x p.
        # Reorder the bytes first (4x less to move than float32), then map each byte through the table.
        blocks = arr.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
        blocks = np.ascontiguousarray(blocks).reshape(gh * gw, 3, p, p)
        table = value_table(self.cfg.image_mean, self.cfg.image_std)
        out = np.empty((gh * gw, 3, T, p, p), dtype=np.float32)  # one image = `temporal` identical frames
        for c in range(3):
            np.take(table[c], blocks[:, c], out=out[:, c, 0])
            out[:, c, 1:] = out[:, c, :1]
        pixels = torch.from_numpy(out.reshape(gh * gw, 3 * T * p * p))
        n_tokens = (gh // m) * (gw // m)
        return ProcessedImage(pixel_values=pixels, n_tokens=n_tokens, grid_thw=(1, gh, gw),
                              extra={"resized": (rh, rw)})

    # ------------------------------------------------------------ encoder pieces

    def _patch_embed(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        pe = self.v.patch_embd
        w0 = pe.weight
        kernel = torch.stack([w0, pe.weight_1.to(w0)], dim=2) if self.temporal == 2 else w0[:, :, None]
        kernel = kernel.reshape(w0.shape[0], -1).to(dtype)  # [d, 3 * T * p * p], (c, t, y, x) like the rows
        bias = pe.bias.to(dtype) if hasattr(pe, "bias") else None
        return F.linear(pixels.to(dtype), kernel, bias)

    def _block_order(self, t: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, col) of every patch in the processor's merge-block order."""
        m = self.merge_size
        rows = torch.arange(h).view(h // m, 1, m, 1).expand(h // m, w // m, m, m).reshape(-1)
        cols = torch.arange(w).view(1, w // m, 1, m).expand(h // m, w // m, m, m).reshape(-1)
        return rows.repeat(t), cols.repeat(t)

    def _rope(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.rope_inv_freq
        freqs = torch.cat((rows.float()[:, None] * inv, cols.float()[:, None] * inv), dim=-1)  # [N, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def _position_table(self, t: int, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """HF fast_pos_embed_interpolate: the side x side table bilinearly sampled at h x w points
        (corners aligned), then put in merge-block order and repeated per frame."""
        side, m = self.pos_side, self.merge_size
        table = self.v.position_embd.weight.to(dtype)
        dev = table.device
        hi = torch.linspace(0, side - 1, h, device=dev)
        wi = torch.linspace(0, side - 1, w, device=dev)
        h0, w0 = hi.int(), wi.int()
        h1, w1 = (h0 + 1).clip(max=side - 1), (w0 + 1).clip(max=side - 1)
        dh, dw = hi - h0, wi - w0
        idx = [(h0[:, None] * side + w0[None]), (h0[:, None] * side + w1[None]),
               (h1[:, None] * side + w0[None]), (h1[:, None] * side + w1[None])]
        wts = [(1 - dh)[:, None] * (1 - dw)[None], (1 - dh)[:, None] * dw[None],
               dh[:, None] * (1 - dw)[None], dh[:, None] * dw[None]]
        pos = None
        for i, wt in zip(idx, wts):
            term = table[i.reshape(-1).long()] * wt.reshape(-1, 1).to(dtype)
            pos = term if pos is None else pos + term
        pos = pos.view(h // m, m, w // m, m, -1).permute(0, 2, 1, 3, 4).reshape(h * w, -1)
        return pos.repeat(t, 1)

    def _window_order(self, t: int, h: int, w: int) -> tuple[torch.Tensor, list[int]]:
        """Qwen2.5-VL: merged-token permutation that makes every window contiguous, and window sizes
        in patches (HF get_window_index)."""
        m, k = self.merge_size, self.window
        lh, lw = h // m, w // m
        order, sizes = [], []
        grid = torch.arange(t * lh * lw).view(t, lh, lw)
        for f in range(t):
            for y in range(0, lh, k):
                for x in range(0, lw, k):
                    win = grid[f, y : y + k, x : x + k].reshape(-1)
                    order.append(win)
                    sizes.append(win.numel() * m * m)
        return torch.cat(order), sizes

    def _attention(self, blk: ViTBlock, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   segments: list[int]) -> torch.Tensor:
        q, k, v = blk.qkv(x)  # [heads, N, hd]
        dtype = q.dtype
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(dtype)
        heads, hd = q.shape[0], q.shape[-1]
        out = torch.empty_like(q)
        start, i = 0, 0
        while i < len(segments):  # runs of equal-length segments (windows) are batched
            size, j = segments[i], i
            while j < len(segments) and segments[j] == size:
                j += 1
            if size == 0:
                i = j
                continue
            score_bytes = heads * size * size * 4
            per_call = max(1, min(j - i, ATTN_SCORE_BYTES // score_bytes))  # segments per call
            q_rows = size if per_call > 1 else max(1, min(size, ATTN_SCORE_BYTES // (heads * size * 4)))
            while i < j:
                n = min(per_call, j - i)
                stop = start + n * size
                qs, ks, vs = (t[:, start:stop].reshape(heads, n, size, hd).transpose(0, 1) for t in (q, k, v))
                res = torch.cat([sdpa(qs[:, :, a : a + q_rows], ks, vs)
                                 for a in range(0, size, q_rows)], dim=2)
                out[:, start:stop] = res.transpose(0, 1).reshape(heads, n * size, hd)
                start, i = stop, i + n
        return blk.attn_out(out.transpose(0, 1).reshape(x.shape[0], -1))

    def _block(self, blk: ViTBlock, x, cos, sin, segments) -> torch.Tensor:
        x = x + self._attention(blk, blk.ln1(x), cos, sin, segments)
        return x + blk.mlp(blk.ln2(x))

    def _merge(self, norm: nn.Module, fc1: QLinear, fc2: QLinear, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        if norm.weight.shape[0] == d:
            x = norm(x).reshape(-1, d * self.unit)
        else:  # post-shuffle norm over the concatenated 2x2 group
            x = norm(x.reshape(-1, d * self.unit))
        return fc2(act(fc1(x), "gelu_erf", inplace=True))

    # ------------------------------------------------------------ encoder + projector

    def encode(self, image: ProcessedImage):
        if image.grid_thw is None:
            raise ValueError("Qwen-VL images need grid_thw (t, h, w) in patches")
        t, h, w = (int(s) for s in image.grid_thw)
        m, p, T = self.merge_size, self.cfg.patch_size, self.temporal
        pixels = image.pixel_values
        n = t * h * w
        if h % m or w % m or tuple(pixels.shape) != (n, 3 * T * p * p):
            raise ValueError(f"pixel values {tuple(pixels.shape)} do not match grid {(t, h, w)} "
                             f"(expected [{n}, {3 * T * p * p}], h and w multiples of {m})")
        dtype = self.v.patch_embd.weight.dtype
        x = self._patch_embed(pixels, dtype)
        if self.pos_side:
            x = x + self._position_table(t, h, w, dtype)
        cos, sin = self._rope(*self._block_order(t, h, w))
        cos, sin = cos.to(x.device), sin.to(x.device)
        full = [h * w] * t  # attention stays inside one frame of one image
        windows, order = full, None
        if self.window:
            order, windows = self._window_order(t, h, w)
            patch_order = (order[:, None] * self.unit + torch.arange(self.unit)).reshape(-1).to(x.device)
            x, cos, sin = x[patch_order], cos[patch_order], sin[patch_order]
        deep = []
        for i, blk in enumerate(self.v.blk):
            x = self._block(blk, x, cos, sin, full if self.full_layers[i] else windows)
            if i in self.deepstack_layers:
                ds = self.v.deepstack[str(i)]
                deep.append(self._merge(ds.norm, ds.fc1, ds.fc2, x))
        feats = self._merge(self.v.post_ln, getattr(self.mm, "0"), getattr(self.mm, "2"), x)
        if order is not None:  # back to raster order of merged tokens
            back = torch.argsort(order).to(feats.device)
            feats, deep = feats[back], [d[back] for d in deep]
        if self.deepstack_layers:
            return feats, deep
        return feats

    @property
    def output_dim(self) -> int:
        return self._out_dim
