"""Qwen3 and the text side of Qwen3-VL (`qwen3vl`: interleaved M-RoPE, deepstack), and their
Mixture-of-Experts versions `qwen3moe` (Qwen3-30B-A3B, also InternVL3.5-*-A*B's language model) and
`qwen3vlmoe` (Qwen3-VL-30B-A3B, -235B-A22B).

Qwen3 = Qwen2 without q/k/v biases and with a per-head RMSNorm on q and k before RoPE. Qwen3-VL
interleaves the t/h/w position axes across rotary frequencies (t,h,w,t,h,w,...) and adds the
vision tower's deepstack features to the hidden states after its first layers. The MoE versions
replace the MLP of every layer that has a router by ocula.models.moe's sparse feed-forward: softmax
over the experts, top-k, the k weights always renormalised (no GGUF key says so; the reference
models and llama.cpp do it for these architectures).
"""
from __future__ import annotations

from ocula.gguf import GGUFFile
from ocula.models.layers import ROPE_NEOX, Rotary
from ocula.models.moe import read_moe_config, sparse_layers
from ocula.models.text.base import TextModel, read_text_config, register


class Qwen3Model(TextModel):
    pass


@register("qwen3", "qwen3vl", "qwen3moe", "qwen3vlmoe")
def build(f: GGUFFile) -> Qwen3Model:
    cfg = read_text_config(f, ROPE_NEOX)
    if cfg.arch in ("qwen3vl", "qwen3vlmoe"):
        cfg.rope.interleaved_sections = True
        cfg.n_deepstack = int(f.get(f"{cfg.arch}.n_deepstack_layers", 0))
    if cfg.arch in ("qwen3moe", "qwen3vlmoe"):
        cfg.moe = read_moe_config(f, cfg.n_layer, gating="softmax", norm_topk=True)
        cfg.sparse_layers = sparse_layers(f, cfg.n_layer)
    model = Qwen3Model(cfg)
    model.rotary = Rotary(cfg.rope)
    return model
