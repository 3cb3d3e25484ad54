"""llama-server's native `POST /completion` (also `/completions`): its request fields and response shape.

Request: `prompt` as text, token ids, a mixed list (`[12, 34, "text", 56]`), `{"prompt_string": ...,
"multimodal_data": [base64, ...]}` with one `<__media__>` marker per image, or a list of such prompts (then
the answer is a list, one object per prompt); `n_predict` (-1: until the context is full; the server's
--default-max-tokens caps it, as llama-server's --n-predict does), `stream`, `cache_prompt` (accepted: ocula's
prefix cache is always on), `n_probs`, `json_schema`, `grammar` (GBNF, through llguidance), `logit_bias`
(`[[token or text, bias or false], ...]` or `{"id or text": bias}`), `return_tokens`, `response_fields`, and
the samplers ocula has (temperature, top_k, top_p, min_p, seed, stop, repeat_penalty, repeat_last_n,
presence/frequency_penalty, ignore_eos). A sampler ocula lacks set to a non-neutral value is a 400.

Response: llama-server's fields (content, tokens, stop, stop_type, stopping_word, tokens_predicted,
tokens_evaluated, tokens_cached, truncated, has_new_line, generation_settings, prompt, timings,
completion_probabilities) plus OpenAI's text_completion fields (id, object, created, choices, usage), so that
both kinds of client read it. Streams are llama-server's: one `data:` object per token, the last with
`stop: true`, no `[DONE]`.
"""
from __future__ import annotations

import asyncio
import copy
import math
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ocula.engine.prompt import Prompt
from ocula.engine.sampling import SamplingParams
from ocula.engine.scheduler import Delta, Finished, GenerationRequest, Started
from ocula import __version__
from ocula.errors import MediaError, OculaError, RequestError
from ocula.models.vision.base import ImageOptions
from ocula.server import protocol as P
from ocula.server.errors import APIError, to_api_error
from ocula.server.image_budget import image_max_tokens, image_token_limit
from ocula.server.llama_routes import build_info, check_token_ids, field, native

MEDIA_MARKER = "<__media__>"
MAX_COMPLETIONS = 64  # prompts x n_cmpl in one request
NUMBER = (int, float)
# samplers llama-server has and ocula does not: refused unless set to their neutral value
NEUTRAL = {"mirostat": 0, "dynatemp_range": 0, "xtc_probability": 0, "dry_multiplier": 0, "typical_p": 1,
           "top_n_sigma": -1, "n_indent": 0}


def register(app, ctx) -> None:
    @native
    async def handler(request: Request):
        return await recorded(ctx, "completion", completion(ctx, request))

    app.add_api_route("/completion", handler, methods=["POST"])
    app.add_api_route("/completions", handler, methods=["POST"])


async def recorded(ctx, endpoint: str, handling):
    """Await a route's handling and count the request in the metrics by its status (a stream counts itself
    when it ends), as the OpenAI routes do."""
    from starlette.responses import StreamingResponse

    t0 = time.perf_counter()
    status = 500
    try:
        resp = await handling
        status = None if isinstance(resp, StreamingResponse) else resp.status_code
        return resp
    except APIError as e:
        status = e.status
        raise
    finally:
        if status is not None:
            ctx.metrics.request_done(endpoint, status, time.perf_counter() - t0)


async def completion(ctx, request: Request):
    t0 = time.perf_counter()
    ctx.check_auth(request)
    body = await ctx.read_json(request)
    prompts = split_prompts(body.get("prompt"))
    refuse_text_beyond_context(ctx, prompts)
    stream = field(body, "stream", bool, False)
    n_cmpl = field(body, "n_cmpl", int, None)
    n_cmpl = field(body, "n", int, 1) if n_cmpl is None else n_cmpl
    if n_cmpl < 1:
        raise APIError(400, "n_cmpl must be >= 1", param="n_cmpl", code="invalid_value")
    if len(prompts) * n_cmpl > MAX_COMPLETIONS:
        raise APIError(400, f"at most {MAX_COMPLETIONS} completions per request (prompts x n_cmpl), got "
                            f"{len(prompts)} x {n_cmpl}", param="prompt", code="invalid_value")
    if stream and len(prompts) * n_cmpl > 1:
        raise APIError(400, f"streaming answers one prompt and one completion at a time, got {len(prompts)} "
                            f"prompt(s) x n_cmpl {n_cmpl}", param="prompt", code="unsupported_parameter")
    options = Options(ctx, body)
    if len(prompts) == 1 and n_cmpl == 1:
        greq, fmt = await prepare(ctx, options, prompts[0], 0)
        try:
            return await ctx.run(request, greq, fmt, stream, False, "completion", t0)
        except APIError as e:
            raise about_prompt(e) from None
    from ocula.server.choices import collect, disconnected, sample_requests, submit_all

    prepared = []
    for p in prompts:  # n_cmpl samples of each prompt, the first sharing its prefill with the others
        greq, fmt = await prepare(ctx, options, p, len(prepared))
        for sample in sample_requests(greq, n_cmpl):
            twin = copy.copy(fmt)
            twin.index = len(prepared)
            prepared.append((sample, twin))
    group, events = await submit_all(ctx.sched, [g for g, _ in prepared])
    try:
        outcomes = await collect(request, group, events, len(prepared))
    except APIError as e:
        raise about_prompt(e) from None
    finally:
        group.cancel()
    if outcomes is None:
        return disconnected(ctx.metrics)
    out = []
    for (_, fmt), o in zip(prepared, outcomes):
        r = o.finished.result
        ctx.metrics.tokens(r.prompt_tokens, r.completion_tokens, o.first.cached_tokens)
        out.append(fmt.full(o.first, o.deltas, o.finished))
    return JSONResponse(out)


def about_prompt(e: APIError) -> APIError:
    """Engine errors name `messages` by default; here the prompt is what was sent."""
    if e.param == "messages":
        e.param = "prompt"
    return e


# ---------------------------------------------------------------- request


def refuse_text_beyond_context(ctx, prompts: list) -> None:
    """A prompt whose text alone needs more tokens than the context holds is refused before tokenizing it
    (characters / the vocabulary's longest token), as the OpenAI routes do."""
    for p in prompts:
        text = p if isinstance(p, str) else p.get("prompt_string") if isinstance(p, dict) else None
        chars = len(text) if isinstance(text, str) else sum(len(x) for x in p if isinstance(x, str)) \
            if isinstance(p, list) else 0
        at_least = chars // ctx.model.tokenizer.max_token_bytes
        if at_least > ctx.sched.n_ctx:
            raise APIError(400, f"the prompt's text has {chars} characters, at least {at_least} tokens, but the "
                                f"context holds {ctx.sched.n_ctx}; shorten the prompt", param="prompt",
                           code="context_length_exceeded")


def split_prompts(prompt) -> list:
    """llama-server's prompt shapes → a list of single prompts (str, list of ids/strings, or a media dict)."""
    if prompt is None:
        raise APIError(400, "prompt is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, (str, dict)):
        return [prompt]
    if not isinstance(prompt, list):
        raise APIError(400, f"prompt must be a string, token ids, an object or a list of them, not "
                            f"{type(prompt).__name__}", param="prompt", code="invalid_type")
    if not prompt:
        raise APIError(400, "prompt is an empty list", param="prompt", code="invalid_value")
    if any(isinstance(p, int) and not isinstance(p, bool) for p in prompt):  # one prompt: ids, maybe mixed text
        return [prompt]
    return list(prompt)


class Options:
    """The request's generation settings, checked once and shared by all its prompts."""

    def __init__(self, ctx, body: dict):
        self.body = body
        for name, neutral in NEUTRAL.items():
            v = body.get(name)
            if v is not None and v != neutral:
                raise APIError(400, f"{name} is not supported by this server (only {name}={neutral})", param=name,
                               code="unsupported_parameter")
        for name in ("lora",):
            if body.get(name):
                raise APIError(400, f"{name} is not supported by this server", param=name,
                               code="unsupported_parameter")
        n_predict = field(body, "n_predict", int)
        if n_predict is None:
            n_predict = field(body, "max_tokens", int)
        if n_predict is not None and n_predict < 0:
            n_predict = None  # -1: until the context is full
        default = ctx.config.default_max_tokens
        if default is not None and default >= 0:
            n_predict = default if n_predict is None else min(n_predict, default)
        self.n_predict = n_predict
        opts: dict[str, Any] = {**ctx.config.sampling_defaults, "max_tokens": n_predict}
        for name, key in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"),
                          ("repeat_penalty", "repetition_penalty"), ("presence_penalty", "presence_penalty"),
                          ("frequency_penalty", "frequency_penalty")):
            v = field(body, name, NUMBER)
            if v is not None:
                opts[key] = int(v) if key == "top_k" else float(v)
        last_n = field(body, "repeat_last_n", int)
        if last_n is not None:
            opts["penalty_last_n"] = last_n
        seed = field(body, "seed", int)
        if seed is not None and seed >= 2**64:
            raise APIError(400, "seed must be below 2**64 (-1: a random seed)", param="seed", code="invalid_value")
        if seed is not None and seed >= 0:
            opts["seed"] = seed
        elif seed is not None:  # -1: a random seed, whatever the server's default
            opts.pop("seed", None)
        stop = field(body, "stop", (list, str), [])
        stop = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) for s in stop) or len(stop) > P.MAX_STOP:
            raise APIError(400, f"stop must be a list of at most {P.MAX_STOP} strings", param="stop",
                           code="invalid_value")
        opts["stop"] = stop
        opts["ignore_eos"] = field(body, "ignore_eos", bool, False)
        try:
            self.params = SamplingParams(**opts)
        except RequestError as e:
            raise APIError(400, str(e), param=str(e).split(" ", 1)[0], code="invalid_value") from None
        self.n_probs = field(body, "n_probs", int, 0)
        if not 0 <= self.n_probs <= 100:
            raise APIError(400, "n_probs must be in [0, 100]", param="n_probs", code="invalid_value")
        self.post_sampling = field(body, "post_sampling_probs", bool, False)
        self.return_tokens = field(body, "return_tokens", bool, False)
        self.response_fields = field(body, "response_fields", list, [])
        if not all(isinstance(f, str) for f in self.response_fields):
            raise APIError(400, "response_fields must be a list of strings such as \"timings/predicted_n\"",
                           param="response_fields", code="invalid_type")
        self.logit_bias = logit_bias(ctx.model, body.get("logit_bias"))
        if self.params.ignore_eos:  # as llama-server: the end-of-generation tokens can not be sampled at all
            self.logit_bias = {**(self.logit_bias or {}), **{t: -math.inf for t in ctx.model.tokenizer.eot_ids}}
        self.json_schema = field(body, "json_schema", dict)
        self.grammar = field(body, "grammar", str)
        if self.json_schema is not None and self.grammar:
            raise APIError(400, "send either json_schema or grammar, not both", param="grammar",
                           code="invalid_value")

    def settings(self, model_id: str) -> dict:
        p = self.params
        return {
            "n_predict": -1 if self.n_predict is None else self.n_predict, "seed": -1 if p.seed is None else p.seed,
            "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
            "repeat_penalty": p.repetition_penalty, "repeat_last_n": p.penalty_last_n,
            "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty, "stop": p.stop,
            "ignore_eos": p.ignore_eos, "n_probs": self.n_probs, "model": model_id,
            "logit_bias": [{"token": t, "bias": None if math.isinf(b) else b}  # null: -inf (banned)
                           for t, b in (self.logit_bias or {}).items()],
            "samplers": ["penalties", "top_k", "top_p", "min_p", "temperature"],
        }


def logit_bias(model, value) -> dict[int, float] | None:
    """llama-server's logit_bias: [[id or text, bias or false], ...] or {"id or text": bias}; a text biases each
    of its tokens; false bans the token."""
    if value is None or value == [] or value == {}:
        return None
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        raise APIError(400, "logit_bias must be [[token id or text, bias], ...] or {\"token id or text\": bias}",
                       param="logit_bias", code="invalid_type")
    n_vocab = model.text.cfg.n_vocab
    out: dict[int, float] = {}
    for key, bias in pairs:
        if bias is False:
            bias = -math.inf
        elif isinstance(bias, bool) or not isinstance(bias, NUMBER) or not math.isfinite(bias):
            raise APIError(400, f"logit_bias: the bias for {key!r} must be a finite number or false",
                           param="logit_bias", code="invalid_type")
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            key = int(key)
        if isinstance(key, int) and not isinstance(key, bool):
            check_token_ids([key], n_vocab, "logit_bias")
            ids = [key]
        elif isinstance(key, str):
            ids = model.tokenizer.encode(key, add_special=False)
        else:
            raise APIError(400, f"logit_bias: {key!r} is neither a token id nor a text", param="logit_bias",
                           code="invalid_type")
        for t in ids:
            out[t] = float(bias)
    return out or None


async def prepare(ctx, options: Options, prompt, index: int):
    """The GenerationRequest of one prompt and its response format."""
    model = ctx.model
    images = []
    if isinstance(prompt, dict):
        text = field(prompt, "prompt_string", str, where="prompt.prompt_string")
        if text is None:
            raise APIError(400, "prompt objects need a prompt_string", param="prompt.prompt_string",
                           code="missing_required_parameter")
        media = field(prompt, "multimodal_data", list, [], where="prompt.multimodal_data")
        images = await load_media(ctx, text, media)
        source: Any = text
    elif isinstance(prompt, list):
        for i, p in enumerate(prompt):
            if not isinstance(p, str):
                check_token_ids([p], model.text.cfg.n_vocab, f"prompt[{i}]")
        source = prompt
    elif isinstance(prompt, str):
        source = prompt
    else:
        raise APIError(400, f"a prompt must be a string, token ids or an object, not {type(prompt).__name__}",
                       param="prompt", code="invalid_type")
    constraint = await make_constraint(ctx, options)
    seen: dict = {}

    def build(timings):
        p = build_prompt(ctx, source, images, timings)
        seen["prompt"] = p
        return p

    greq = GenerationRequest(build, options.params, False, constraint,
                             options.n_probs if options.n_probs > 0 else None, options.logit_bias,
                             post_sampling_probs=options.post_sampling, has_images=bool(images))
    return greq, NativeFormat(ctx, options, index, seen)


async def load_media(ctx, text: str, media: list) -> list:
    markers = text.count(MEDIA_MARKER)
    if markers != len(media):
        raise APIError(400, f"prompt.prompt_string has {markers} {MEDIA_MARKER} marker(s) for {len(media)} "
                            "multimodal_data item(s): put one marker where each image goes",
                       param="prompt.multimodal_data", code="invalid_value")
    if not media:
        return []
    if not ctx.model.supports_images:
        raise APIError(400, f"model {ctx.model_id!r} does not take images (the server was started without "
                            "--mmproj)", param="prompt.multimodal_data", code="image_input_not_supported")
    if len(media) > ctx.config.max_images:
        raise APIError(400, f"{len(media)} images sent but at most {ctx.config.max_images} are allowed per request",
                       param="prompt.multimodal_data", code="too_many_images")

    return await load_images(ctx, [(f"prompt.multimodal_data[{i}]", item) for i, item in enumerate(media)])


async def load_images(ctx, sources: list[tuple[str, Any]]) -> list:
    """(where, source) pairs → PIL images through the server's MediaLoader (URLs on its bounded fetch pool);
    a 400 naming the part that fails."""
    async def one(where: str, source):
        if not isinstance(source, str) or not source:
            raise APIError(400, f"{where} must be a non-empty string (base64, data URI or URL)", param=where,
                           code="invalid_type")
        try:
            return await ctx.media.load(source)
        except MediaError as e:
            raise APIError(400, f"invalid image at {where}: {e}", param=where, code="invalid_image") from None

    return list(await asyncio.gather(*(one(w, s) for w, s in sources)))


async def make_constraint(ctx, options: Options):
    if options.json_schema is not None:
        return await ctx.make_constraint({"type": "json_schema", "json_schema": {"schema": options.json_schema}})
    if options.grammar:
        try:
            return await run_in_threadpool(grammar_constraint, ctx.model, options.grammar)
        except OculaError as e:
            raise to_api_error(e, "grammar") from None
    return None


async def extension_constraint(model, req, response_format):
    """A constraint for llama-server's `json_schema` / `grammar` request fields (on the OpenAI routes too)."""
    if response_format is not None:
        raise APIError(400, "send either response_format or llama-server's json_schema / grammar, not both",
                       param="response_format", code="invalid_value")
    if req.grammar and req.json_schema is not None:
        raise APIError(400, "send either json_schema or grammar, not both", param="grammar", code="invalid_value")
    try:
        if req.grammar:
            return await run_in_threadpool(grammar_constraint, model, req.grammar)
        return await run_in_threadpool(model.response_constraint,
                                       {"type": "json_schema", "json_schema": {"schema": req.json_schema}})
    except OculaError as e:
        raise to_api_error(e, "grammar" if req.grammar else "json_schema") from None


def grammar_constraint(model, gbnf: str):
    """A Constraint for a GBNF (or Lark) grammar, compiled by llguidance."""
    from ocula.engine.structured import Constraint, llguidance, structured_for

    so = structured_for(model)
    ll = so.lltokenizer()
    try:
        grammar = llguidance.grammar_from("gbnf", gbnf)
        matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
    except Exception as e:  # noqa: BLE001 - llguidance raises ValueError/RuntimeError on a bad grammar
        raise RequestError(f"grammar is not usable: {str(e).splitlines()[0][:300]}") from None
    if matcher.is_error():
        raise RequestError(f"grammar is not usable: {matcher.get_error().splitlines()[0][:300]}")
    return Constraint(matcher, so.n_vocab)


def build_prompt(ctx, source, images: list, timings) -> Prompt:
    """Runs on the scheduler thread. BOS comes first, as the GGUF asks, when the prompt starts with text."""
    model = ctx.model
    tok = model.tokenizer
    mrope = model.text.cfg.is_mrope
    if isinstance(source, str) and images:
        text = source.replace(MEDIA_MARKER, model.vision.vision.placeholder)
        if tok.add_bos and tok.bos_id is not None:
            text = tok.token_to_piece(tok.bos_id) + text
        messages = [{"role": "user", "content": [{"type": "image", "image": im} for im in images]}]
        cap = ImageOptions(None, image_max_tokens(model, ctx.config.image_max_tokens, None))
        limit = image_token_limit(ctx.config.max_image_tokens_per_request, ctx.sched.n_ctx)
        return model.vision.build_prompt(text, messages, timings, cap, ctx.policy, ctx.config.max_images,
                                         limit=limit)
    if isinstance(source, str):
        return Prompt.from_tokens(tok.encode(source, add_special=True), mrope)
    ids: list[int] = []
    for i, piece in enumerate(source):
        if isinstance(piece, str):
            ids += tok.encode(piece, add_special=False)
            if i == 0 and tok.add_bos and tok.bos_id is not None:
                ids.insert(0, tok.bos_id)
        else:
            ids.append(piece)
    return Prompt.from_tokens(ids, mrope)


# ---------------------------------------------------------------- response


class NativeFormat:
    """llama-server's /completion response and stream chunks, with OpenAI's text_completion fields added."""

    done_marker = False

    def __init__(self, ctx, options: Options, index: int, seen: dict):
        self.ctx, self.options, self.index, self.seen = ctx, options, index, seen
        self.tok = ctx.model.tokenizer
        self.id, self.created = P.new_id("cmpl"), P.now()
        self.predicted = 0

    def _base(self, content: str, finish: str | None) -> dict:
        return {"index": self.index, "content": content, "id_slot": -1, "model": self.ctx.model_id,
                "id": self.id, "object": "text_completion", "created": self.created,
                "system_fingerprint": build_info(__version__),
                "choices": [{"text": content, "index": self.index, "logprobs": None, "finish_reason": finish}]}

    def probs(self, items) -> list[dict]:
        """completion_probabilities: logprob / top_logprobs, or with post_sampling_probs prob / top_probs."""
        post = self.options.post_sampling

        def entry(tid: int, lp: float) -> dict:
            e = {"id": tid, "token": P.token_text(self.tok, tid), "bytes": list(self.tok.token_to_bytes(tid))}
            if post:
                e["prob"] = math.exp(lp)
            else:
                e["logprob"] = lp
            return e

        out = []
        for it in items or []:
            e = entry(it.token, it.logprob)
            e["top_probs" if post else "top_logprobs"] = [entry(t, lp) for t, lp in it.top]
            out.append(e)
        return out

    def start(self) -> list[dict]:
        return []

    def error_body(self, e: APIError) -> dict:
        """A failure in the middle of a stream, in llama-server's error shape."""
        from ocula.server.llama_routes import native_error_body

        return native_error_body(e)

    def delta(self, ev: Delta) -> dict:
        self.predicted += len(ev.token_ids)
        chunk = self._base(ev.text, None)
        chunk.update({"tokens": list(ev.token_ids), "stop": False, "tokens_predicted": self.predicted})
        if self.options.n_probs:
            chunk["completion_probabilities"] = self.probs(ev.logprobs)
        return chunk

    def finish(self, first: Started, ev: Finished, include_usage: bool) -> list[dict]:
        chunk = self._final(first, ev, ev.tail)
        chunk["tokens"] = []
        return [chunk]

    def full(self, first: Started, deltas: list[Delta], ev: Finished) -> dict:
        body = self._final(first, ev, ev.result.text)
        body["tokens"] = list(ev.result.token_ids) if self.options.return_tokens else []
        if self.options.n_probs:
            body["completion_probabilities"] = self.probs([it for d in deltas for it in (d.logprobs or [])])
        fields = self.options.response_fields
        if fields:
            return {f: pick(body, f) for f in fields if pick(body, f) is not None}
        return body

    def _final(self, first: Started, ev: Finished, content: str) -> dict:
        r = ev.result
        stop_type, word = self.stop_type(r)
        body = self._base(content, r.finish_reason)
        prompt = self.seen.get("prompt")
        body.update({
            "stop": True, "stop_type": stop_type, "stopping_word": word, "truncated": False,
            "has_new_line": "\n" in r.text, "tokens_predicted": r.completion_tokens,
            "tokens_evaluated": r.prompt_tokens, "tokens_cached": first.cached_tokens,
            "generation_settings": self.options.settings(self.ctx.model_id),
            "prompt": self.prompt_text(prompt),
            "timings": llama_timings(first, r),
            "usage": P.usage(r.prompt_tokens, r.completion_tokens, first.cached_tokens),
        })
        return body

    def stop_type(self, r) -> tuple[str, str]:
        """'limit' (n_predict reached), 'word' (a stop string, named) or 'eos' (end of text / grammar done)."""
        if r.finish_reason == "length":
            return "limit", ""
        spelled = b"".join(self.tok.token_to_bytes(t) for t in r.token_ids).decode("utf-8", errors="replace")
        for s in self.options.params.stop:
            if s in spelled[max(0, len(r.text) - len(s)):]:
                return "word", s
        return "eos", ""

    def prompt_text(self, prompt: Prompt | None) -> str:
        if prompt is None:
            return ""
        return b"".join(self.tok.token_to_bytes(t) for t in prompt.token_ids).decode("utf-8", errors="replace")


def llama_timings(first: Started, r) -> dict:
    """llama-server's `timings` object: prompt_n counts the prompt tokens computed (not cached)."""
    t = r.timings
    prompt_n = r.prompt_tokens - first.cached_tokens
    predicted_n, predicted_ms = r.completion_tokens, t.generation_ms
    return {
        "cache_n": first.cached_tokens, "prompt_n": prompt_n, "prompt_ms": round(t.prompt_ms, 3),
        "prompt_per_token_ms": round(t.prompt_ms / prompt_n, 3) if prompt_n else 0.0,
        "prompt_per_second": round(prompt_n / t.prompt_ms * 1000, 3) if t.prompt_ms else 0.0,
        "predicted_n": predicted_n, "predicted_ms": round(predicted_ms, 3),
        "predicted_per_token_ms": round(predicted_ms / predicted_n, 3) if predicted_n else 0.0,
        "predicted_per_second": round(predicted_n / predicted_ms * 1000, 3) if predicted_ms else 0.0,
    }


def pick(body: dict, path: str):
    """response_fields: 'a/b' reads body['a']['b']."""
    value: Any = body
    for key in path.split("/"):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value

