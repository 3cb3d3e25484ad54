"""The tensors a converted model holds (names, shapes, kinds) and the GGML type each gets per --quant."""
from __future__ import annotations

from dataclasses import dataclass

from ocula.errors import OculaError
from ocula.synth.presets import TextSpec, VisionSpec

WEIGHT_STD = 0.02  # of every random weight unless its TensorSpec says otherwise

QUANTS = ("F16", "Q8_0", "Q4_K_M")
FILE_TYPES = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15}  # llama_ftype


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order: outermost first (rows, cols) for 2-D weights
    # weight | norm (ones) | bias | f32 (random, kept F32) | f16 (random, kept F16)
    # | router (MoE ffn_gate_inp: random F32 with a larger std, so tokens pick different experts)
    kind: str = "weight"
    layer: int | None = None
    role: str = ""  # attn_v / ffn_down / ffn_down_exps / output / token_embd ... for the quantization recipe
    std: float | None = None  # of the dequantized values; None: WEIGHT_STD


def text_tensors(t: TextSpec) -> list[TensorSpec]:
    d, hd = t.n_embd, t.head_dim
    # MoE: embeddings 10x the other weights. Each random layer adds to the residual stream an output of norm
    # ~sqrt(d) that is much alike across tokens (attention averages values over the prefix); over weights of
    # std 0.02 embeddings vanish under it, and the routers then send every token to the same few experts
    # (Qwen3-30B-A3B, 8 layers, 512 random tokens: 37-69 of 128 experts used in layers 2-7; with this, all)
    embd_std = 10 * WEIGHT_STD if t.n_expert else None
    out = [TensorSpec("token_embd.weight", (t.n_vocab, d), role="token_embd", std=embd_std)]
    for i in range(t.n_layer):
        p = f"blk.{i}."
        out += [
            TensorSpec(p + "attn_norm.weight", (d,), "norm", i),
            TensorSpec(p + "attn_q.weight", (t.n_head * hd, d), layer=i, role="attn_q"),
            TensorSpec(p + "attn_k.weight", (t.n_head_kv * hd, d), layer=i, role="attn_k"),
            TensorSpec(p + "attn_v.weight", (t.n_head_kv * hd, d), layer=i, role="attn_v"),
            TensorSpec(p + "attn_output.weight", (d, t.n_head * hd), layer=i, role="attn_output"),
        ]
        if t.qkv_bias:
            out += [TensorSpec(p + "attn_q.bias", (t.n_head * hd,), "bias", i),
                    TensorSpec(p + "attn_k.bias", (t.n_head_kv * hd,), "bias", i),
                    TensorSpec(p + "attn_v.bias", (t.n_head_kv * hd,), "bias", i)]
        if t.qk_norm:
            out += [TensorSpec(p + "attn_q_norm.weight", (hd,), "norm", i),
                    TensorSpec(p + "attn_k_norm.weight", (hd,), "norm", i)]
        out.append(TensorSpec(p + "ffn_norm.weight", (d,), "norm", i))
        if t.n_expert:  # merged expert tensors, [n_expert, rows, cols] (ggml ne {cols, rows, n_expert})
            e, f = t.n_expert, t.n_ff_exp
            out += [
                TensorSpec(p + "ffn_gate_inp.weight", (e, d), "router", i, role="ffn_gate_inp"),
                TensorSpec(p + "ffn_gate_exps.weight", (e, f, d), layer=i, role="ffn_gate_exps"),
                TensorSpec(p + "ffn_up_exps.weight", (e, f, d), layer=i, role="ffn_up_exps"),
                TensorSpec(p + "ffn_down_exps.weight", (e, d, f), layer=i, role="ffn_down_exps"),
            ]
        else:
            out += [
                TensorSpec(p + "ffn_gate.weight", (t.n_ff, d), layer=i, role="ffn_gate"),
                TensorSpec(p + "ffn_up.weight", (t.n_ff, d), layer=i, role="ffn_up"),
                TensorSpec(p + "ffn_down.weight", (d, t.n_ff), layer=i, role="ffn_down"),
            ]
        if t.arch == "gemma3":
            out += [TensorSpec(p + "post_attention_norm.weight", (d,), "norm", i),
                    TensorSpec(p + "post_ffw_norm.weight", (d,), "norm", i)]
    out.append(TensorSpec("output_norm.weight", (d,), "norm"))
    if not t.tied:
        out.append(TensorSpec("output.weight", (t.n_vocab, d), role="output"))
    return out


def _vit_block(i: int, d: int, n_ff: int, *, ln_bias: bool = True, fused_qkv: bool = False,
               gate: bool = False, layer_scale: bool = False) -> list[TensorSpec]:
    p = f"v.blk.{i}."
    out = [TensorSpec(p + "ln1.weight", (d,), "norm", i), TensorSpec(p + "ln2.weight", (d,), "norm", i)]
    if ln_bias:
        out += [TensorSpec(p + "ln1.bias", (d,), "bias", i), TensorSpec(p + "ln2.bias", (d,), "bias", i)]
    if fused_qkv:
        out += [TensorSpec(p + "attn_qkv.weight", (3 * d, d), layer=i), TensorSpec(p + "attn_qkv.bias", (3 * d,), "bias", i)]
    else:
        for n in ("q", "k", "v"):
            out += [TensorSpec(p + f"attn_{n}.weight", (d, d), layer=i), TensorSpec(p + f"attn_{n}.bias", (d,), "bias", i)]
    out += [TensorSpec(p + "attn_out.weight", (d, d), layer=i), TensorSpec(p + "attn_out.bias", (d,), "bias", i)]
    names = ("ffn_gate", "ffn_up") if gate else ("ffn_up",)
    for n in names:
        out += [TensorSpec(p + f"{n}.weight", (n_ff, d), layer=i), TensorSpec(p + f"{n}.bias", (n_ff,), "bias", i)]
    out += [TensorSpec(p + "ffn_down.weight", (d, n_ff), layer=i), TensorSpec(p + "ffn_down.bias", (d,), "bias", i)]
    if layer_scale:
        out += [TensorSpec(p + "ls1.weight", (d,), "scale", i), TensorSpec(p + "ls2.weight", (d,), "scale", i)]
    return out


def vision_tensors(v: VisionSpec, text_embd: int) -> list[TensorSpec]:
    d, ps, side = v.n_embd, v.patch_size, v.image_size // v.patch_size
    out: list[TensorSpec] = []
    if v.projector in ("gemma3", "idefics3"):  # both a SigLIP encoder; the projectors differ
        out += [TensorSpec("v.patch_embd.weight", (d, 3, ps, ps), "f32"), TensorSpec("v.patch_embd.bias", (d,), "bias"),
                TensorSpec("v.position_embd.weight", (side * side, d), "f32")]
        for i in range(v.n_layer):
            out += _vit_block(i, d, v.n_ff)
        out += [TensorSpec("v.post_ln.weight", (d,), "norm"), TensorSpec("v.post_ln.bias", (d,), "bias")]
        if v.projector == "gemma3":
            out += [TensorSpec("mm.soft_emb_norm.weight", (d,), "norm"),
                    # HF's [vision, text] matrix as convert_hf_to_gguf writes it, forced to F16
                    TensorSpec("mm.input_projection.weight", (d, text_embd), "f16")]
        else:
            out.append(TensorSpec("mm.model.fc.weight", (text_embd, d * v.scale_factor ** 2)))
    elif v.projector == "internvl":
        merged = d * v.scale_factor ** 2
        out += [TensorSpec("v.class_embd", (1, 1, d), "f32"),
                TensorSpec("v.patch_embd.weight", (d, 3, ps, ps), "f16"), TensorSpec("v.patch_embd.bias", (d,), "bias"),
                TensorSpec("v.position_embd.weight", (1, side * side + 1, d), "f32")]
        for i in range(v.n_layer):
            out += _vit_block(i, d, v.n_ff, layer_scale=True)
        out += [TensorSpec("mm.model.mlp.0.weight", (merged,), "norm"), TensorSpec("mm.model.mlp.0.bias", (merged,), "bias"),
                TensorSpec("mm.model.mlp.1.weight", (text_embd, merged)), TensorSpec("mm.model.mlp.1.bias", (text_embd,), "bias"),
                TensorSpec("mm.model.mlp.3.weight", (text_embd, text_embd)),
                TensorSpec("mm.model.mlp.3.bias", (text_embd,), "bias")]
    elif v.projector in ("qwen2.5vl_merger", "qwen3vl_merger"):
        q3 = v.projector == "qwen3vl_merger"
        merged = d * 4  # 2x2 spatial merge
        out += [TensorSpec("v.patch_embd.weight", (d, 3, ps, ps), "f16"),
                TensorSpec("v.patch_embd.weight.1", (d, 3, ps, ps), "f16")]
        if q3:
            out += [TensorSpec("v.patch_embd.bias", (d,), "bias"),
                    TensorSpec("v.position_embd.weight", (side * side, d), "f32")]
        for i in range(v.n_layer):
            out += _vit_block(i, d, v.n_ff, ln_bias=q3, fused_qkv=q3, gate=not q3)
        for i in v.deepstack:
            p = f"v.deepstack.{i}."
            out += [TensorSpec(p + "norm.weight", (merged,), "norm"), TensorSpec(p + "norm.bias", (merged,), "bias"),
                    TensorSpec(p + "fc1.weight", (merged, merged)), TensorSpec(p + "fc1.bias", (merged,), "bias"),
                    TensorSpec(p + "fc2.weight", (text_embd, merged)), TensorSpec(p + "fc2.bias", (text_embd,), "bias")]
        out.append(TensorSpec("v.post_ln.weight", (d,), "norm"))
        if q3:
            out.append(TensorSpec("v.post_ln.bias", (d,), "bias"))
        out += [TensorSpec("mm.0.weight", (merged, merged)), TensorSpec("mm.0.bias", (merged,), "bias"),
                TensorSpec("mm.2.weight", (text_embd, merged)), TensorSpec("mm.2.bias", (text_embd,), "bias")]
    else:
        raise OculaError(f"no tensor layout for projector {v.projector!r}")
    return out


# ----------------------------------------------------------------------------- quantization recipe


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def text_tensor_type(ts: TensorSpec, quant: str, t: TextSpec):
    """The GGML type convert_hf_to_gguf (F16) or llama-quantize (Q8_0, Q4_K_M) gives a text tensor.
    3-D expert tensors are quantized like 2-D ones, row by row along their last (ggml ne[0]) axis."""
    from gguf import GGMLQuantizationType as QT
    from gguf.constants import GGML_QUANT_SIZES

    if len(ts.shape) == 1 or ts.kind != "weight":  # norms, biases and MoE routers stay F32
        return QT.F32
    cols = ts.shape[-1]
    if quant == "F16":
        return QT.F16
    if quant == "Q8_0":
        return QT.Q8_0 if cols % 32 == 0 else QT.F16
    if quant != "Q4_K_M":
        raise OculaError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    qt = QT.Q4_K
    if ts.role == "output" or (t.tied and ts.role == "token_embd"):
        return QT.Q8_0 if cols % 256 else QT.Q6_K
    # attn_v counts its tensors, ffn_down(_exps) takes the layer from the name: both are the block index
    if ts.role in ("attn_v", "ffn_down", "ffn_down_exps") and _use_more_bits(ts.layer, t.n_layer):
        qt = QT.Q6_K
    if t.n_expert == 8:  # llama-quantize's rules for 8-expert models (Mixtral)
        if ts.role in ("attn_v", "attn_k"):
            qt = QT.Q8_0
        elif ts.role == "attn_output":
            qt = QT.Q5_K
    if cols % GGML_QUANT_SIZES[qt][0]:  # llama.cpp's tensor_type_fallback
        qt = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}.get(qt, QT.F16)
        if cols % GGML_QUANT_SIZES[qt][0]:
            qt = QT.F16
    return qt


def vision_tensor_type(ts: TensorSpec):
    from gguf import GGMLQuantizationType as QT

    if ts.kind == "f16" or (ts.kind == "weight" and len(ts.shape) >= 2):
        return QT.F16
    return QT.F32
