"""Prefill and decode for one sequence at a time, with prefix (KV) reuse between calls."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ocula.engine.prompt import Prompt
from ocula.engine.sampling import Sampler, SamplingParams, find_stop, partial_stop_len
from ocula.errors import RequestError
from ocula.models.layers import KVCache
from ocula.models.text.base import StepInput, TextModel

PREFILL_CHUNK = 512  # tokens per prefill forward: bounds activation memory on long prompts
# generated tokens whose KV room is reserved up front when the request sets no max_tokens (beyond: the
# cache grows); the reservation is uninitialized memory, so slots never written cost no RSS
RESERVE_NEW_TOKENS = 1024


@dataclass
class Timings:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prompt_ms: float = 0.0
    image_encode_ms: float = 0.0  # images encoded for this prompt (cached ones cost nothing)
    image_tokens: int = 0
    images_encoded: int = 0
    images_cached: int = 0
    ttft_ms: float = 0.0
    generated_tokens: int = 0
    generation_ms: float = 0.0

    @property
    def prompt_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / (self.prompt_ms / 1000) if self.prompt_ms else 0.0

    @property
    def generation_tps(self) -> float:
        # the first token comes from prefill; the rest from decode steps
        n = self.generated_tokens - 1
        return n / (self.generation_ms / 1000) if self.generation_ms and n > 0 else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["prompt_tps"] = round(self.prompt_tps, 2)
        d["generation_tps"] = round(self.generation_tps, 2)
        return d


@dataclass
class Result:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    timings: Timings = field(default_factory=Timings)
    parsed: Any = None  # Model.chat: ocula.engine.tool_calls.ParsedAnswer (text, reasoning, tool calls)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Chunk:
    """A streamed piece of the answer; the last one carries finish_reason and the whole Result."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    result: Result | None = None

    def __str__(self) -> str:
        return self.text


class Engine:
    def __init__(self, model: TextModel, tokenizer, n_ctx: int | None = None, prefix_cache: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.n_ctx = min(n_ctx or model.cfg.context_length, model.cfg.context_length)
        self.prefix_cache = prefix_cache
        self._cache: KVCache | None = None
        self._cache_keys: list = []
        self._lock = threading.RLock()

    # ------------------------------------------------------------ prefill

    def _claim_cache(self, prompt: Prompt) -> tuple[KVCache, int]:
        """A cache holding the longest reusable prefix of `prompt`, and that prefix's length."""
        keys = prompt.cache_keys()
        if self._cache is None or not self.prefix_cache:
            self._cache = None  # freed before its replacement is allocated
            self._cache = self.model.new_cache()
            self._cache_keys = []
        n = 0
        for a, b in zip(self._cache_keys, keys):
            if a != b:
                break
            n += 1
        n = prompt.safe_cut(min(n, len(prompt) - 1, self._cache.length))
        self._cache.truncate(n)
        self._cache_keys = keys[:n]
        return self._cache, n

    def _embed(self, prompt: Prompt, start: int, stop: int) -> tuple[torch.Tensor, list | None]:
        ids = torch.tensor(prompt.token_ids[start:stop], dtype=torch.long)
        x = self.model.embed(ids)
        deepstack = None
        for img in prompt.images:
            a, b = max(img.start, start), min(img.stop, stop)
            if a >= b:
                continue
            x[a - start : b - start] = img.features[a - img.start : b - img.start].to(x.dtype)
            if img.deepstack:
                if deepstack is None:
                    deepstack = [torch.zeros_like(x) for _ in img.deepstack]
                for layer, feats in enumerate(img.deepstack):
                    deepstack[layer][a - start : b - start] = feats[a - img.start : b - img.start].to(x.dtype)
        return x, deepstack

    def prefill(self, prompt: Prompt, new_tokens: int = 0) -> tuple[torch.Tensor, KVCache, int]:
        """Run the uncached part of the prompt; return last-position logits [vocab], the cache, #reused.

        `new_tokens`: how many tokens will be generated after it (their KV room is reserved now)."""
        if len(prompt) == 0:
            raise RequestError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise RequestError(
                f"the prompt has {len(prompt)} tokens but the context holds {self.n_ctx}; "
                "shorten the conversation, send fewer or smaller images, or raise n_ctx"
            )
        cache, reused = self._claim_cache(prompt)
        cache.reserve(min(len(prompt) + new_tokens, self.n_ctx))
        start = reused
        hidden = None
        while start < len(prompt):
            stop = prompt.safe_cut(min(start + PREFILL_CHUNK, len(prompt)))
            if stop <= start:  # an image longer than one chunk goes in whole
                stop = next(img.stop for img in prompt.images if img.start == start)
            x, deepstack = self._embed(prompt, start, stop)
            pos = prompt.positions[..., start:stop]
            step = StepInput(pos, cache, prompt.groups(start, stop), deepstack)
            hidden = self.model(x[None], step)[0, -1]
            start = stop
        self._cache_keys = prompt.cache_keys()
        return self.model.logits(hidden), cache, reused

    def decode_step(self, token: int, position: int, cache: KVCache, mrope: bool) -> torch.Tensor:
        x = self.model.embed(torch.tensor([token]))[None]
        pos = torch.tensor([position])
        if mrope:
            pos = pos.expand(3, 1)
        hidden = self.model(x, StepInput(pos, cache))[0, -1]
        return self.model.logits(hidden)

    @torch.inference_mode()
    def prompt_logits(self, prompt: Prompt) -> torch.Tensor:
        with self._lock:
            logits, _, _ = self.prefill(prompt)
            return logits

    # ------------------------------------------------------------ generation

    @torch.inference_mode()
    def stream(self, prompt: Prompt, params: SamplingParams, timings: Timings | None = None,
               constraint=None) -> Iterator[Chunk]:
        """Yield the answer piece by piece; the final Chunk has finish_reason and the Result.

        `constraint` (ocula.engine.structured.Constraint) restricts every token to what its grammar allows.
        """
        with self._lock:
            yield from self._stream(prompt, params, timings or Timings(), constraint)

    def _stream(self, prompt: Prompt, params: SamplingParams, timings: Timings, constraint=None) -> Iterator[Chunk]:
        tok = self.tokenizer
        sampler = Sampler(params)
        budget = min(params.max_tokens if params.max_tokens is not None else self.n_ctx, self.n_ctx - len(prompt))
        t0 = time.perf_counter()
        # the last generated token's KV is never computed
        reserve = budget - 1 if params.max_tokens is not None else RESERVE_NEW_TOKENS
        logits, cache, reused = self.prefill(prompt, max(reserve, 0))
        timings.prompt_tokens, timings.cached_tokens = len(prompt), reused
        timings.prompt_ms = (time.perf_counter() - t0) * 1000
        history = list(prompt.token_ids)
        out_ids: list[int] = []
        text, emitted = "", 0  # decoded text so far, and how much of it was yielded
        decoder = tok.StreamDecoder(tok)
        finish = "length"
        mrope = self.model.cfg.is_mrope
        t_gen = time.perf_counter()
        position = prompt.next_position
        while len(out_ids) < budget:
            if constraint is not None:
                logits = constraint.mask(logits)
            token = sampler(logits, history)
            if not out_ids:
                timings.ttft_ms = (time.perf_counter() - t0) * 1000
                t_gen = time.perf_counter()
            if token in tok.eot_ids and not params.ignore_eos:
                finish = "stop"
                break
            if constraint is not None:
                constraint.accept(token)
            out_ids.append(token)
            history.append(token)
            self._cache_keys.append(token)
            text += decoder.add(token)
            cut = find_stop(text, params.stop, emitted)
            if cut != -1:
                text, finish = text[:cut], "stop"
                break
            if constraint is not None and constraint.finished:
                text, finish = text + decoder.flush(), "stop"
                break
            hold = partial_stop_len(text, params.stop)
            if len(text) - hold > emitted:
                yield Chunk(text[emitted : len(text) - hold], [token])
                emitted = len(text) - hold
            if len(out_ids) >= budget:
                break
            logits = self.decode_step(token, position, cache, mrope)
            position += 1
        else:
            finish = "length"
        timings.generated_tokens = len(out_ids)
        timings.generation_ms = (time.perf_counter() - t_gen) * 1000
        if finish == "length":
            text += decoder.flush()
        # the KV of a sampled-but-unprocessed last token is not in the cache
        self._cache_keys = self._cache_keys[: cache.length]
        result = Result(text, out_ids, len(prompt), finish, timings)
        yield Chunk(text[emitted:], [], finish, result)

    def run(self, prompt: Prompt, params: SamplingParams, timings: Timings | None = None, constraint=None) -> Result:
        last = None
        for last in self.stream(prompt, params, timings, constraint):
            pass
        return last.result
