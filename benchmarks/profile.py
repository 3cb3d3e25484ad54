"""Where ocula spends time in prefill and in decode, for one model.

    # torch.profiler: top aten ops by self CPU time, per phase
    python benchmarks/profile.py -m MODEL.gguf --phase prefill -p 512 --torch
    python benchmarks/profile.py -m MODEL.gguf --phase decode -n 16 --torch

    # py-spy (Python-level attribution: dequantize vs matmul vs attention ...)
    py-spy record -r 40 --format raw -o decode.txt -- python benchmarks/profile.py -m MODEL.gguf --phase decode -n 16
    python benchmarks/profile.py --summarize decode.txt
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
import time


def workload(model_path: str, phase: str, n_prompt: int, n_gen: int, threads: int, use_torch: bool,
             repeat: int = 1, mmproj: str | None = None, image: str | None = None,
             dtype: str = "float32") -> None:
    import torch

    import ocula
    from ocula.tools.bench import synthetic_prompt
    from ocula.engine.prompt import Prompt
    from ocula.engine.sampling import SamplingParams

    model = ocula.load(model_path, mmproj=mmproj, threads=threads, dtype=dtype)
    model.engine.prefix_cache = False
    vocab = model.text.cfg.n_vocab
    mrope = model.text.cfg.is_mrope
    # warm-up (not profiled)
    model.engine.run(Prompt.from_tokens(synthetic_prompt(8, vocab, 99), mrope),
                     SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))

    def run():
        for _ in range(repeat):
            once()

    def once():
        t0 = time.perf_counter()
        if phase == "image":
            from ocula.media import load_image
            from ocula.models.vision.base import ImageOptions

            vision = model.vision.vision
            processed = vision.preprocess(load_image(image), ImageOptions())
            with torch.inference_mode():
                vision.encode(processed)
        elif phase == "prefill":
            with torch.inference_mode():
                model.engine.prefill(Prompt.from_tokens(synthetic_prompt(n_prompt, vocab, 0), mrope))
        else:
            ids = synthetic_prompt(4, vocab, 0)  # a 4-token prompt: the run is (almost) all decode steps
            res = model.engine.run(Prompt.from_tokens(ids, mrope),
                                   SamplingParams(max_tokens=n_gen, temperature=0.0, ignore_eos=True))
            print(f"decode: {res.timings.generation_tps:.2f} tok/s", file=sys.stderr)
        print(f"{phase}: {time.perf_counter() - t0:.2f} s", file=sys.stderr)

    if not use_torch:
        run()
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))


GROUPS = [  # (label, regex on a frame "function (file:line)"); the innermost matching frame wins
    ("weight decode to float (dequant / native_dequant)", r"^(native_dequant|dequantize|_q\w+|_k\w+) \(ocula/quant/"),
    ("fused mat-vec kernel (native_linear / q8_linear -> C ocula_matmul[_q8])",
     r"^(native_linear|q8_linear|_fused) \(ocula/quant/kernels\.py"),
    ("GEMM on decoded tiles (tiles_gemm / tiled_linear F.linear)", r"^(tiles_gemm|tiled_linear) \(ocula/quant/"),
    ("ggml mat-mul", r"ggml"),
    ("attention (attend / sdpa / vision _attention)", r"^attend \(|^_attend|_attention|ViTBlock\.attention"),
    ("image preprocessing", r"preprocess|_resize|load_image"),
    ("rope", r"apply_rope|Rotary\.forward|RopeTable"),
    ("norms", r"RMSNorm\.forward|LayerNorm\.forward"),
    ("KV cache update", r"KVCache\.update|KVCache\._ensure"),
    ("embedding lookup", r"QEmbedding\.forward"),
    ("logits + sampling", r"TextModel\.logits|Sampler|sampling\.py"),
    ("model load / imports", r"ocula\.load|Model\.__init__|_find_and_load|load_gguf_weights"),
]


def summarize(path: str) -> None:
    """Aggregate py-spy --format raw (folded stacks): share of samples per group (innermost ocula frame)
    and the top leaf functions."""
    groups: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    for line in open(path, encoding="utf-8"):
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [f.strip() for f in stack.split(";")]
        total += n
        leaves[frames[-1]] += n
        label = "other"
        for frame in reversed(frames):
            hit = next((g for g, rx in GROUPS if re.search(rx, frame)), None)
            if hit:
                label = hit
                break
        groups[label] += n
    print(f"{total} samples")
    print("| share | where (innermost ocula frame) |\n|---:|---|")
    for g, n in groups.most_common():
        print(f"| {100 * n / total:.1f}% | {g} |")
    print("\n| share | leaf function |\n|---:|---|")
    for f, n in leaves.most_common(10):
        print(f"| {100 * n / total:.1f}% | `{f}` |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model")
    ap.add_argument("--phase", choices=["prefill", "decode", "image"], default="decode")
    ap.add_argument("--mmproj")
    ap.add_argument("--image")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=16)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="ocula's compute dtype")
    ap.add_argument("--torch", action="store_true", help="print torch.profiler's top ops")
    ap.add_argument("--repeat", type=int, default=1, help="run the phase this many times (so it dominates the profile)")
    ap.add_argument("--summarize", help="aggregate a py-spy raw (folded) profile instead")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return 0
    workload(args.model, args.phase, args.n_prompt, args.n_gen, args.threads, args.torch, args.repeat,
             args.mmproj, args.image, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
