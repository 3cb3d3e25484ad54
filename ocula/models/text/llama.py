"""Llama (and SmolLM, LLaVA's Vicuna, InternVL's Llama variants): the plain pre-norm decoder.

llama.cpp's converter permutes the q/k rows of `llama` GGUFs so that RoPE rotates adjacent pairs
("norm" style); with those weights that style gives exactly HF's rotate-half results.
"""
from __future__ import annotations

from ocula.gguf import GGUFFile
from ocula.models.layers import ROPE_NORM, Rotary
from ocula.models.text.base import TextModel, read_text_config, register
from ocula.models.weights import float_tensor


class LlamaModel(TextModel):
    pass


@register("llama")
def build(f: GGUFFile) -> LlamaModel:
    cfg = read_text_config(f, ROPE_NORM)
    model = LlamaModel(cfg)
    if "rope_freqs.weight" in f.tensors:  # Llama 3.1+: per-frequency divisors
        model.rotary = Rotary(cfg.rope, float_tensor(f.tensor("rope_freqs.weight")))
    return model
