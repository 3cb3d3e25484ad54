"""`ocula bench --video CLIP`: the cost of a clip, per stage and per frame, optionally against llama.cpp.

    ocula bench -m MODEL.gguf --mmproj MMPROJ.gguf --video clip.mp4 [--video-fps 4] [--reps 3] [--compare llama.cpp]

ocula (per repetition, cold: no embedding cache):
  probe_ms        demux the clip: frame count, timestamps, keyframes (ocula.media.video.open_video)
  decode_ms       decode the sampled frames only (seeks) to RGB
  preprocess_ms   resize + normalise + patches (Qwen-VL video processor; other families: each frame as an image)
  encode_ms       vision tower + projector over all sampled frames; encode_ms_per_frame = encode_ms / frames
llama.cpp (llama-cpp-python's libmtmd, the `llama-mtmd-cli --video` path):
  decode_ms       mtmd_helper_video_init + read_next until the end (an `ffmpeg -vf fps=F` subprocess)
  preprocess_ms   mtmd_tokenize of "Video:", the frames and their timestamp texts (resize, patches, chunks)
  encode_ms       mtmd_encode_chunk over every image chunk (2 merged frames per chunk for Qwen-VL)
Both sample --video-fps frames per second (default 4, llama.cpp's default); their token counts differ because
each engine follows its own model processor (HF's video processor for ocula, llama.cpp's image budget per chunk).
"""
from __future__ import annotations

import ctypes
import json
import time
from pathlib import Path

from ocula.errors import OculaError

DEFAULT_FPS = 4.0


def _summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median": round(xs[len(xs) // 2], 2), "min": round(xs[0], 2), "max": round(xs[-1], 2)}


def bench_ocula(model, path: str, fps: float, reps: int, warmup: int) -> dict:
    import torch

    from ocula.engine.video_prompt import frame_indices
    from ocula.media.video import open_video
    from ocula.models.vision.qwen_video import process_video

    vision = model.vision.vision
    native = model.supports_native_video
    options = {"do_sample_frames": True, "fps": fps}
    stages: dict[str, list[float]] = {"probe_ms": [], "decode_ms": [], "preprocess_ms": [], "encode_ms": []}
    frames_n = tokens = 0
    for rep in range(warmup + reps):
        t0 = time.perf_counter()
        clip = open_video(path)
        t1 = time.perf_counter()
        with torch.inference_mode():
            if native:
                decoded = []
                original = clip.frames

                def timed_frames(idx):
                    s = time.perf_counter()
                    out = original(idx)
                    decoded.append(time.perf_counter() - s)
                    return out

                clip.frames = timed_frames
                video = process_video(vision, clip, options)
                t2 = time.perf_counter()
                vision.encode(video.processed)
                t3 = time.perf_counter()
                decode = sum(decoded)
                frames_n, tokens = len(video.indices), video.processed.n_tokens
                pre = t2 - t1 - decode
            else:
                indices = frame_indices(clip, {"fps": fps, "max_frames": 10**6})
                frames = clip.frames(indices)
                t_dec = time.perf_counter()
                processed = [vision.preprocess(_as_image(f), _image_options()) for f in frames]
                t2 = time.perf_counter()
                for p in processed:
                    vision.encode(p)
                t3 = time.perf_counter()
                decode, pre = t_dec - t1, t2 - t_dec
                frames_n, tokens = len(indices), sum(p.n_tokens for p in processed)
        if rep >= warmup:
            for key, value in (("probe_ms", t1 - t0), ("decode_ms", decode), ("preprocess_ms", pre),
                               ("encode_ms", t3 - t2)):
                stages[key].append(value * 1000)
    out = {k: _summary(v) for k, v in stages.items()}
    out.update(frames=frames_n, tokens=tokens,
               encode_ms_per_frame=round(out["encode_ms"]["median"] / max(1, frames_n), 2))
    return out


def _as_image(frame):
    from PIL import Image

    return Image.fromarray(frame)


def _image_options():
    from ocula.models.vision.base import ImageOptions

    return ImageOptions()


def bench_llamacpp(cfg: dict, path: str, fps: float, reps: int, warmup: int) -> dict:
    try:
        import llama_cpp as ll
        from llama_cpp import mtmd_cpp as mtmd
    except ImportError:
        raise OculaError("--compare llama.cpp needs llama-cpp-python: pip install 'ocula[bench]'") from None
    ll.llama_backend_init()
    mparams = ll.llama_model_default_params()
    model = ll.llama_model_load_from_file(cfg["model"].encode(), mparams)
    if not model:
        raise OculaError(f"llama.cpp could not load {cfg['model']}")
    mp = mtmd.mtmd_context_params_default()
    mp.use_gpu, mp.n_threads, mp.print_timings, mp.warmup = False, cfg["threads"], False, False
    mctx = mtmd.mtmd_init_from_file(cfg["mmproj"].encode(), model, mp)
    if not mctx:
        raise OculaError(f"llama.cpp (mtmd) could not load {cfg['mmproj']}")
    if not mtmd.mtmd_helper_support_video(mctx):
        raise OculaError("this llama.cpp build has no video support (MTMD_VIDEO, ffmpeg on PATH)")
    marker = mtmd.mtmd_default_marker()
    marker = marker.decode() if isinstance(marker, bytes) else marker
    stages: dict[str, list[float]] = {"decode_ms": [], "preprocess_ms": [], "encode_ms": []}
    frames_n = tokens = chunks_n = 0
    for rep in range(warmup + reps):
        params = mtmd.mtmd_helper_video_init_params_default()
        params.fps_target = fps
        t0 = time.perf_counter()
        video = mtmd.mtmd_helper_video_init(mctx, path.encode(), params)
        if not video:
            raise OculaError(f"llama.cpp could not open {path} as a video")
        text, bitmaps = "", []
        while True:
            bmp, txt = mtmd.mtmd_bitmap_p_ctypes(), ctypes.c_char_p()
            if mtmd.mtmd_helper_video_read_next(video, ctypes.byref(bmp), ctypes.byref(txt)) != 0:
                break
            if bmp.value:
                bitmaps.append(bmp.value)
                text += marker
            elif txt.value:
                text += txt.value.decode()
        mtmd.mtmd_helper_video_free(video)
        t1 = time.perf_counter()
        chunks = mtmd.mtmd_input_chunks_init()
        raw = text.encode()
        inp = mtmd.mtmd_input_text(raw, len(raw), False, True)
        arr = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
        if mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(inp), arr, len(bitmaps)) != 0:
            raise OculaError("mtmd_tokenize failed on the video")
        t2 = time.perf_counter()
        tokens = chunks_n = 0
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) != 1:  # MTMD_INPUT_CHUNK_TYPE_IMAGE
                continue
            chunks_n += 1
            tokens += mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            if mtmd.mtmd_encode_chunk(mctx, chunk) != 0:
                raise OculaError("mtmd_encode_chunk failed on the video")
        t3 = time.perf_counter()
        mtmd.mtmd_input_chunks_free(chunks)
        for b in bitmaps:
            mtmd.mtmd_bitmap_free(b)
        frames_n = len(bitmaps)
        if rep >= warmup:
            for key, value in (("decode_ms", t1 - t0), ("preprocess_ms", t2 - t1), ("encode_ms", t3 - t2)):
                stages[key].append(value * 1000)
    mtmd.mtmd_free(mctx)
    ll.llama_model_free(model)
    out = {k: _summary(v) for k, v in stages.items()}
    out.update(frames=frames_n, chunks=chunks_n, tokens=tokens,
               encode_ms_per_frame=round(out["encode_ms"]["median"] / max(1, frames_n), 2))
    return out


def cmd_bench_video(args) -> int:
    import torch

    from ocula.cli import load_model, resolve_model_paths

    if not args.mmproj and not args.hf:
        raise OculaError("--video needs --mmproj (a vision projector)")
    fps = args.video_fps or DEFAULT_FPS
    if not fps > 0:
        raise OculaError(f"--video-fps must be a positive number, got {fps}")
    model = load_model(args)
    text, mmproj = resolve_model_paths(args)
    cfg = {"model": str(text), "mmproj": str(mmproj), "threads": torch.get_num_threads(), "fps": fps,
           "reps": args.reps}
    report: dict = {"config": cfg, "videos": []}
    for path in args.video:
        entry = {"path": path, "ocula": bench_ocula(model, path, fps, args.reps, args.warmup)}
        if args.compare:
            entry["llama.cpp"] = bench_llamacpp(cfg, path, fps, args.reps, args.warmup)
            entry["encode_per_frame_ratio"] = round(
                entry["ocula"]["encode_ms_per_frame"] / max(1e-9, entry["llama.cpp"]["encode_ms_per_frame"]), 2)
        report["videos"].append(entry)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"model {cfg['model']}  mmproj {cfg['mmproj']}  threads {cfg['threads']}  {fps:g} fps  reps {args.reps}")
    for entry in report["videos"]:
        print(f"video {Path(entry['path']).name}")
        for engine in ("ocula", "llama.cpp"):
            r = entry.get(engine)
            if r:
                stages = "  ".join(f"{k.removesuffix('_ms')} {r[k]['median']:.1f} ms" for k in
                                   ("probe_ms", "decode_ms", "preprocess_ms", "encode_ms") if k in r)
                print(f"  [{engine}] {r['frames']} frames, {r['tokens']} tokens: {stages}  "
                      f"encode/frame {r['encode_ms_per_frame']:.1f} ms")
        if "encode_per_frame_ratio" in entry:
            print(f"  ocula / llama.cpp encode time per frame: {entry['encode_per_frame_ratio']:.2f}x")
    return 0
