"""Gemma 3 (text side of the Gemma 3 VLMs, and Gemma 3 270M/1B text models).

Differences from Llama: embeddings scaled by sqrt(n_embd); extra norms after attention and after
the MLP; GELU(tanh) gating; q/k RMSNorm; five sliding-window layers (local RoPE base 10000) for
every global one. GGUF norm weights already include Gemma's "+1".
"""
from __future__ import annotations

import math
from dataclasses import replace

from ocula.gguf import GGUFFile
from ocula.models.layers import ROPE_NEOX, RMSNorm, Rotary, gated_act
from ocula.models.text.base import DecoderBlock, TextConfig, TextModel, read_text_config, register, self_attention

SLIDING_PATTERN = 6  # every 6th layer attends globally
LOCAL_ROPE_BASE = 10000.0


class Gemma3Block(DecoderBlock):
    fused_step = {"gelu": True}

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg)
        self.post_attention_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.post_ffw_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)

    def forward(self, x, cfg, rope, caches, layer, masks):
        h = self_attention(self, self.attn_norm(x), cfg, rope, caches, layer, masks)
        x = x + self.post_attention_norm(h)
        h = self.ffn_norm(x)
        h = self.ffn_down(gated_act(self.ffn_gate(h), self.ffn_up(h), gelu=True))
        return x + self.post_ffw_norm(h)


class Gemma3Model(TextModel):
    block_class = Gemma3Block

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg)
        self.rotary_local = Rotary(cfg.rope_local)

    def rope_tables(self, positions):
        return {"global": self.rotary(positions), "local": self.rotary_local(positions)}


@register("gemma3")
def build(f: GGUFFile) -> Gemma3Model:
    cfg = read_text_config(f, ROPE_NEOX)
    pattern = f.get("gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        cfg.sliding_layers = tuple(bool(p) for p in pattern)
    else:
        cfg.sliding_layers = tuple((i + 1) % SLIDING_PATTERN != 0 for i in range(cfg.n_layer))
    cfg.rope_local = replace(cfg.rope, base=LOCAL_ROPE_BASE, linear_factor=1.0)
    cfg.embed_scale = math.sqrt(cfg.n_embd)
    # Gemma 3 27B scales queries by 1/sqrt(n_embd / n_head); the other sizes by 1/sqrt(head_dim).
    query_scalar = cfg.n_embd // cfg.n_head if cfg.n_layer == 62 else cfg.head_dim
    cfg.attn_scale = 1.0 / math.sqrt(query_scalar)
    return Gemma3Model(cfg)
