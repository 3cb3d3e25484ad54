"""Text decoder config from GGUF metadata, and the pre-norm decoder shared by Llama and Qwen families.

A model file registers its architecture with `@register("arch", ...)`; `build_text_model` looks it
up by `general.architecture`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ocula.errors import GGUFError, UnsupportedError
from ocula.gguf import GGUFFile
from ocula.models.moe import MoEConfig, SparseMoE
from ocula.models.layers import (KVCache, RMSNorm, RopeConfig, RopeTable, Rotary, StreamNorm, attend, attention_mask,
                                 gated_act)
from ocula.quant.linear import QEmbedding, QLinear


@dataclass
class TextConfig:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    norm_eps: float
    rope: RopeConfig
    context_length: int
    attn_bias: bool = False  # biases on q/k/v (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    tied_output: bool = False  # no output.weight: logits use token_embd
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer: uses the sliding window
    rope_local: RopeConfig | None = None  # RoPE of sliding-window layers when it differs
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float = 1.0  # token embeddings are multiplied by this (Gemma: sqrt(n_embd))
    n_deepstack: int = 0  # Qwen3-VL: vision features added after the first n layers
    moe: MoEConfig | None = None  # Mixture-of-Experts feed-forward of the layers in `sparse_layers`
    sparse_layers: tuple[bool, ...] = ()  # per layer: a MoE feed-forward instead of the dense one
    extra: dict = field(default_factory=dict)

    @property
    def is_mrope(self) -> bool:
        return bool(self.rope.sections)


def read_text_config(f: GGUFFile, rope_style: str) -> TextConfig:
    """The llama.cpp `{arch}.*` keys every decoder has."""
    arch = f.architecture

    def key(name: str, default=None, required=False):
        full = f"{arch}.{name}"
        if full in f.metadata:
            return f.metadata[full]
        if required:
            raise GGUFError(f"{f.path}: required metadata key {full!r} is missing")
        return default

    n_embd = int(key("embedding_length", required=True))
    n_head = int(_scalar(key("attention.head_count", required=True), "attention.head_count", f))
    n_head_kv = int(_scalar(key("attention.head_count_kv", n_head), "attention.head_count_kv", f))
    head_dim = int(key("attention.key_length", n_embd // n_head))
    emb = f.tensor("token_embd.weight")
    n_vocab = int(key("vocab_size", emb.shape[0]))
    rope_type = key("rope.scaling.type", "none")
    linear_factor = 1.0
    if rope_type == "linear":
        linear_factor = float(key("rope.scaling.factor", 1.0))
    elif rope_type not in ("none", None):
        raise UnsupportedError(f"{f.path}: RoPE scaling type {rope_type!r} is not supported (none, linear)")
    sections = key("rope.dimension_sections")
    rope = RopeConfig(
        n_rot=int(key("rope.dimension_count", head_dim)),
        base=float(key("rope.freq_base", 10000.0)),
        style=rope_style,
        linear_factor=linear_factor,
        sections=tuple(int(s) for s in sections) if sections else None,
    )
    return TextConfig(
        arch=arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=int(key("block_count", required=True)),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=int(_scalar(key("feed_forward_length", required=True), "feed_forward_length", f)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope=rope,
        context_length=int(key("context_length", 4096)),
        attn_bias="blk.0.attn_q.bias" in f.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in f.tensors,
        tied_output="output.weight" not in f.tensors,
        sliding_window=key("attention.sliding_window"),
        attn_softcap=key("attn_logit_softcapping"),
        final_softcap=key("final_logit_softcapping"),
    )


def _scalar(value, name: str, f: GGUFFile):
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedError(f"{f.path}: per-layer {name} values {sorted(set(value))} are not supported")
        return value[0]
    return value


@dataclass
class StepInput:
    """What one forward call needs besides the hidden states."""

    positions: torch.Tensor  # [T] or [3, T] (M-RoPE)
    cache: KVCache
    groups: torch.Tensor | None = None  # [T] image id per token (bidirectional attention), 0 = text
    deepstack: list[torch.Tensor] | None = None  # per early layer: [T, n_embd] added after that layer


def self_attention(blk: nn.Module, x: torch.Tensor, cfg: TextConfig, rope: RopeTable,
                   caches: list[KVCache], layer: int, masks: list) -> torch.Tensor:
    """Attention over `blk.attn_{q,k,v,output}` (+ optional `attn_{q,k}_norm`) with KV caches.

    x is [B, T, d]: row b belongs to the sequence of `caches[b]` (batched decode runs the projections
    for all sequences at once; attention itself is per sequence, over that sequence's cache).
    """
    B, T, _ = x.shape
    # [B, T, heads, head_dim]: norms and RoPE run on contiguous rows; attention takes transposed views
    q = blk.attn_q(x).view(B, T, cfg.n_head, cfg.head_dim)
    k = blk.attn_k(x).view(B, T, cfg.n_head_kv, cfg.head_dim)
    v = blk.attn_v(x).view(B, T, cfg.n_head_kv, cfg.head_dim)
    if cfg.qk_norm:
        q, k = blk.attn_q_norm(q), blk.attn_k_norm(k)
    q, k = rope.apply(q).transpose(1, 2), rope.apply(k).transpose(1, 2)
    v = v.transpose(1, 2)
    scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(cfg.head_dim)
    if B == 1:
        kb, vb = caches[0].update(layer, k, v)
        out = attend(q, kb.to(q.dtype), vb.to(q.dtype), masks[0], scale, cfg.attn_softcap)
    else:
        outs = []
        for b, cache in enumerate(caches):
            kb, vb = cache.update(layer, k[b : b + 1], v[b : b + 1])
            outs.append(attend(q[b : b + 1], kb.to(q.dtype), vb.to(q.dtype), masks[b], scale, cfg.attn_softcap))
        out = torch.cat(outs)
    # SDPA's output is laid out [B, T, H, D] already on CPU, so this reshape is usually a view
    return blk.attn_output(out.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)); x + swiglu(norm(x)). Names follow GGUF `blk.N.*`."""

    # what ocula_decode_step (fused_decode.py) must do to match `forward`: set by each class that
    # it covers, and only read from the class itself, so a subclass with another forward is left out
    fused_step = {"gelu": False}

    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, hd = cfg.n_embd, cfg.head_dim
        self.attn_norm = StreamNorm(d, cfg.norm_eps)
        self.attn_q = QLinear(d, cfg.n_head * hd, bias=cfg.attn_bias)
        self.attn_k = QLinear(d, cfg.n_head_kv * hd, bias=cfg.attn_bias)
        self.attn_v = QLinear(d, cfg.n_head_kv * hd, bias=cfg.attn_bias)
        self.attn_output = QLinear(cfg.n_head * hd, d)
        if cfg.qk_norm:
            self.attn_q_norm = RMSNorm(hd, cfg.norm_eps)
            self.attn_k_norm = RMSNorm(hd, cfg.norm_eps)
        self.ffn_norm = StreamNorm(d, cfg.norm_eps)
        self.init_ffn(cfg)

    def init_ffn(self, cfg: TextConfig) -> None:
        self.ffn_gate = QLinear(cfg.n_embd, cfg.n_ff)
        self.ffn_up = QLinear(cfg.n_embd, cfg.n_ff)
        self.ffn_down = QLinear(cfg.n_ff, cfg.n_embd)

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        return self.ffn_down(gated_act(self.ffn_gate(h), self.ffn_up(h)))

    def forward(self, x, cfg, rope, caches, layer, masks):
        """x [B, T, d] is updated in place (TextModel.forward owns it) and returned."""
        x += self_attention(self, self.attn_norm(x), cfg, rope, caches, layer, masks)
        x += self.ffn(self.ffn_norm(x))
        return x


class SparseDecoderBlock(DecoderBlock):
    """The pre-norm block with the shared MoE feed-forward (ocula.models.moe) instead of the dense MLP."""

    fused_step = {"gelu": False}  # the C step has the sparse feed-forward too

    def init_ffn(self, cfg: TextConfig) -> None:
        self.moe = SparseMoE(cfg.n_embd, cfg.moe)

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        return self.moe(h)


class TextModel(nn.Module):
    """token_embd → blocks → output_norm → output. Subclasses change the block or the embedding."""

    block_class: type[nn.Module] = DecoderBlock

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embd = QEmbedding(cfg.n_vocab, cfg.n_embd)
        self.blk = nn.ModuleList(self.make_block(cfg, i) for i in range(cfg.n_layer))
        self.output_norm = StreamNorm(cfg.n_embd, cfg.norm_eps)
        self.output = QLinear(cfg.n_embd, cfg.n_vocab)
        self.rotary = Rotary(cfg.rope)
        self.kv_dtype: torch.dtype | None = None  # None: the compute dtype
        self._fused: tuple[int, object] | None = None  # (kernel epoch, FusedDecode or None)

    def make_block(self, cfg: TextConfig, layer: int) -> nn.Module:
        if cfg.sparse_layers and cfg.sparse_layers[layer]:
            return SparseDecoderBlock(cfg)
        return self.block_class(cfg)

    # GGUF names to read for module tensors that are stored under another name
    def weight_aliases(self) -> dict[str, str]:
        return {"output.weight": "token_embd.weight"} if self.cfg.tied_output else {}

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.output_norm.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [..., T] → input embeddings [..., T, n_embd] (scaled as the family does)."""
        x = self.token_embd(ids, self.compute_dtype)
        return x * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else x

    def rope_tables(self, positions: torch.Tensor) -> dict[str, RopeTable]:
        return {"global": self.rotary(positions)}

    def forward(self, x: torch.Tensor, step: StepInput | list[StepInput]) -> torch.Tensor:
        """Input embeddings → final-normed hidden states, both [B, T, n_embd].

        One StepInput for one sequence (B = 1); a list of B StepInputs for a batch of sequences with
        their own caches (decode: T = 1), whose projections and MLPs then run as one batched GEMM.
        """
        cfg = self.cfg
        steps = step if isinstance(step, list) else [step]
        T = x.shape[1]
        if T == 1 and all(s.deepstack is None and s.groups is None for s in steps):
            fused = self.fused_decode()
            caches = [s.cache for s in steps]
            if fused is not None and fused.accepts(caches):
                h = fused.run(x, [s.positions.to(x.device) for s in steps], caches)
                return self.output_norm(h).to(x.dtype)
        # The residual stream stays float32 whatever the compute dtype, as in llama.cpp: rounding it to
        # bfloat16 after every block doubled the fast mode's logit error on Gemma 3 270M, and its worst
        # step moved with the GEMM's summation order (test_gemma3_270m). The blocks add to x in place.
        x = x.to(torch.float32, copy=True)
        caches = [s.cache for s in steps]
        if len(steps) == 1:  # cos/sin once per forward, shared by all layers
            ropes = self.rope_tables(steps[0].positions.to(x.device))
        else:  # per-sequence positions → one table with a batch dimension
            tables = [self.rope_tables(s.positions.to(x.device)) for s in steps]
            ropes = {k: RopeTable.stack([t[k] for t in tables]) for k in tables[0]}
        full = [attention_mask(c.length, T, None, s.groups, x.device) for c, s in zip(caches, steps)]
        window = ([attention_mask(c.length, T, cfg.sliding_window, s.groups, x.device) for c, s in zip(caches, steps)]
                  if any(cfg.sliding_layers) else None)
        for i, blk in enumerate(self.blk):
            sliding = bool(cfg.sliding_layers) and cfg.sliding_layers[i]
            rope = ropes.get("local", ropes["global"]) if sliding else ropes["global"]
            x = blk(x, cfg, rope, caches, i, window if sliding else full)
            for b, s in enumerate(steps):
                if s.deepstack is not None and i < len(s.deepstack):
                    x[b] += s.deepstack[i].to(x.dtype).reshape(x.shape[1:])
        for c in caches:
            c.advance(T)
        return self.output_norm(x)

    def fused_decode(self):
        """The one-call decode step (ocula.models.text.fused_decode) for this model's blocks and
        kernels, or None; rebuilt when `use_kernels` changes the kernels."""
        from ocula.models.text import fused_decode  # noqa: PLC0415 - it imports this module's neighbours

        if self._fused is None or self._fused[0] != fused_decode.linear.kernel_epoch:
            self._fused = (fused_decode.linear.kernel_epoch, fused_decode.build(self))
        return self._fused[1] if fused_decode.enabled() else None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., n_embd] → float32 logits [..., n_vocab]."""
        out = self.output(hidden).float()
        if self.cfg.final_softcap:
            out = torch.tanh(out / self.cfg.final_softcap) * self.cfg.final_softcap
        return out

    def new_cache(self, max_tokens: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache in `dtype`, else `self.kv_dtype` (set by ocula.load), else the compute dtype."""
        device = self.output_norm.weight.device
        return KVCache(self.cfg.n_layer, self.cfg.n_head_kv, self.cfg.head_dim,
                       dtype or self.kv_dtype or self.compute_dtype, device, max_tokens)


# ---------------------------------------------------------------- registry

TEXT_ARCHS: dict[str, Callable[[GGUFFile], TextModel]] = {}


def register(*archs: str):
    def deco(builder: Callable[[GGUFFile], TextModel]):
        for a in archs:
            TEXT_ARCHS[a] = builder
        return builder

    return deco


def build_text_model(f: GGUFFile) -> TextModel:
    from ocula.models import text  # noqa: F401  (imports every family so they register)

    arch = f.architecture
    if arch == "clip":
        raise UnsupportedError(
            f"{f.path} is an mmproj (vision projector) file, not a text model: pass it as mmproj=..."
        )
    if arch not in TEXT_ARCHS:
        raise UnsupportedError(
            f"{f.path}: architecture {arch!r} is not supported; supported: {', '.join(sorted(TEXT_ARCHS))}"
        )
    return TEXT_ARCHS[arch](f)
