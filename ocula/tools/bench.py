"""`ocula bench`: load time, image preprocess/encode, prompt processing, generation, TTFT, peak RSS.

    ocula bench -m MODEL.gguf [--mmproj MMPROJ.gguf --image a.jpg ...] [-p 512 -n 128 -t 4 --reps 3] [--json]
    ocula bench ... --compare llama.cpp      # the same measurements through llama-cpp-python, and ratios

What is measured (per repetition; min and median are reported):
  load_ms         ocula.load() / llama_model_load_from_file + context (+ mtmd) creation, once
  image           per image: preprocess_ms (file decode + resize/normalize/tiling: ocula's
                  load_image + VisionModel.preprocess; llama.cpp's bitmap_init_from_buf + mtmd_tokenize),
                  encode_ms (vision tower + projector: VisionModel.encode; mtmd_encode_chunk for every
                  image chunk), tokens (embeddings the image becomes in the prompt)
  pp              a synthetic prompt of exactly -p token ids (different ids every repetition) prefilled
                  into an empty KV cache; tokens/s
  ttft_ms         prefill of that prompt + picking the first token
  tg              -n tokens generated greedily after it, EOS ignored; tokens/s over the n-1 decode steps
  peak_rss_mb     the process's peak resident set (getrusage ru_maxrss / VmHWM): with --compare every
                  engine runs in its own subprocess so each gets its own number (taken before the chat below)
  ttft_first_turn_ms, ttft_second_turn_ms, second_turn_ttft (with --image; --chat-reps, 0 skips it)
                  a two-turn chat about the first image (ocula/tools/bench_turns.py): turn 1 = image + question,
                  turn 2 = the conversation re-sent with the answer and a new question; wall time to the
                  first token of each, and second / first per repetition. Each repetition starts with
                  cold caches; turn 2 reuses what the engine cached (ocula: image embeddings + prefix KV;
                  llama.cpp: KV prefix reuse as llama-server does it, through the C API)

Prefix caching cannot hide prompt work: ocula's engine runs with its prefix cache off and every
repetition's prompt is different; llama.cpp's KV memory is cleared before every repetition.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("ocula", "llama.cpp")
RATIO_KEYS = ("image_encode_time", "pp_tps", "tg_tps", "peak_rss")
TURN_KEYS = ("ttft_first_turn_ms", "ttft_second_turn_ms", "second_turn_ttft")


# ----------------------------------------------------------------------------- helpers


def summary(values: list[float]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None, "values": []}
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3), "values": [round(v, 3) for v in values]}


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (VmHWM; ru_maxrss as fallback)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def synthetic_prompt(n: int, n_vocab: int, rep: int) -> list[int]:
    """n token ids, different for every repetition, from the ordinary part of the vocabulary."""
    import random

    rng = random.Random(1000 + rep)
    lo, hi = min(256, n_vocab // 4), max(min(n_vocab - 1, 30000), min(256, n_vocab // 4) + 1)
    return [rng.randrange(lo, hi) for _ in range(n)]


def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return round(a / b, 3)


def compute_ratios(ocula: dict, llama: dict, best: bool = False) -> dict:
    """ocula divided by llama.cpp: image encode time (lower is better for ocula), prompt and
    generation tokens/s (higher is better), peak RSS (lower is better). On medians, or with
    best=True on each engine's best repetition (shortest encode, highest tokens/s)."""

    def encode_total(r: dict):
        vals = [i["encode_ms"].get("min" if best else "median") for i in r.get("images") or []]
        return sum(vals) if vals and None not in vals else None

    def tps(r: dict, key: str):
        return (r.get(key) or {}).get("tps", {}).get("max" if best else "median")

    return {
        "image_encode_time": _ratio(encode_total(ocula), encode_total(llama)),
        "pp_tps": _ratio(tps(ocula, "pp"), tps(llama, "pp")),
        "tg_tps": _ratio(tps(ocula, "tg"), tps(llama, "tg")),
        "peak_rss": _ratio(ocula.get("peak_rss_mb"), llama.get("peak_rss_mb")),
    }


def _image_info(path: str) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        return {"path": str(path), "width": im.width, "height": im.height}


# ----------------------------------------------------------------------------- ocula


def run_ocula(cfg: dict) -> dict:
    import torch

    import ocula
    from ocula.engine.sampling import SamplingParams
    from ocula.media import load_image
    from ocula.models.vision.base import ImageOptions

    threads = cfg["threads"]
    t0 = time.perf_counter()
    kwargs = {k: cfg[k] for k in ("kernels", "kv_dtype") if cfg.get(k)}  # older ocula.load has neither
    model = ocula.load(cfg["model"], mmproj=cfg.get("mmproj"), dtype=cfg.get("dtype", "float32"),
                       device=cfg.get("device"), threads=threads, n_ctx=cfg.get("ctx_size"), **kwargs)
    load_ms = (time.perf_counter() - t0) * 1000
    model.engine.prefix_cache = False  # every prefill starts from an empty KV cache
    out: dict = {"engine": "ocula", "version": ocula.__version__, "torch": torch.__version__,
                 "kernels": cfg.get("kernels") or "auto",
                 "threads": torch.get_num_threads(), "dtype": str(model.dtype).replace("torch.", ""),
                 "load_ms": round(load_ms, 1), "n_vocab": model.text.cfg.n_vocab, "arch": model.architecture,
                 "source": source_state()}

    images = []
    if cfg.get("images"):
        if model.vision is None:
            raise SystemExit("ocula bench: --image needs --mmproj")
        vision = model.vision.vision
        opts = ImageOptions(cfg.get("image_min_tokens"), cfg.get("image_max_tokens"))

        def one(path: str):
            t0 = time.perf_counter()
            processed = vision.preprocess(load_image(path), opts)
            t1 = time.perf_counter()
            with torch.inference_mode():
                features = vision.encode(processed)
            t2 = time.perf_counter()
            return processed.n_tokens, (t1 - t0) * 1000, (t2 - t1) * 1000, features

        for path in cfg["images"]:
            for _ in range(cfg.get("warmup", 1)):
                one(path)
            pre, enc, n_tok = [], [], 0
            for _ in range(cfg["reps"]):
                n_tok, p_ms, e_ms, _ = one(path)
                pre.append(p_ms)
                enc.append(e_ms)
            images.append({**_image_info(path), "tokens": n_tok, "preprocess_ms": summary(pre),
                           "encode_ms": summary(enc)})
    out["images"] = images

    n_p, n_g = cfg["n_prompt"], cfg["n_gen"]
    if n_p > 0:
        params = SamplingParams(max_tokens=max(n_g, 1), temperature=0.0, ignore_eos=True)
        for w in range(cfg.get("warmup", 1)):
            model.engine.run(_prompt(model, synthetic_prompt(min(n_p, 32), out["n_vocab"], -1 - w)),
                             SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        pp, tg, ttft = [], [], []
        for rep in range(cfg["reps"]):
            ids = synthetic_prompt(n_p, out["n_vocab"], rep)
            res = model.engine.run(_prompt(model, ids), params)
            t = res.timings
            if t.cached_tokens:
                raise RuntimeError("prefix cache reused prompt tokens; the measurement would be wrong")
            pp.append(n_p / (t.prompt_ms / 1000))
            ttft.append(t.ttft_ms)
            if n_g > 1:
                tg.append(t.generation_tps)
        out["pp"] = {"tokens": n_p, "tps": summary(pp)}
        out["ttft_ms"] = summary(ttft)
        if n_g > 1:
            out["tg"] = {"tokens": n_g, "tps": summary(tg)}
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if cfg.get("images") and cfg.get("chat_reps", 0) > 0:
        from ocula.tools.bench_turns import run_ocula_turns

        opts = {"image_min_tokens": cfg.get("image_min_tokens"), "image_max_tokens": cfg.get("image_max_tokens")}
        out.update(run_ocula_turns(model, cfg["images"][0], cfg["chat_reps"], summary, opts))
    return out


def source_state() -> dict:
    """Which ocula code was measured: git commit + uncommitted files under ocula/ (other people's
    work in progress changes the numbers), or just the version outside a checkout."""
    import ocula

    root = Path(ocula.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "ocula"], capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {"version": ocula.__version__}
    import hashlib

    files = sorted(line[3:] for line in dirty if line.strip())
    digest = {f: hashlib.sha256((root / f).read_bytes()).hexdigest()[:12] for f in files if (root / f).is_file()}
    return {"version": ocula.__version__, "commit": commit or None, "uncommitted": digest}


def _prompt(model, ids: list[int]):
    from ocula.engine.prompt import Prompt

    return Prompt.from_tokens(ids, model.text.cfg.is_mrope)


# ----------------------------------------------------------------------------- llama.cpp


def run_llamacpp(cfg: dict) -> dict:
    import ctypes

    import numpy as np

    try:
        import llama_cpp
        from llama_cpp import llama_cpp as ll
    except ImportError:
        raise SystemExit("ocula bench --compare llama.cpp needs llama-cpp-python: pip install 'ocula[bench]'") from None

    threads = cfg["threads"]
    n_p, n_g = cfg["n_prompt"], cfg["n_gen"]
    n_batch = 512
    _quiet_llama(ll)
    ll.llama_backend_init()
    t0 = time.perf_counter()
    mparams = ll.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = ll.llama_model_load_from_file(cfg["model"].encode(), mparams)
    if not model:
        raise SystemExit(f"llama.cpp could not load {cfg['model']}")
    cparams = ll.llama_context_default_params()
    cparams.n_ctx = max(256, ((n_p + n_g + 16 + 255) // 256) * 256)
    cparams.n_batch = n_batch
    cparams.n_ubatch = n_batch
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.no_perf = True
    ctx = ll.llama_init_from_model(model, cparams)
    if not ctx:
        raise SystemExit("llama.cpp could not create a context")
    mctx = None
    if cfg.get("mmproj"):
        from llama_cpp import mtmd_cpp as mtmd

        _quiet_mtmd(mtmd)
        mp = mtmd.mtmd_context_params_default()
        mp.use_gpu = False
        mp.n_threads = threads
        mp.print_timings = False
        mp.warmup = False
        if cfg.get("image_min_tokens"):
            mp.image_min_tokens = cfg["image_min_tokens"]
        if cfg.get("image_max_tokens"):
            mp.image_max_tokens = cfg["image_max_tokens"]
        mctx = mtmd.mtmd_init_from_file(cfg["mmproj"].encode(), model, mp)
        if not mctx:
            raise SystemExit(f"llama.cpp (mtmd) could not load {cfg['mmproj']}")
    load_ms = (time.perf_counter() - t0) * 1000
    vocab = ll.llama_model_get_vocab(model)
    n_vocab = ll.llama_vocab_n_tokens(vocab)
    out: dict = {"engine": "llama.cpp", "version": getattr(llama_cpp, "__version__", "?"), "threads": threads,
                 "n_batch": n_batch, "n_ctx": cparams.n_ctx, "load_ms": round(load_ms, 1), "n_vocab": n_vocab}

    images = []
    if cfg.get("images"):
        if mctx is None:
            raise SystemExit("ocula bench: --image needs --mmproj")
        marker = mtmd.mtmd_default_marker()

        def one(path: str):
            data = Path(path).read_bytes()
            buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            t0 = time.perf_counter()
            bmp = mtmd.mtmd_helper_bitmap_init_from_buf(mctx, buf, len(data), False)
            if not bmp:
                raise SystemExit(f"llama.cpp could not decode {path}")
            chunks = mtmd.mtmd_input_chunks_init()
            text = mtmd.mtmd_input_text(marker, len(marker), False, True)
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bmp)
            rc = mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise SystemExit(f"mtmd_tokenize failed ({rc}) for {path}")
            t1 = time.perf_counter()
            n_tok, enc_ms = 0, 0.0
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) != 1:  # MTMD_INPUT_CHUNK_TYPE_IMAGE
                    continue
                n_tok += mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                t2 = time.perf_counter()
                if mtmd.mtmd_encode_chunk(mctx, chunk) != 0:
                    raise SystemExit(f"mtmd_encode_chunk failed for {path}")
                enc_ms += (time.perf_counter() - t2) * 1000
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bmp)
            return n_tok, (t1 - t0) * 1000, enc_ms

        for path in cfg["images"]:
            for _ in range(cfg.get("warmup", 1)):
                one(path)
            pre, enc, n_tok = [], [], 0
            for _ in range(cfg["reps"]):
                n_tok, p_ms, e_ms = one(path)
                pre.append(p_ms)
                enc.append(e_ms)
            images.append({**_image_info(path), "tokens": n_tok, "preprocess_ms": summary(pre),
                           "encode_ms": summary(enc)})
    out["images"] = images

    mem = ll.llama_get_memory(ctx)

    def decode(tokens: list[int]) -> None:
        for s in range(0, len(tokens), n_batch):
            part = tokens[s : s + n_batch]
            arr = (ll.llama_token * len(part))(*part)
            rc = ll.llama_decode(ctx, ll.llama_batch_get_one(arr, len(part)))
            if rc != 0:
                raise SystemExit(f"llama_decode failed ({rc})")

    def argmax() -> int:
        ptr = ll.llama_get_logits_ith(ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())

    def run(ids: list[int], n_gen: int):
        ll.llama_memory_clear(mem, True)
        t0 = time.perf_counter()
        decode(ids)
        tok = argmax()
        t1 = time.perf_counter()
        for _ in range(n_gen - 1):
            decode([tok])
            tok = argmax()
        t2 = time.perf_counter()
        return (t1 - t0) * 1000, (t2 - t1) * 1000

    if n_p > 0:
        for w in range(cfg.get("warmup", 1)):
            run(synthetic_prompt(min(n_p, 32), n_vocab, -1 - w), 2)
        pp, tg, ttft = [], [], []
        for rep in range(cfg["reps"]):
            ids = synthetic_prompt(n_p, n_vocab, rep)
            first_ms, gen_ms = run(ids, max(n_g, 1))
            # llama.cpp has no separate "sample" step here: argmax over the logits is part of TTFT
            pp.append(n_p / (first_ms / 1000))
            ttft.append(first_ms)
            if n_g > 1:
                tg.append((n_g - 1) / (gen_ms / 1000))
        out["pp"] = {"tokens": n_p, "tps": summary(pp)}
        out["ttft_ms"] = summary(ttft)
        if n_g > 1:
            out["tg"] = {"tokens": n_g, "tps": summary(tg)}
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if mctx is not None and images and cfg.get("chat_reps", 0) > 0:
        from ocula.tools.bench_turns import run_llamacpp_turns

        out.update(run_llamacpp_turns(ll, mtmd, model, mctx, cfg, cfg["images"][0], images[0]["tokens"], summary))
    if mctx is not None:
        mtmd.mtmd_free(mctx)
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    return out


_LOG_CB = {}


def _quiet_llama(ll) -> None:
    if os.environ.get("OCULA_BENCH_VERBOSE"):
        return
    cb = ll.llama_log_callback(lambda level, text, user: None)
    _LOG_CB["llama"] = cb
    ll.llama_log_set(cb, None)


def _quiet_mtmd(mtmd) -> None:
    if os.environ.get("OCULA_BENCH_VERBOSE"):
        return
    try:
        from llama_cpp import llama_cpp as ll

        cb = ll.llama_log_callback(lambda level, text, user: None)
        _LOG_CB["mtmd"] = cb
        mtmd.mtmd_log_set(cb, None)
        mtmd.mtmd_helper_log_set(cb, None)
    except (AttributeError, TypeError):
        pass


# ----------------------------------------------------------------------------- orchestration


def run_engine(engine: str, cfg: dict) -> dict:
    res = run_ocula(cfg) if engine == "ocula" else run_llamacpp(cfg)
    res.update(model=cfg["model"], mmproj=cfg.get("mmproj"), n_prompt=cfg["n_prompt"], n_gen=cfg["n_gen"],
               reps=cfg["reps"])
    # OpenMP's wait policy and glibc's malloc thresholds change both engines' speed (ocula's package sets a
    # bounded spin, GOMP_SPINCOUNT, and keeps freed heap memory, unless the environment says otherwise; the
    # llama.cpp worker imports ocula too)
    import ocula  # noqa: PLC0415

    res["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    res["gomp_spincount"] = os.environ.get("GOMP_SPINCOUNT")
    res["malloc_tuned"] = ocula.MALLOC_TUNED
    return res


def run_subprocess(engine: str, cfg: dict) -> dict:
    """One engine in a fresh interpreter, so its peak RSS is its own."""
    proc = subprocess.run([sys.executable, "-m", "ocula.tools.bench", "--worker", engine, json.dumps(cfg)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ocula bench: the {engine} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def config_from_args(args) -> dict:
    from ocula.cli import resolve_model_paths

    model, mmproj = resolve_model_paths(args)
    images = list(args.image or [])
    for img in images:
        if not os.path.exists(img):
            raise SystemExit(f"ocula bench: no such image: {img}")
    return {
        "model": str(model), "mmproj": str(mmproj) if mmproj else None, "images": images,
        "n_prompt": args.n_prompt, "n_gen": args.n_gen, "reps": max(1, args.reps), "warmup": max(0, args.warmup),
        "threads": args.threads or os.cpu_count() or 1, "dtype": args.dtype, "device": args.device,
        "ctx_size": args.ctx_size, "image_min_tokens": args.image_min_tokens,
        "image_max_tokens": args.image_max_tokens, "kernels": getattr(args, "kernels", None),
        "kv_dtype": getattr(args, "kv_dtype", None),
        "chat_reps": max(0, args.reps if args.chat_reps is None else args.chat_reps) if images else 0,
    }


def merge_runs(runs: list[dict]) -> dict:
    """Several runs of one engine (--rounds) as one result: repetition values pooled, peak RSS the
    largest, load time the median."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    out["rounds"] = len(runs)
    out["load_ms"] = round(statistics.median(r["load_ms"] for r in runs), 1)
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    for key in ("pp", "tg"):
        if key in out:
            out[key] = {**out[key], "tps": summary([v for r in runs for v in r[key]["tps"]["values"]])}
    for key in ("ttft_ms", *TURN_KEYS):
        if key in out:
            out[key] = summary([v for r in runs for v in r[key]["values"]])
    if "chat" in out:
        out["chat"] = {**out["chat"], "turns": [t for r in runs for t in r["chat"]["turns"]]}
    out["images"] = [
        {**imgs[0], "preprocess_ms": summary([v for i in imgs for v in i["preprocess_ms"]["values"]]),
         "encode_ms": summary([v for i in imgs for v in i["encode_ms"]["values"]])}
        for imgs in zip(*(r.get("images", []) for r in runs))
    ]
    return out


def cmd_bench(args) -> int:
    if args.video:  # a clip's decode / preprocess / encode cost (ocula/tools/bench_video.py)
        from ocula.tools.bench_video import cmd_bench_video

        return cmd_bench_video(args)
    cfg = config_from_args(args)
    if args.compare:
        # engines alternate round by round, so a change in machine load hits both alike
        runs: dict[str, list[dict]] = {"ocula": [], "llama.cpp": []}
        for _ in range(max(1, args.rounds)):
            for e in runs:
                runs[e].append(run_subprocess(e, cfg))
        results = {e: merge_runs(r) for e, r in runs.items()}
        report = {"config": cfg, "ocula": results["ocula"], "llama.cpp": results["llama.cpp"],
                  "ratios": compute_ratios(results["ocula"], results["llama.cpp"]),
                  "ratios_best": compute_ratios(results["ocula"], results["llama.cpp"], best=True)}
        if "ttft_second_turn_ms" in results["ocula"] and "ttft_second_turn_ms" in results["llama.cpp"]:
            report["chat_ratios"] = {  # ocula / llama.cpp on medians
                k.removesuffix("_ms"): _ratio(results["ocula"][k]["median"], results["llama.cpp"][k]["median"])
                for k in TURN_KEYS[:2]}
    else:
        engine = args.engine or "ocula"
        report = {"config": cfg, engine: run_engine(engine, cfg)}
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


def _fmt(s: dict | None, unit: str = "", digits: int = 1) -> str:
    if not s or s.get("median") is None:
        return "-"
    lo, hi = s.get("min", s["median"]), s.get("max", s["median"])
    return f"{s['median']:.{digits}f}{unit} (min {lo:.{digits}f}, max {hi:.{digits}f})"


def format_report(report: dict) -> str:
    lines = []
    cfg = report["config"]
    lines.append(f"model {cfg['model']}" + (f"  mmproj {cfg['mmproj']}" if cfg.get("mmproj") else ""))
    lines.append(f"threads {cfg['threads']}  prompt {cfg['n_prompt']} tok  generate {cfg['n_gen']} tok  "
                 f"reps {cfg['reps']} (median, min, max)")
    for engine in ENGINES:
        r = report.get(engine)
        if not r:
            continue
        lines.append(f"[{engine}] load {r.get('load_ms', 0):.0f} ms  peak RSS {r.get('peak_rss_mb', 0):.0f} MiB")
        for im in r.get("images", []):
            lines.append(f"  image {Path(im.get('path', '?')).name} {im.get('width')}x{im.get('height')}: "
                         f"{im.get('tokens')} tok, "
                         f"preprocess {_fmt(im.get('preprocess_ms'), ' ms')}, encode {_fmt(im.get('encode_ms'), ' ms')}")
        if "pp" in r:
            lines.append(f"  pp{r['pp'].get('tokens', '')}: {_fmt(r['pp'].get('tps'), ' t/s', 2)}   "
                         f"ttft {_fmt(r.get('ttft_ms'), ' ms')}")
        if "tg" in r:
            lines.append(f"  tg{r['tg'].get('tokens', '')}: {_fmt(r['tg'].get('tps'), ' t/s', 2)}")
        if "ttft_second_turn_ms" in r:
            turn = r["chat"]["turns"][0]
            lines.append(f"  chat ttft turn 1: {_fmt(r['ttft_first_turn_ms'], ' ms')}, turn 2: "
                         f"{_fmt(r['ttft_second_turn_ms'], ' ms')}, turn 2 / turn 1: "
                         f"{_fmt(r['second_turn_ttft'], '', 3)} (turn 2 reused {turn['cached_tokens'][1]} of "
                         f"{turn['prompt_tokens'][1]} prompt tokens, images encoded {turn['images_encoded'][1]})")
    for key, label in (("ratios", "medians"), ("ratios_best", "best repetitions"), ("chat_ratios", "chat TTFT")):
        if key in report:
            lines.append(f"ocula / llama.cpp ({label}): " + ", ".join(
                f"{k} {v:.2f}x" if v is not None else f"{k} -" for k, v in report[key].items()))
    return "\n".join(lines)


def add_parser(sub, add_model_args) -> None:
    p = sub.add_parser("bench", help="measure load, image encode, prompt/generation speed and memory")
    add_model_args(p, sampling=False)
    p.add_argument("--image", action="append", default=[], help="image file to preprocess + encode (repeatable)")
    p.add_argument("--image-min-tokens", type=int, default=None)
    p.add_argument("--image-max-tokens", type=int, default=None)
    p.add_argument("--video", action="append", default=[], help="measure this clip's decode, preprocess and encode "
                   "time per frame instead (repeatable; see ocula/tools/bench_video.py)")
    p.add_argument("--video-fps", type=float, default=None, help="with --video: frames sampled per second (4)")
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="synthetic prompt length in tokens (0: skip)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="tokens to generate, EOS ignored (0: skip)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (min and median are reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs before the repetitions")
    p.add_argument("--chat-reps", type=int, default=None,
                   help="repetitions of the two-turn chat about the first --image (default --reps; 0 skips it)")
    p.add_argument("--compare", choices=["llama.cpp"], help="also run llama-cpp-python and print ocula/llama.cpp ratios")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --compare: run the engines alternately this many times (fresh processes) and pool "
                        "the repetitions; evens out changing machine load")
    p.add_argument("--engine", choices=ENGINES, help="run only this engine, in this process (default ocula)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)


def _worker_main(argv: list[str]) -> int:
    engine, cfg = argv[0], json.loads(argv[1])
    res = run_engine(engine, cfg)
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    from ocula.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
