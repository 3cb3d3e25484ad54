"""Qwen2 / Qwen2.5 and the text side of Qwen2-VL / Qwen2.5-VL (`qwen2vl`: M-RoPE sections).

Same block as Llama plus q/k/v biases; RoPE rotates halves (neox). For `qwen2vl`, the rotary
frequencies are split into t/h/w sections (`qwen2vl.rope.dimension_sections`), each driven by its
own position axis; text-only prompts give all three axes the same position.
"""
from __future__ import annotations

from ocula.gguf import GGUFFile
from ocula.models.layers import ROPE_NEOX
from ocula.models.text.base import TextModel, read_text_config, register


class Qwen2Model(TextModel):
    pass


@register("qwen2", "qwen2vl")
def build(f: GGUFFile) -> Qwen2Model:
    return Qwen2Model(read_text_config(f, ROPE_NEOX))
