"""OpenAI request schemas (validated with pydantic) and response builders.

Unknown request fields are accepted and ignored (clients send `user`, `store`, `metadata`, ...). Fields OpenAI
defines that would change the answer but ocula does not implement (legacy `functions`, `audio`,
`best_of` > 1, `suffix`, ...) are refused with 400 `unsupported_parameter` rather than silently dropped.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from ocula.engine.sampling import SamplingParams
from ocula.server.errors import APIError

SYSTEM_FINGERPRINT = "b0-ocula"  # llama-server's "b<build>-<commit>" form, which its clients and tests expect
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20


class _Req(BaseModel):
    # NaN and infinities (Python's json reads `NaN`, `Infinity`) are refused as values of every number field;
    # booleans are strict: "yes", "true", 1 are not true (use StrictBool, not bool, in request models)
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Req):
    include_usage: StrictBool = False


class _Sampling(_Req):
    model: str | None = None
    verbose: StrictBool = False  # llama-server: add __verbose (the prompt as read) to the answer
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    repeat_penalty: float | None = Field(None, gt=0)  # llama.cpp's name
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    n: int | None = Field(None, ge=1)
    ignore_eos: StrictBool = False
    # llama-server extensions: constrain the answer to a JSON schema or a GBNF grammar
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None
    tools: list[Any] | None = None  # chat only (ocula.server.chat_tools)
    tool_choice: Any = None
    # unsupported: refused when set (see check_unsupported)
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    image_min_tokens: int | None = Field(None, ge=1)
    image_max_tokens: int | None = Field(None, ge=1)
    parallel_tool_calls: StrictBool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: StrictBool | None = None  # False with continue_final_message: continue the last turn
    continue_final_message: StrictBool | None = None
    reasoning_format: str | None = None
    video_options: dict[str, Any] | None = None  # HF video processor keywords (ocula.engine.video_prompt)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: StrictBool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


def parse(model: type[BaseModel], body: dict) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
        kind = err.get("type", "")
        code = "missing_required_parameter" if kind == "missing" else "invalid_type" if "type" in kind or kind.endswith(
            ("_parsing", "_type")) else "invalid_value"
        extra = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
        value = err.get("input")
        got = f", got {value!r}" if isinstance(value, (int, float, str)) and len(repr(value)) <= 40 else ""
        raise APIError(400, f"{loc or 'body'}: {err['msg']}{got}{extra}", param=loc or None, code=code) from None


_UNION_TAGS = {"str", "list[str]", "list[int]", "list[list[int]]", "function-after", "constrained-int",
               "constrained-float", "bool", "int", "float", "dict[str,any]", "list[any]"}


def check_unsupported(req: _Sampling) -> None:
    def refuse(name: str, why: str) -> None:
        raise APIError(400, f"{name} is not supported by this server: {why}", param=name, code="unsupported_parameter")

    if req.functions:
        refuse("functions", "the legacy functions field is not implemented; send tools instead")
    if req.function_call not in (None, "none", "auto"):
        refuse("function_call", "the legacy function_call field is not implemented; send tool_choice instead")
    if not isinstance(req, ChatRequest):
        if req.tools:
            refuse("tools", "tools are taken by /v1/chat/completions only")
        if req.tool_choice not in (None, "none", "auto"):
            refuse("tool_choice", "tools are taken by /v1/chat/completions only")
    if req.audio is not None or (req.modalities and set(req.modalities) - {"text"}):
        refuse("modalities" if req.audio is None else "audio", "only text output is produced")
    if req.prediction is not None:
        refuse("prediction", "predicted outputs are not implemented")
    if isinstance(req, CompletionRequest):
        if req.best_of is not None and req.best_of > 1:
            refuse("best_of", "one completion is generated per request")
        if req.suffix:
            refuse("suffix", "fill-in-the-middle is not implemented")
        if req.echo and req.logprobs is not None:
            refuse("echo", "echo with logprobs (prompt logprobs) is not implemented")


def sampling_params(req: _Sampling, default_max_tokens: int | None,
                    defaults: dict | None = None) -> tuple[SamplingParams, bool]:
    """SamplingParams for a request (over the server's `defaults`), and whether max_tokens was given explicitly."""
    mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    explicit = mt is not None
    opts: dict[str, Any] = dict(defaults or {})
    opts["max_tokens"] = mt if explicit else default_max_tokens
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty"):
        v = getattr(req, name)
        if v is not None:
            opts[name] = v
    if req.seed == -1:  # llama-server's "random seed", which its clients send on these routes too
        opts.pop("seed", None)
    rp = req.repetition_penalty if req.repetition_penalty is not None else req.repeat_penalty
    if rp is not None:
        opts["repetition_penalty"] = rp
    if req.stop is not None:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop)
        if len(stops) > MAX_STOP:
            raise APIError(400, f"stop: at most {MAX_STOP} stop strings are allowed, got {len(stops)}", param="stop",
                           code="invalid_value")
        opts["stop"] = stops
    opts["ignore_eos"] = req.ignore_eos
    from ocula.errors import RequestError

    try:
        return SamplingParams(**opts), explicit
    except RequestError as e:
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0], code="invalid_value") from None


def logit_bias(req: _Sampling, n_vocab: int) -> dict[int, float] | None:
    if not req.logit_bias:
        return None
    out = {}
    for k, v in req.logit_bias.items():
        try:
            tid = int(k)
        except ValueError:
            raise APIError(400, f"logit_bias: key {k!r} is not a token id", param="logit_bias",
                           code="invalid_value") from None
        if not 0 <= tid < n_vocab:
            raise APIError(400, f"logit_bias: token id {tid} is outside the vocabulary (0..{n_vocab - 1})",
                           param="logit_bias", code="invalid_value")
        if not -100 <= v <= 100:
            raise APIError(400, f"logit_bias: bias {v} for token {tid} is outside [-100, 100]", param="logit_bias",
                           code="invalid_value")
        out[tid] = float(v)
    return out


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def token_text(tokenizer, tid: int) -> str:
    """A token's text; a piece that is not whole UTF-8 shows as 'bytes:\\xNN...' (as OpenAI does)."""
    b = tokenizer.token_to_bytes(tid)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{c:02x}" for c in b)


def chat_logprobs(tokenizer, items) -> list[dict]:
    def entry(tid: int, lp: float) -> dict:
        return {"token": token_text(tokenizer, tid), "logprob": lp, "bytes": list(tokenizer.token_to_bytes(tid))}

    out = []
    for it in items:
        e = entry(it.token, it.logprob)
        e["top_logprobs"] = [entry(t, lp) for t, lp in it.top]
        out.append(e)
    return out


def completion_logprobs(tokenizer, items, offset: int) -> tuple[dict, int]:
    tokens, lps, tops, offsets = [], [], [], []
    for it in items:
        piece = token_text(tokenizer, it.token)
        tokens.append(piece)
        lps.append(it.logprob)
        tops.append({token_text(tokenizer, t): lp for t, lp in it.top})
        offsets.append(offset)
        offset += len(tokenizer.token_to_piece(it.token))
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}, offset


Finish = Literal["stop", "length"]
