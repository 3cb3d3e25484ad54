"""Random-weight GGUF model + mmproj files with the exact shapes and metadata of real models.

`ocula synth --preset Qwen2.5-VL-3B --quant Q4_K_M -o DIR` writes

    DIR/Qwen2.5-VL-3B-Q4_K_M.gguf        text model: architecture, hparams, tokenizer, chat template
    DIR/mmproj-Qwen2.5-VL-3B-F16.gguf    vision projector (always F16, as the usual release files)

Text-only presets (Qwen3-30B-A3B) write just the text model. Mixture-of-Experts presets write
llama.cpp's merged expert tensors (`blk.N.ffn_{gate,up,down}_exps.weight`, [n_expert, rows, cols],
every expert drawn from a different place of the block pool so no two are equal) and an F32 router
`blk.N.ffn_gate_inp.weight` whose larger std makes different tokens pick different experts.

Speed does not depend on weight values, so these files benchmark ocula and llama.cpp on
realistic shapes without downloading anything. Weights are random but every block is valid: block
bytes are random, and each block's f16 scale fields (d, dmin) are set so the dequantized weights
have a standard deviation of about 0.02 (finite activations, no NaN guards tripped).

Shapes come from the models' HF `config.json` and from what llama.cpp's `convert_hf_to_gguf.py`
writes for them (tensor names, which tensors stay F32, split Conv3D patch embeddings, ...).

Tokenizers: the real Qwen / Gemma / InternVL vocabularies (tokens, merges or scores, token types,
special ids, chat template) are copied from the llama.cpp-converted fixture files in
`shared/fixtures/models` when they are there. Otherwise, and always for SmolVLM (whose fixture has a
tiny vocabulary), a byte-level BPE of the right size is trained on local Python source text with HF
`tokenizers` (~10 s, cached in ~/.cache/ocula/synth) and the family's special tokens are appended.

Quantization mixes (`--quant`):
  F16     every 2-D weight F16, norms/biases F32 (llama.cpp `--outtype f16`).
  Q8_0    every 2-D weight Q8_0 (llama-quantize Q8_0).
  Q4_K_M  llama-quantize's recipe: Q4_K everywhere except output.weight (or the tied
          token_embd) Q6_K, and attn_v / ffn_down Q6_K on the "use_more_bits" layers
          (first 1/8, last 1/8, and every third layer in between); rows whose length is not a
          multiple of 256 fall back as llama.cpp does (Q4_K -> Q5_0, Q6_K -> Q8_0; output -> Q8_0).
          MoE: ffn_down_exps follows ffn_down's rule, routers stay F32, and models with exactly 8
          experts get llama-quantize's Mixtral rules (attn_k / attn_v Q8_0, attn_output Q5_K).
"""
from __future__ import annotations

import argparse
import json
import sys

from ocula.errors import OculaError
from ocula.synth.blocks import (
    POOL_BLOCKS, ROUTER_SCALE, WEIGHT_STD, BlockPool, PoolTensor, tensor_data, tensor_nbytes,
)
from ocula.synth.presets import ALIASES, PRESETS, Preset, TextSpec, VisionSpec, get_preset, tiny
from ocula.synth.tensors import (
    FILE_TYPES, QUANTS, TensorSpec, text_tensor_type, text_tensors, vision_tensor_type, vision_tensors,
)
from ocula.synth.vocab import (
    _read_fixture_tokenizer, fixtures_dir, synth_bpe_tokenizer, tokenizer_metadata, train_bpe,
)
from ocula.synth.writer import SynthResult, synthesize, text_metadata, vision_metadata

__all__ = [
    "ALIASES", "FILE_TYPES", "POOL_BLOCKS", "PRESETS", "QUANTS", "ROUTER_SCALE", "WEIGHT_STD", "BlockPool",
    "PoolTensor", "Preset",
    "SynthResult", "TensorSpec", "TextSpec", "VisionSpec", "add_parser", "fixtures_dir", "get_preset", "main",
    "synth_bpe_tokenizer", "synthesize", "tensor_data", "tensor_nbytes", "text_metadata", "text_tensor_type",
    "text_tensors", "tiny", "tokenizer_metadata", "train_bpe", "vision_metadata", "vision_tensor_type",
    "vision_tensors", "_read_fixture_tokenizer",
]


def cmd_synth(args) -> int:
    if args.list:
        for p in PRESETS.values():
            t, v = p.text, p.vision
            ff = f"experts={t.n_expert}/{t.n_expert_used}x{t.n_ff_exp}" if t.n_expert else f"ff={t.n_ff}"
            vision = f"{v.projector} {v.image_size}px d={v.n_embd} L={v.n_layer}" if v else "text only"
            print(f"{p.name:16} {p.hf:40} {t.arch:10} d={t.n_embd} L={t.n_layer} H={t.n_head}/{t.n_head_kv} "
                  f"{ff} V={t.n_vocab} | {vision}")
        return 0
    if not args.preset:
        raise OculaError("--preset is required (see --list)")
    names = list(PRESETS) if args.preset == "all" else [args.preset]
    for name in names:
        for quant in args.quant:
            r = synthesize(name, quant, args.output, tiny_scale=args.tiny, layers=args.layers,
                           vision_layers=args.vision_layers, mmproj=not args.no_mmproj, seed=args.seed,
                           force=args.force)
            msg = f"{r.model} ({r.model_bytes / 2**20:.1f} MiB)"
            if r.mmproj:
                msg += f" + {r.mmproj} ({r.mmproj_bytes / 2**20:.1f} MiB)"
            print(f"{msg} in {r.seconds:.1f} s", file=sys.stderr)
            print(json.dumps({"model": str(r.model), "mmproj": str(r.mmproj) if r.mmproj else None}))
    return 0


def add_parser(sub, add_model_args=None) -> None:
    p = sub.add_parser("synth", help="write random-weight GGUF + mmproj files shaped like real models")
    p.add_argument("--preset", help=f"one of: {', '.join(PRESETS)} (or 'all')")
    p.add_argument("--quant", action="append", type=str.upper, choices=QUANTS, default=None,
                   help="F16, Q8_0 or Q4_K_M (repeatable; default Q4_K_M)")
    p.add_argument("-o", "--output", default=".", help="output directory")
    p.add_argument("--tiny", action="store_true", help="toy widths/depths with the same structure and tokenizer (tests)")
    p.add_argument("--layers", type=int, default=None, help="override the text block count (real widths)")
    p.add_argument("--vision-layers", type=int, default=None, help="override the vision block count")
    p.add_argument("--no-mmproj", action="store_true", help="write only the text model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rewrite files that already exist")
    p.add_argument("--list", action="store_true", help="list presets and exit")
    p.set_defaults(func=lambda a: cmd_synth(_defaults(a)))


def _defaults(args):
    if args.quant is None:
        args.quant = ["Q4_K_M"]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ocula synth")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["synth", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)

