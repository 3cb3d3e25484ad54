"""GGUF metadata for the text model and the mmproj, and writing both files (`synthesize`)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ocula.errors import OculaError
from ocula.synth.blocks import BlockPool, tensor_data, tensor_nbytes
from ocula.synth.presets import Preset, get_preset, tiny
from ocula.synth.tensors import (
    FILE_TYPES, QUANTS, TensorSpec, text_tensor_type, text_tensors, vision_tensor_type, vision_tensors,
)
from ocula.synth.vocab import tokenizer_metadata


def _add_kv(w, key: str, value) -> None:
    from gguf import GGUFValueType as VT

    if key == "tokenizer.ggml.tokens":
        w.add_token_list(value)
    elif key == "tokenizer.ggml.scores":
        w.add_token_scores([float(x) for x in value])
    elif key == "tokenizer.ggml.token_type":
        w.add_token_types([int(x) for x in value])
    elif key == "tokenizer.ggml.merges":
        w.add_token_merges(value)
    elif isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value) if value >= 0 else w.add_int32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        if value and isinstance(value[0], bool):
            w.add_array(key, list(value))
        elif value and isinstance(value[0], int):
            w.add_key_value(key, list(value), VT.ARRAY, sub_type=VT.INT32)
        elif value and isinstance(value[0], float):
            w.add_key_value(key, [float(x) for x in value], VT.ARRAY, sub_type=VT.FLOAT32)
        else:
            w.add_array(key, list(value))
    else:
        raise OculaError(f"cannot write metadata {key}={value!r}")


def _write(path: Path, arch: str, kv: dict[str, Any], tensors: list[tuple[TensorSpec, Any]], seed: int) -> None:
    from gguf import GGUFWriter

    pools = BlockPool(seed)
    rng = np.random.default_rng(seed + 1)
    w = GGUFWriter(str(path), arch)
    for k, v in kv.items():
        _add_kv(w, k, v)
    for ts, qtype in tensors:
        w.add_tensor_info(ts.name, ts.shape, np.dtype(np.float32), tensor_nbytes(ts.shape, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for ts, qtype in tensors:
        w.write_tensor_data(tensor_data(ts, qtype, pools, rng))
    w.close()


def text_metadata(p: Preset, quant: str) -> dict[str, Any]:
    t = p.text
    a = t.arch
    kv: dict[str, Any] = {
        "general.type": "model",
        "general.name": f"{p.name} (synthetic random weights)",
        "general.description": f"ocula synth: random weights with the shapes of {p.hf}",
        "general.file_type": FILE_TYPES[quant],
        "general.quantization_version": 2,
        f"{a}.block_count": t.n_layer,
        f"{a}.context_length": t.context_length,
        f"{a}.embedding_length": t.n_embd,
        f"{a}.feed_forward_length": t.n_ff,
        f"{a}.attention.head_count": t.n_head,
        f"{a}.attention.head_count_kv": t.n_head_kv,
        f"{a}.rope.freq_base": float(t.rope_theta),
        f"{a}.attention.layer_norm_rms_epsilon": float(t.norm_eps),
    }
    if t.head_dim != t.n_embd // t.n_head or a in ("gemma3", "qwen3vl", "qwen3moe", "qwen3vlmoe", "llama"):
        kv[f"{a}.attention.key_length"] = t.head_dim
        kv[f"{a}.attention.value_length"] = t.head_dim
    if a == "llama":
        kv[f"{a}.vocab_size"] = t.n_vocab
        kv[f"{a}.rope.dimension_count"] = t.head_dim
    if t.n_expert:
        kv[f"{a}.expert_count"] = t.n_expert
        kv[f"{a}.expert_used_count"] = t.n_expert_used
        kv[f"{a}.expert_feed_forward_length"] = t.n_ff_exp
    if t.mrope_sections:
        kv[f"{a}.rope.dimension_sections"] = list(t.mrope_sections)
    if t.n_deepstack:
        kv[f"{a}.n_deepstack_layers"] = t.n_deepstack
    if t.sliding_window:
        kv[f"{a}.attention.sliding_window"] = t.sliding_window
    if t.rope_freq_base_swa:
        kv[f"{a}.rope.freq_base_swa"] = float(t.rope_freq_base_swa)
    if t.rope_linear_factor:
        kv[f"{a}.rope.scaling.type"] = "linear"
        kv[f"{a}.rope.scaling.factor"] = float(t.rope_linear_factor)
    kv.update(tokenizer_metadata(t))
    return kv


def vision_metadata(p: Preset) -> dict[str, Any]:
    v = p.vision
    if v is None:
        raise OculaError(f"{p.name} is a text-only preset: it has no mmproj")
    kv: dict[str, Any] = {
        "general.type": "mmproj",
        "general.name": f"{p.name} (synthetic random weights)",
        "general.file_type": 1,
        "general.quantization_version": 2,
        "clip.has_vision_encoder": True,
        "clip.projector_type": v.projector,
        "clip.vision.projection_dim": p.text.n_embd,
        "clip.vision.image_size": v.image_size,
        "clip.vision.patch_size": v.patch_size,
        "clip.vision.embedding_length": v.n_embd,
        "clip.vision.feed_forward_length": v.n_ff,
        "clip.vision.block_count": v.n_layer,
        "clip.vision.attention.head_count": v.n_head,
        "clip.vision.attention.layer_norm_epsilon": float(v.eps),
        "clip.vision.image_mean": [float(x) for x in v.mean],
        "clip.vision.image_std": [float(x) for x in v.std],
        f"clip.use_{v.act}": True,
    }
    if v.projector in ("idefics3", "internvl"):
        kv["clip.vision.projector.scale_factor"] = v.scale_factor
    if v.deepstack:
        kv["clip.vision.is_deepstack_layers"] = [i in v.deepstack for i in range(v.n_layer)]
    kv.update(v.extra)
    return kv


@dataclass
class SynthResult:
    model: Path
    mmproj: Path | None
    seconds: float
    model_bytes: int
    mmproj_bytes: int


def synthesize(preset: str | Preset, quant: str = "Q4_K_M", out_dir: str | os.PathLike = ".", *,
               tiny_scale: bool = False, layers: int | None = None, vision_layers: int | None = None,
               mmproj: bool = True, seed: int = 0, force: bool = False) -> SynthResult:
    """Write the text model (and its F16 mmproj, unless the preset is text-only) for a preset.
    Returns the paths (mmproj None when not written)."""
    p = preset if isinstance(preset, Preset) else get_preset(preset)
    quant = quant.upper()
    if quant not in QUANTS:
        raise OculaError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    if tiny_scale:
        p = tiny(p)
    if layers:
        p = replace(p, text=replace(p.text, n_layer=layers, n_deepstack=min(p.text.n_deepstack, layers)))
    if p.vision is None:
        mmproj = False
    if vision_layers and p.vision is not None:
        v = p.vision
        extra = dict(v.extra)
        if "clip.vision.n_wa_pattern" in extra:
            extra["clip.vision.n_wa_pattern"] = min(extra["clip.vision.n_wa_pattern"], vision_layers)
        ds = tuple(i for i in v.deepstack if i < vision_layers)
        if v.deepstack and len(ds) < p.text.n_deepstack:
            ds = tuple(range(min(p.text.n_deepstack, vision_layers)))
        p = replace(p, vision=replace(v, n_layer=vision_layers, extra=extra, deepstack=ds))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-tiny" if tiny_scale else (f"-L{layers}" if layers else "")
    model_path = out / f"{p.name}{suffix}-{quant}.gguf"
    vsuffix = "-tiny" if tiny_scale else (f"-L{vision_layers}" if vision_layers else "")
    mmproj_path = out / f"mmproj-{p.name}{vsuffix}-F16.gguf" if mmproj else None
    t0 = time.perf_counter()
    if force or not model_path.exists():
        tensors = [(ts, text_tensor_type(ts, quant, p.text)) for ts in text_tensors(p.text)]
        tmp = model_path.with_suffix(".gguf.part")
        _write(tmp, p.text.arch, text_metadata(p, quant), tensors, seed)
        tmp.replace(model_path)
    if mmproj_path is not None and (force or not mmproj_path.exists()):
        tensors = [(ts, vision_tensor_type(ts)) for ts in vision_tensors(p.vision, p.text.n_embd)]
        tmp = mmproj_path.with_suffix(".gguf.part")
        _write(tmp, "clip", vision_metadata(p), tensors, seed + 7)
        tmp.replace(mmproj_path)
    return SynthResult(model_path, mmproj_path, time.perf_counter() - t0, model_path.stat().st_size,
                       mmproj_path.stat().st_size if mmproj_path else 0)
