"""`ocula serve`: the OpenAI-compatible server. Imported by `ocula.cli.build_parser` (keep it light)."""
from __future__ import annotations

import ipaddress
import os
import sys
import time

from ocula.errors import OculaError
from ocula.server.llama_flags import add_llama_server_flags, apply_llama_server_flags


def _size(text: str) -> int:
    """'20M', '512K', '1G' or a plain number of bytes."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        return int(float(t) * mult)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 20M, 512K, 1G)") from None


def add_parser(sub, add_model_args) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat with images, completions, metrics)",
                       description="Serve the model over an OpenAI-compatible HTTP API. Needs pip install 'ocula[server]'.")
    add_model_args(p, sampling=False)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    g.add_argument("--port", type=int, default=8080)
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; '*' for any; 'localhost' for any port on "
                        "localhost, 127.0.0.1 and [::1]). Default: CORS off")
    g.add_argument("--alias", default=None, help="model id in /v1/models and responses (default: the file name); "
                   "a comma-separated list gives several names, the id being the first in alphabetical order")
    g.add_argument("--tags", default=None, help="comma-separated labels listed with the model in /v1/models")
    g.add_argument("--chat-template", metavar="NAME|FILE|TEMPLATE", default=None,
                   help="chat through this template instead of the GGUF's own: a built-in name (chatml, gemma, "
                        "llama3, command-r), a Jinja file, or the template text")
    g.add_argument("--chat-template-file", metavar="FILE", default=None,
                   help="as --chat-template, from a Jinja file (llama-server's flag)")
    g.add_argument("--reasoning", choices=["on", "off", "auto"], default="auto",
                   help="off: templates get enable_thinking=false (models that think answer at once); on/auto: "
                        "enable_thinking=true. A request's chat_template_kwargs override it")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="every chat / completions answer carries __verbose (the prompt as the model read it)")
    g.add_argument("--no-ui", "--no-webui", dest="web_ui", action="store_false",
                   help="no chat page at / (API routes only)")
    g.add_argument("--max-request-bytes", type=_size, default=None, metavar="BYTES",
                   help="largest request body (default: room for the context's text, JSON-escaped, plus "
                        "--max-request-media-bytes of base64 media)")
    g.add_argument("--max-request-media-bytes", type=_size, default=32 * 1024 * 1024, metavar="BYTES",
                   help="inline (base64) images and videos one request body may carry, decoded (default 32M)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s = p.add_argument_group("scheduling")
    s.add_argument("-np", "--parallel", type=int, default=8, help="sequences decoded together (default 8)")
    s.add_argument("--queue-size", type=int, default=64, help="waiting requests before 503 (default 64)")
    s.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill step (default 512)")
    s.add_argument("--prefix-cache", type=_size, default=_size("512M"), metavar="BYTES",
                   help="KV prefix cache pool size (default 512M; 0 disables)")
    s.add_argument("--image-cache", type=_size, default=None, metavar="BYTES",
                   help="image embedding cache size (default 512M)")
    s.add_argument("--default-max-tokens", "-n", "--n-predict", dest="default_max_tokens", type=int, default=None,
                   help="answer length when a request sets no max_tokens (default: until the context is full; "
                        "on llama-server's /completion it also caps n_predict)")
    d = p.add_argument_group("sampling defaults (what a request gets when it does not say; llama-server's flags)")
    d.add_argument("--temp", "--temperature", dest="temperature", type=float, default=None, help="default 0.8")
    d.add_argument("--top-k", type=int, default=None, help="default 40")
    d.add_argument("--top-p", type=float, default=None, help="default 0.95")
    d.add_argument("--min-p", type=float, default=None, help="default 0.05")
    d.add_argument("--repeat-penalty", dest="repetition_penalty", type=float, default=None, help="default 1.0")
    d.add_argument("-s", "--seed", type=int, default=None, help="default: a fresh random seed per request")
    s.add_argument("--pooling", choices=["none", "mean", "cls", "last"], default=None,
                   help="embeddings: how token states are pooled (default: the GGUF's pooling_type, else last)")
    m = p.add_argument_group("media")
    m.add_argument("--allowed-media-path", default=None, metavar="DIR",
                   help="allow file:// URLs and paths inside DIR (default: no local files)")
    m.add_argument("--allow-private-media", action="store_true",
                   help="allow image URLs on loopback/private networks (default: refused); link-local "
                        "addresses (169.254.0.0/16, fe80::/10: cloud metadata services) stay refused")
    m.add_argument("--allow-link-local-media", action="store_true",
                   help="with --allow-private-media, also allow link-local image URLs (default: refused)")
    m.add_argument("--no-remote-media", action="store_true", help="refuse http(s) image URLs")
    m.add_argument("--max-image-bytes", type=_size, default=_size("20M"), metavar="BYTES")
    m.add_argument("--max-image-pixels", type=int, default=50_000_000)
    m.add_argument("--max-images", type=int, default=8, help="images per request (default 8)")
    m.add_argument("--media-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="total time for one image URL fetch: connect, headers, body (default 10)")
    m.add_argument("--max-media-fetches", type=int, default=8, metavar="N",
                   help="image URLs fetched at once over all requests; more wait for a slot within "
                        "--media-timeout (default 8)")
    m.add_argument("--image-min-tokens", type=int, default=None)
    m.add_argument("--image-max-tokens", type=int, default=None,
                   help="tokens per image unless a request sets image_max_tokens (default: 4096, or the "
                        "processor's own default where that is lower)")
    m.add_argument("--max-image-tokens-per-request", type=int, default=16384, metavar="N",
                   help="image tokens of all a request's images together; more is refused with a 400 before "
                        "any is encoded (default 16384; 0: no limit but the context)")
    m.add_argument("--image-workers", type=int, default=2, metavar="N",
                   help="requests whose images are encoded at once, while the others keep decoding (default 2: "
                        "a small image need not wait for a large one)")
    m.add_argument("--image-threads", type=int, default=None, metavar="N",
                   help="threads of each image worker (default: half of --threads, at least 1)")
    v = p.add_argument_group("video")
    v.add_argument("--max-videos", type=int, default=2, help="videos per request (default 2)")
    v.add_argument("--max-video-bytes", type=_size, default=_size("100M"), metavar="BYTES")
    v.add_argument("--max-video-seconds", type=float, default=600.0, help="longest clip accepted (default 600)")
    v.add_argument("--video-fps", type=float, default=None,
                   help="frames sampled per second (default: the model's video processor's own setting)")
    v.add_argument("--video-max-frames", type=int, default=None, help="most frames sampled from one clip")
    v.add_argument("--video-max-tokens", type=int, default=None, help="most tokens one clip may take "
                   "(default: the context size)")
    add_llama_server_flags(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from ocula.server.app import create_app
    except ImportError as e:
        raise OculaError(f"the server needs its extra packages ({e.name} is missing): pip install 'ocula[server]'") \
            from None
    from ocula.cli import load_model
    from ocula.server.config import ServerConfig
    from ocula.server.web import page_url

    if args.parallel < 1 or args.queue_size < 0 or args.prefill_chunk < 1:
        raise OculaError("--parallel and --prefill-chunk must be >= 1, --queue-size >= 0")
    video_config = _video_config(args)
    for flag, value in (("--image-min-tokens", args.image_min_tokens), ("--image-max-tokens", args.image_max_tokens),
                        ("--image-threads", args.image_threads), ("--image-workers", args.image_workers)):
        if value is not None and value < 1:
            raise OculaError(f"{flag} must be >= 1, got {value}")
    if args.max_image_tokens_per_request < 0:
        raise OculaError(f"--max-image-tokens-per-request must be >= 0, got {args.max_image_tokens_per_request}")
    if not 0 < args.media_timeout <= 3600 or args.max_media_fetches < 1:
        raise OculaError("--media-timeout must be > 0 and at most 3600 seconds, --max-media-fetches >= 1")
    check_listen_address(args.host, args.port)  # before the model loads: a busy port is known at once
    template_text = chosen_template(args)
    if not _is_loopback(args.host) and not args.api_key:
        print(f"ocula: warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    if args.threads is None:  # leave a core to the HTTP side (event loop, image decoding)
        args.threads = max(1, (os.cpu_count() or 2) - 1)
    aliases = _names(args.alias)
    model = load_model(args)
    apply_llama_server_flags(args, model)  # -b, and a note on llama-server flags without effect here
    if template_text is not None:
        from ocula.text.chat import ChatTemplate

        tok = model.tokenizer
        model.template = ChatTemplate(template_text, tok.bos_token, tok.eos_token, model.architecture)
    elif not model.has_chat_template:
        from ocula.text.cli_template import fallback_name

        print(f"ocula: warning: {model.gguf.path.name} has no chat template (a base model?): chat requests are "
              f"wrapped in {fallback_name(model.architecture)} (--chat-template to choose); /v1/completions "
              "completes prompts as is", file=sys.stderr)
    model.template.default_kwargs["enable_thinking"] = args.reasoning != "off"
    # as llama-server: Llama 3.x templates print "Today Date: {date_string}" (their own fallback is a fixed 2024 day)
    model.template.default_kwargs["date_string"] = lambda: time.strftime("%d %b %Y")
    if args.image_cache is not None and model.vision is not None:
        model.vision.cache.max_bytes = args.image_cache
    config = ServerConfig(
        model_id=min(aliases) if aliases else None, model_aliases=aliases, model_tags=_names(args.tags),
        api_key=args.api_key, cors_origins=args.cors_origin, web_ui=args.web_ui, verbose=args.verbose,
        max_batch=args.parallel, max_queue=args.queue_size, prefill_chunk=args.prefill_chunk,
        prefix_cache_bytes=args.prefix_cache, default_max_tokens=args.default_max_tokens, pooling=args.pooling,
        sampling_defaults=sampling_defaults(args),
        allowed_media_path=args.allowed_media_path, allow_private_media=args.allow_private_media,
        allow_link_local_media=args.allow_link_local_media,
        allow_remote_media=not args.no_remote_media, max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels, max_images=args.max_images,
        media_timeout=args.media_timeout, max_media_fetches=args.max_media_fetches,
        image_min_tokens=args.image_min_tokens, image_max_tokens=args.image_max_tokens,
        max_image_tokens_per_request=args.max_image_tokens_per_request or None, image_threads=args.image_threads,
        image_workers=args.image_workers,
        max_body_bytes=args.max_request_bytes,
        max_request_media_bytes=args.max_request_media_bytes,
        **video_config,
    )
    app = create_app(model, config)
    print(f"ocula: serving {config.model_id or model.gguf.path.name} on http://{_host_for_url(args.host)}:{args.port}"
          f" (vision: {'yes' if model.supports_images else 'no'}, context {model.n_ctx}, {args.threads} compute "
          f"thread(s), up to {args.parallel} sequences at once)", file=sys.stderr)
    print(f"ocula: chat page at {page_url(args.host, args.port)}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def _names(text: str | None) -> list[str]:
    return sorted({n.strip() for n in (text or "").split(",") if n.strip()})


def chosen_template(args) -> str | None:
    """The text of --chat-template / --chat-template-file (checked to parse before the model loads), or None."""
    if args.chat_template and args.chat_template_file:
        raise OculaError("--chat-template and --chat-template-file both given: pick one")
    if args.chat_template_file and not os.path.isfile(args.chat_template_file):
        raise OculaError(f"cannot read --chat-template-file {args.chat_template_file}: no such file")
    choice = args.chat_template or args.chat_template_file
    if choice is None:
        return None
    from ocula.text.chat import ChatTemplate
    from ocula.text.cli_template import template_source

    text = template_source(choice)
    ChatTemplate(text)  # a TemplateError (an OculaError) if it does not parse
    return text


def check_listen_address(host: str, port: int) -> None:
    """An OculaError if the server could not listen on host:port: a port outside 0..65535, a host name that does
    not resolve or is not this machine's, or a port another process listens on (bound and released here)."""
    import errno
    import socket

    if not 0 <= port <= 65535:
        raise OculaError(f"--port must be in 0..65535, got {port}")
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise OculaError(f"--host {host!r} does not resolve: {e}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            try:
                s.bind(address)
            except OSError as e:
                where = f"{_host_for_url(address[0])}:{port}"
                if e.errno == errno.EADDRINUSE:
                    raise OculaError(f"port {port} is already in use on {address[0]} (another server is "
                                     f"listening there); pick another with --port") from None
                if e.errno in (errno.EACCES, errno.EPERM):
                    raise OculaError(f"not allowed to listen on {where} (ports below 1024 need privileges); "
                                     "pick another with --port") from None
                raise OculaError(f"cannot listen on {where}: {e.strerror or e}") from None


def sampling_defaults(args) -> dict:
    """The sampling flags given on the command line (the rest keep the library's defaults)."""
    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    out = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if out.get("seed", 0) < 0:  # llama-server's -1: random
        del out["seed"]
    from ocula.engine.sampling import SamplingParams
    from ocula.errors import RequestError

    try:
        SamplingParams(**out)
    except RequestError as e:
        raise OculaError(f"bad sampling default: {e}") from None
    return out


def _video_config(args) -> dict:
    for name in ("max_videos", "video_max_frames", "video_max_tokens"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "max_videos" else 1):
            raise OculaError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    for name in ("max_video_seconds", "video_fps"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise OculaError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    return dict(max_videos=args.max_videos, max_video_bytes=args.max_video_bytes,
                max_video_seconds=args.max_video_seconds, video_fps=args.video_fps,
                video_max_frames=args.video_max_frames, video_max_tokens=args.video_max_tokens)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host
