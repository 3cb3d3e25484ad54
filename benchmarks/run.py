"""Produce the rows of benchmarks/README.md: synthesize the preset files, then run
`ocula bench --compare llama.cpp --json` for each row and keep the JSON in benchmarks/results/.

    python benchmarks/run.py [--models DIR] [--threads 2] [--only NAME ...] [--results DIR] [--list]
    python benchmarks/table.py            # renders the table from benchmarks/results/*.json

Needs llama-cpp-python (pip install 'ocula[bench]', built with CMAKE_ARGS="-DGGML_NATIVE=ON").
Rows are independent; an existing result file is kept unless --force.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name, preset, quant (None: image row with the F16 mmproj), images, -p, -n, reps, warmup, rounds
# (rounds: the two engines run alternately that many times in fresh processes; repetitions are pooled)
# Image rows skip the two-turn chat (--chat-reps 0) except the `-chat` rows, which time only that.
ROWS = [
    ("internvl3-1b-chat", "InternVL3-1B", None, ["448x448"], 0, 0, 2, 0, 1),
    ("qwen25vl3b-chat", "Qwen2.5-VL-3B", None, ["448x448"], 0, 0, 1, 0, 1),
    ("smolvlm256m-img", "SmolVLM-256M", None, ["448x448", "1280x960"], 0, 0, 3, 1, 1),
    ("qwen25vl3b-img448", "Qwen2.5-VL-3B", None, ["448x448"], 0, 0, 2, 1, 1),
    ("internvl3-1b-img448", "InternVL3-1B", None, ["448x448"], 0, 0, 2, 1, 1),
    ("smolvlm256m-q4km-text", "SmolVLM-256M", "Q4_K_M", [], 512, 32, 2, 1, 3),
    ("smolvlm256m-q80-text", "SmolVLM-256M", "Q8_0", [], 512, 32, 2, 1, 3),
    ("internvl3-1b-q4km-text", "InternVL3-1B", "Q4_K_M", [], 512, 32, 2, 1, 3),
    ("internvl3-1b-q80-text", "InternVL3-1B", "Q8_0", [], 512, 32, 2, 1, 3),
    ("qwen25vl3b-img1280", "Qwen2.5-VL-3B", None, ["1280x960"], 0, 0, 2, 0, 1),
    ("gemma3-4b-img", "Gemma-3-4B", None, ["448x448"], 0, 0, 2, 0, 1),
    ("qwen25vl3b-q4km-text", "Qwen2.5-VL-3B", "Q4_K_M", [], 512, 16, 2, 1, 2),
    ("qwen25vl3b-q80-text", "Qwen2.5-VL-3B", "Q8_0", [], 512, 16, 2, 1, 2),
    ("internvl3-1b-img1280", "InternVL3-1B", None, ["1280x960"], 0, 0, 1, 0, 1),
    ("qwen3vl2b-img", "Qwen3-VL-2B", None, ["448x448", "1280x960"], 0, 0, 2, 0, 1),
    ("gemma3-4b-q4km-text", "Gemma-3-4B", "Q4_K_M", [], 512, 16, 2, 1, 2),
    # Mixture-of-Experts, full depth: the Q4_K_M text files are ~17.3 GiB each (17.3 + 1.0 GiB with the mmproj)
    ("qwen3vl30b-a3b-q4km-text", "Qwen3-VL-30B-A3B", "Q4_K_M", [], 512, 32, 3, 1, 2),
    ("qwen3vl30b-a3b-img", "Qwen3-VL-30B-A3B", None, ["448x448", "1280x960"], 0, 0, 2, 0, 1),
    ("qwen3-30b-a3b-q4km-text", "Qwen3-30B-A3B", "Q4_K_M", [], 512, 32, 3, 1, 2),
]


def make_image(path: Path, size: str) -> Path:
    import numpy as np
    from PIL import Image

    if not path.exists():
        w, h = (int(x) for x in size.split("x"))
        rng = np.random.default_rng(w * 7 + h)
        # smooth random image (speed does not depend on content; PNG so both engines decode the same file)
        small = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="/tmp/ocula-synth", help="where synthesized GGUF files go")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="row names to run")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for both engines (e.g. OMP_WAIT_POLICY=PASSIVE); the row name gets a suffix")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="ocula's compute dtype; bfloat16 rows get the suffix -bf16")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="where the JSON goes (a folder per machine kind: see README.md)")
    args = ap.parse_args()
    models = Path(args.models)
    models.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    for name, preset, quant, images, n_p, n_g, reps, warmup, rounds in ROWS:
        if args.list:
            print(name)
            continue
        if args.only and name not in args.only:
            continue
        env = dict(os.environ)
        env.update(kv.split("=", 1) for kv in args.env)
        tag = "".join("-" + kv.split("=", 1)[1].lower() for kv in args.env)
        tag += "-bf16" if args.dtype == "bfloat16" else ""
        out = args.results / f"{name}{tag}.json"
        if out.exists() and not args.force:
            continue
        synth = [sys.executable, "-m", "ocula", "synth", "--preset", preset, "--quant", quant or "Q4_K_M",
                 "-o", str(models)]
        files = json.loads(subprocess.run(synth, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        cmd = ["ocula", "bench", "-m", files["model"], "-t", str(args.threads), "-p", str(n_p), "-n", str(n_g),
               "--reps", str(reps), "--warmup", str(warmup), "--rounds", str(rounds), "--compare", "llama.cpp", "--json"]
        if args.dtype != "float32":
            cmd += ["--dtype", args.dtype]
        if images:
            cmd += ["--mmproj", files["mmproj"], "--chat-reps", str(reps if name.endswith("-chat") else 0)]
            for size in images:
                cmd += ["--image", str(make_image(models / f"bench-{size}.png", size))]
        t0 = time.time()
        print(f"[{name}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "ocula", *cmd[1:]], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        report["command"] = " ".join(args.env + [shlex.join(cmd)])
        report["synth_command"] = shlex.join(["ocula", *synth[3:]])
        report["wall_s"] = round(time.time() - t0, 1)
        report["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
        out.write_text(json.dumps(report, indent=1))
        print(f"[{name}] done in {report['wall_s']} s: ratios {report['ratios']}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
