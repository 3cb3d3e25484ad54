"""Qwen3 and the text side of Qwen3-VL (`qwen3vl`: interleaved M-RoPE, deepstack).

Qwen3 = Qwen2 without q/k/v biases and with a per-head RMSNorm on q and k before RoPE. Qwen3-VL
interleaves the t/h/w position axes across rotary frequencies (t,h,w,t,h,w,...) and adds the
vision tower's deepstack features to the hidden states after its first layers.
"""
from __future__ import annotations

from ocula.gguf import GGUFFile
from ocula.models.layers import ROPE_NEOX, Rotary
from ocula.models.text.base import TextModel, read_text_config, register


class Qwen3Model(TextModel):
    pass


@register("qwen3", "qwen3vl")
def build(f: GGUFFile) -> Qwen3Model:
    cfg = read_text_config(f, ROPE_NEOX)
    if cfg.arch == "qwen3vl":
        cfg.rope.interleaved_sections = True
        cfg.n_deepstack = int(f.get("qwen3vl.n_deepstack_layers", 0))
    model = Qwen3Model(cfg)
    model.rotary = Rotary(cfg.rope)
    return model
