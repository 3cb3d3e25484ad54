"""Embeddings: `POST /v1/embeddings` (OpenAI) and llama-server's `/embeddings` and `/embedding`.

An embedding is the loaded model's last hidden state (after the final norm), pooled over the input's tokens
and L2-normalised. Pooling follows the GGUF's `<arch>.pooling_type` key (0 none, 1 mean, 2 cls = first token,
3 last token); a generative model without that key pools the **last** token (the one that has attended to the
whole input: what decoder-based embedding models such as Qwen3-Embedding or e5-mistral use). `ocula serve
--pooling` overrides it. Pooling `none` gives one vector per token, unnormalised, on the native routes only
(OpenAI's shape has one vector per input), as llama-server does.

Inputs: a string, token ids, a mixed list (`[12, "text", 34]`), `{"prompt_string": ..., "multimodal_data":
[base64]}` with `<__media__>` markers, `{"content": [text and image_url parts]}`, or a list of those; images
need a model with an mmproj. Each input runs as one forward on the scheduler thread (`Scheduler.call`),
between decode steps of the running generations.

`/v1/embeddings` answers OpenAI's `{"object": "list", "data": [...], "usage"}` (with `encoding_format:
"base64"`: little-endian float32). `/embeddings` answers llama-server's list `[{"index", "embedding":
[[...]]}]`, except that a request carrying `model` and `input` (what OpenAI clients send to a base URL
without /v1) gets OpenAI's shape.
"""
from __future__ import annotations

import asyncio
import base64
import time

import torch
from fastapi import Request
from fastapi.responses import JSONResponse

from ocula.engine.generate import Timings
from ocula.engine.prompt import Prompt
from ocula.models.text.base import StepInput
from ocula.server.errors import APIError, to_api_error
from ocula.server.llama_routes import check_token_ids, field, native
from ocula.server.native_completion import (
    MEDIA_MARKER, build_prompt, load_images, load_media, refuse_text_beyond_context, split_prompts,
)

POOLING_TYPES = {0: "none", 1: "mean", 2: "cls", 3: "last"}
MAX_INPUTS = 256


def model_pooling(model, override: str | None = None) -> str:
    """The pooling for this model: --pooling, else the GGUF's pooling_type, else 'last'."""
    if override:
        return override
    kind = model.gguf.get(f"{model.architecture}.pooling_type")
    return POOLING_TYPES.get(kind, "last") if kind is not None else "last"


def register(app, ctx) -> None:
    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request):
        return await embeddings(ctx, request, openai_shape=True)

    @native
    async def native_embeddings(request: Request):
        return await embeddings(ctx, request, openai_shape=None)

    app.add_api_route("/embeddings", native_embeddings, methods=["POST"])
    app.add_api_route("/embedding", native_embeddings, methods=["POST"])


async def embeddings(ctx, request: Request, openai_shape: bool | None):
    t0 = time.perf_counter()
    status = 500
    try:
        ctx.check_auth(request)
        body = await ctx.read_json(request)
        if "input" in body:
            raw = body["input"]
        elif "content" in body:
            raw = body["content"]
            openai_shape = False if openai_shape is None else openai_shape
        else:
            raise APIError(400, "send the text to embed as 'input' (or 'content')", param="input",
                           code="missing_required_parameter")
        if openai_shape is None:
            openai_shape = "model" in body
        pooling = model_pooling(ctx.model, getattr(ctx.config, "pooling", None))
        if openai_shape and pooling == "none":
            raise APIError(400, "pooling 'none' gives one vector per token, which OpenAI's embeddings shape cannot "
                                "carry: use /embeddings, or start the server with --pooling mean or last",
                           param="input", code="unsupported_value")
        fmt = field(body, "encoding_format", str, "float")
        if fmt not in ("float", "base64"):
            raise APIError(400, f"encoding_format must be 'float' or 'base64', not {fmt!r}", param="encoding_format",
                           code="invalid_value")
        dims = field(body, "dimensions", int)
        if dims is not None and dims != ctx.model.text.cfg.n_embd:
            raise APIError(400, f"dimensions: this model's embeddings have {ctx.model.text.cfg.n_embd}, and "
                                "shortening them is not supported", param="dimensions", code="unsupported_value")
        norm = field(body, "embd_normalize", int, 2)
        inputs = await prepare_inputs(ctx, raw)
        try:
            # images are encoded on the image workers first (into the embedding cache), so that the forward on
            # the scheduler thread does not stop the decoding sequences for an image's encode
            await asyncio.gather(*(asyncio.wrap_future(ctx.sched.images.call(
                lambda s=s: build_prompt(ctx, *s, Timings()))) for s in inputs if s[1]))
            futures = [asyncio.wrap_future(ctx.sched.call(lambda s=s: embed(ctx, s, pooling, norm))) for s in inputs]
            results = await asyncio.gather(*futures)
        except Exception as e:  # noqa: BLE001 - engine errors become 4xx, the rest 500 (never a traceback)
            raise to_api_error(e, "input") from None
        n_tokens = sum(n for _, n in results)
        ctx.metrics.tokens(n_tokens, 0, 0)
        status = 200
        if openai_shape:
            data = [{"object": "embedding", "index": i, "embedding": encode(vec, fmt)} for i, (vec, _) in
                    enumerate(results)]
            return JSONResponse({"object": "list", "data": data, "model": ctx.model_id,
                                 "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})
        return JSONResponse([{"index": i, "embedding": vec.tolist() if vec.dim() == 2 else [vec.tolist()]}
                             for i, (vec, _) in enumerate(results)])
    except APIError as e:
        status = e.status
        raise
    finally:
        ctx.metrics.request_done("embeddings", status, time.perf_counter() - t0)


def encode(vec: torch.Tensor, fmt: str):
    if fmt == "base64":
        return base64.b64encode(vec.numpy().astype("<f4").tobytes()).decode()
    return vec.tolist()


async def prepare_inputs(ctx, raw) -> list[tuple]:
    """Every input as (source, images) for build_prompt; images fetched and decoded here (thread pool)."""
    if isinstance(raw, list) and not raw:
        raise APIError(400, "input is an empty list", param="input", code="invalid_value")
    if isinstance(raw, dict):
        items = [raw]
    else:
        try:
            items = split_prompts(raw)
        except APIError as e:
            e.message, e.param = e.message.replace("prompt", "input", 1), "input"
            raise
    try:
        refuse_text_beyond_context(ctx, items)
    except APIError as e:
        e.message = f"the input is too large to process: {e.message}"
        e.param = "input"
        raise
    if len(items) > MAX_INPUTS:
        raise APIError(400, f"input: at most {MAX_INPUTS} inputs per request, got {len(items)}", param="input",
                       code="invalid_value")
    out = []
    for i, item in enumerate(items):
        where = f"input[{i}]" if len(items) > 1 else "input"
        if isinstance(item, str):
            out.append((item, []))
        elif isinstance(item, list):
            for j, p in enumerate(item):
                if not isinstance(p, str):
                    check_token_ids([p], ctx.model.text.cfg.n_vocab, f"{where}[{j}]")
            out.append((item, []))
        elif isinstance(item, dict) and "prompt_string" in item:
            text = field(item, "prompt_string", str, "", where=f"{where}.prompt_string")
            media = field(item, "multimodal_data", list, [], where=f"{where}.multimodal_data")
            out.append((text, await load_media(ctx, text, media)))
        elif isinstance(item, dict) and "content" in item:
            out.append(await content_parts(ctx, item["content"], where))
        else:
            raise APIError(400, f"{where} must be a string, token ids, {{\"prompt_string\": ...}} or {{\"content\": "
                                "[parts]}", param=where, code="invalid_type")
    return out


async def content_parts(ctx, parts, where: str) -> tuple[str, list]:
    """{"content": [text and image parts]} → text with a <__media__> marker per image, and the images."""
    from ocula.text.chat import IMAGE_PART_TYPES
    from ocula.server.app import _image_source

    if not isinstance(parts, list):
        raise APIError(400, f"{where}.content must be a list of parts such as {{\"type\": \"text\", \"text\": ...}}",
                       param=f"{where}.content", code="invalid_type")
    text, sources = "", []
    for j, part in enumerate(parts):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text += part["text"]
        elif kind in IMAGE_PART_TYPES:
            if not ctx.model.supports_images:
                raise APIError(400, f"model {ctx.model_id!r} does not take images (the server was started without "
                                    "--mmproj)", param=at, code="image_input_not_supported")
            text += MEDIA_MARKER
            sources.append((at, _image_source(part, at)))
        else:
            raise APIError(400, f"{at}: a part of type {kind!r} cannot be embedded here; send 'text' or "
                                "'image_url' parts", param=at, code="invalid_value")
    if len(sources) > ctx.config.max_images:
        raise APIError(400, f"{len(sources)} images sent but at most {ctx.config.max_images} are allowed per input",
                       param=where, code="too_many_images")

    return text, await load_images(ctx, sources)


@torch.inference_mode()
def embed(ctx, item: tuple, pooling: str, norm: int) -> tuple[torch.Tensor, int]:
    """Runs on the scheduler thread: one forward over the input, pooled and normalised; (vector(s), tokens)."""
    model, sched = ctx.model, ctx.sched
    source, images = item
    prompt: Prompt = build_prompt(ctx, source, images, Timings())
    n = len(prompt)
    if n == 0:
        raise APIError(400, "the input is empty (it has no tokens)", param="input", code="invalid_value")
    if n > sched.n_ctx:
        raise APIError(400, f"the input is too large to process: it has {n} tokens but the context holds "
                            f"{sched.n_ctx}", param="input", code="context_length_exceeded")
    cache = model.text.new_cache()
    hidden = []
    start = 0
    while start < n:
        stop = prompt.safe_cut(min(start + sched.prefill_chunk, n))
        if stop <= start:  # an image longer than one chunk goes in whole
            stop = next(img.stop for img in prompt.images if img.start == start)
        x, deepstack = model.engine._embed(prompt, start, stop)
        step = StepInput(prompt.positions[..., start:stop], cache, prompt.groups(start, stop), deepstack)
        hidden.append(model.text(x[None], step)[0].float())
        start = stop
    h = torch.cat(hidden)
    if pooling == "none":
        return h.cpu(), n
    vec = {"mean": lambda: h.mean(0), "cls": lambda: h[0], "last": lambda: h[-1]}[pooling]()
    return normalize(vec, norm).cpu(), n


def normalize(v: torch.Tensor, norm: int) -> torch.Tensor:
    """llama.cpp's embd_normalize: -1 none, 0 max-abs (scaled to int16), 1 taxicab, 2 euclidean, p > 2 p-norm."""
    if norm < 0:
        return v
    if norm == 0:
        scale = v.abs().max() / 32760.0
    else:
        scale = v.abs().pow(norm).sum().pow(1.0 / norm)
    return v / scale if float(scale) > 0 else v

