"""Continuous batching: one thread owns the model and serves many generation requests at once.

    sched = Scheduler(model)                 # an ocula.Model
    sched.start()
    handle = sched.submit(GenerationRequest(build_prompt=lambda t: model.build_prompt(messages, t),
                                            params=SamplingParams(max_tokens=64, temperature=0)))
    for event in handle:                     # Started, Delta..., then Finished (or Failed)
        ...
    sched.stop()

How a request moves (on the scheduler thread, one loop iteration at a time; image encoding aside, step 2):

1. `submit` puts it in a bounded FIFO (`max_queue`; full → QueueFullError, the server's 503).
2. Admission: when no other sequence is being prefilled and fewer than `max_batch` are decoding, the oldest
   queued request has its prompt built (chat template, tokens), checked against the context, and gets a KV
   cache from the prefix pool. A request with images (`has_images`) has its prompt built on the image
   workers instead (`image_worker`: preprocessing and encoding through the VisionRuntime cache take
   seconds for a large image, during which the decoding sequences keep going) and is admitted, in arrival
   order with the others, once it is built. From the prefix pool, the longest common prefix with a
   finished sequence's cache (compared by `Prompt.cache_keys()`, never splitting an image) is copied, so
   only the rest is computed.
3. Prefill runs one chunk (`prefill_chunk` tokens, an image is never split) per loop iteration, so the
   decoding sequences advance between the chunks of a long prompt instead of waiting for all of it.
4. Decode: every decoding sequence feeds its last token, all in ONE forward (`TextModel.forward` with a
   list of StepInputs: projections and MLPs as one GEMM, attention per sequence over its own cache). Each
   sequence then samples with its own Sampler (seeded per request), grammar constraint, stop strings and
   budget, and emits its Delta.
5. A finished sequence's cache goes to the prefix pool (bounded in bytes, least recently used out first);
   a cancelled one (client gone) is dropped at the next iteration and its cache freed.

Ownership: a cache in the pool is never written; a sequence always decodes into its own cache (a copy of
the pooled prefix), so two live sequences never share one.

Numerics: a sequence alone (batch of 1) runs exactly the computation `Engine` does. In a batch, the GEMMs
see more rows, and BLAS may round the last bit differently for a different row count (MKL does: gemv for
one row, other kernels for 2-3 and for 4+), so logits can differ by ~1e-5 from the single-sequence ones:
greedy tokens are the same unless the top two logits are that close.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from ocula.engine.generate import PREFILL_CHUNK, Result, Timings
from ocula.engine.image_worker import Built, ImageWorker
from ocula.engine.prefix_pool import PrefixPool, copy_prefix
from ocula.engine.prompt import Prompt
from ocula.engine.request import (
    Cancelled, ContextOverflowError, Delta, Event, Failed, Finished, GenerationRequest, Handle, QueueFullError,
    SchedulerStoppedError, Started, TokenLogprob,
)
from ocula.engine.sampling import Sampler, find_stop, partial_stop_len
from ocula.errors import OculaError, RequestError
from ocula.models.layers import KVCache
from ocula.models.text.base import StepInput

__all__ = [
    "TTFT_BUCKETS", "Cancelled", "ContextOverflowError", "Delta", "Event", "Failed", "Finished", "GenerationRequest",
    "Handle", "PrefixPool", "QueueFullError", "Scheduler", "SchedulerStats", "SchedulerStoppedError", "Started",
    "TokenLogprob", "copy_prefix",
]

log = logging.getLogger("ocula.scheduler")


@dataclass
class SchedulerStats:
    requests_admitted: int = 0
    requests_finished: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    requests_rejected: int = 0  # queue full
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    decode_batch_tokens: int = 0  # sum of batch sizes over decode steps
    prefill_seconds: float = 0.0
    ttft_sum: float = 0.0  # seconds from arrival to first token
    ttft_count: int = 0
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    recent_tps: float = 0.0  # decode tokens/s over the last few seconds


TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# ---------------------------------------------------------------- sequences


class _Sequence:
    def __init__(self, handle: Handle, prompt: Prompt, cache: KVCache, reused: int, timings: Timings,
                 tokenizer, n_ctx: int):
        req = handle.request
        self.handle = handle
        self.req = req
        self.prompt = prompt
        self.cache = cache
        self.keys = prompt.cache_keys()
        self.prefilled = reused
        self.timings = timings
        self.sampler = Sampler(req.params)
        self.history = list(prompt.token_ids)
        self.out_ids: list[int] = []
        self.decoder = tokenizer.StreamDecoder(tokenizer)
        self.text = ""
        self.emitted = 0
        self.position = prompt.next_position
        max_new = req.params.max_tokens if req.params.max_tokens is not None else n_ctx
        self.budget = min(max_new, n_ctx - len(prompt))
        self.pending: int | None = None  # sampled token whose KV is not in the cache yet
        self.t_prefill = time.perf_counter()
        self.t_first: float | None = None
        self.images_encoded = self.images_cached = 0


class Scheduler:
    def __init__(self, model, *, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = PREFILL_CHUNK,
                 prefix_cache_bytes: int = 512 * 1024 * 1024, image_threads: int | None = None,
                 image_workers: int = 2):
        """`image_workers` threads build the prompts of requests with images, each computing with
        `image_threads` torch threads (default: half the caller's, at least one); the scheduler thread
        computes with the caller's `torch.get_num_threads()`."""
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or image_workers < 1 \
                or (image_threads is not None and image_threads < 1):
            raise ValueError("max_batch, prefill_chunk, image_threads and image_workers must be >= 1, "
                             "max_queue >= 0")
        self.model = model
        self.text = model.text
        self.tokenizer = model.tokenizer
        self.engine = model.engine
        self.n_ctx = model.engine.n_ctx
        self.mrope = self.text.cfg.is_mrope
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.pool = PrefixPool(prefix_cache_bytes, self.text.new_cache)
        self.stats = SchedulerStats()
        self.threads = torch.get_num_threads()
        self._pending: deque[Handle] = deque()
        self._built: deque[Built] = deque()  # prompts the image worker has built, waiting for admission
        self.images = ImageWorker(image_threads or max(1, self.threads // 2), self._on_built, image_workers)
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()  # see call()
        self._prefilling: _Sequence | None = None
        self._active: list[_Sequence] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self._tps_window: deque[tuple[float, int]] = deque()
        self.error: BaseException | None = None  # set if the loop itself died

    # ------------------------------------------------------------ control

    def start(self) -> "Scheduler":
        with self._cond:
            if self._running:
                return self
            self._running = True
        self._thread = threading.Thread(target=self._run, name="ocula-scheduler", daemon=True)
        self._thread.start()
        self.images.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        waiting = self.images.stop(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
        for h in waiting + self._drain_all():
            h._emit(Failed(SchedulerStoppedError("the server is shutting down")))
        while self._calls:
            _, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                future.set_exception(SchedulerStoppedError("the server is shutting down"))

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self._running and self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + len(self.images) + len(self._built)

    @property
    def active(self) -> int:
        return len(self._active) + (self._prefilling is not None) + self.images.busy

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the scheduler thread, between two steps, for other work that needs the model (e.g.
        embeddings); the Future gets its result or exception."""
        future: Future = Future()
        with self._cond:
            if not self.alive:
                raise SchedulerStoppedError("the scheduler is not running")
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None] | None = None) -> Handle:
        handle = Handle(request, sink)
        with self._cond:
            if not self.alive:
                raise SchedulerStoppedError("the scheduler is not running")
            waiting = self.queue_depth
            if waiting >= self.max_queue:
                self.stats.requests_rejected += 1
                raise QueueFullError(
                    f"the server is busy: {waiting} requests are waiting (queue size {self.max_queue}) "
                    f"and {self.active} are running; retry later"
                )
            if request.has_images:
                self.images.submit(handle)
            else:
                self._pending.append(handle)
                self._cond.notify_all()
        return handle

    def _on_built(self, built: Built) -> None:  # on an image worker's thread
        with self._cond:
            if self._running:
                self._built.append(built)
                self._cond.notify_all()
                return
        built.handle._emit(Failed(SchedulerStoppedError("the server is shutting down")))  # built after stop()

    # ------------------------------------------------------------ loop

    def _run(self) -> None:
        torch.set_num_threads(self.threads)  # this thread's own count (the image worker sets its own)
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while self._running and not (self._pending or self._built or self._active
                                                     or self._prefilling or self._calls):
                            self._cond.wait(0.5)
                        if not self._running:
                            return
                    try:
                        self._iteration()
                    except Exception as e:  # noqa: BLE001 - a bug or OOM: fail what is in flight, keep serving
                        log.exception("scheduler step failed")
                        for seq in self._in_flight():
                            self._fail(seq.handle, e)
                        self._active.clear()
                        self._prefilling = None
        except BaseException as e:  # pragma: no cover - the thread itself dies
            self.error = e
            log.exception("scheduler thread died")
            raise
        finally:
            self._running = False

    def _in_flight(self) -> list[_Sequence]:
        return self._active + ([self._prefilling] if self._prefilling is not None else [])

    def _drain_all(self) -> list[Handle]:
        with self._cond:
            handles = list(self._pending) + [b.handle for b in self._built]
            self._pending.clear()
            self._built.clear()
        handles += [s.handle for s in self._in_flight()]
        self._active, self._prefilling = [], None
        return [h for h in handles if not h.done]

    def _iteration(self) -> None:
        self._reap_cancelled()
        if self._calls:  # one per step, so that decoding sequences keep moving
            fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as e:  # noqa: BLE001 - the caller gets it
                    future.set_exception(e)
        if self._prefilling is None and len(self._active) < self.max_batch:
            self._admit_next()
        if self._prefilling is not None:
            self._prefill_chunk(self._prefilling)
        if self._active:
            self._decode_step()

    def _reap_cancelled(self) -> None:
        with self._cond:
            gone = [h for h in self._pending if h.cancelled]
            for h in gone:
                self._pending.remove(h)
            for b in [b for b in self._built if b.handle.cancelled]:
                self._built.remove(b)
                gone.append(b.handle)
        for h in gone:
            self.stats.requests_cancelled += 1
            h._emit(Failed(Cancelled("cancelled")))
        if self._prefilling is not None and self._prefilling.handle.cancelled:
            self._drop(self._prefilling)
            self._prefilling = None
        for seq in [s for s in self._active if s.handle.cancelled]:
            self._active.remove(seq)
            self._drop(seq)

    def _drop(self, seq: _Sequence) -> None:
        self.stats.requests_cancelled += 1
        seq.cache = None  # freed: a cancelled sequence's cache does not go to the pool
        seq.handle._emit(Failed(Cancelled("cancelled")))

    def _fail(self, handle: Handle, error: BaseException) -> None:
        self.stats.requests_failed += 1
        handle._emit(Failed(error))

    # ------------------------------------------------------------ admission and prefill

    def _admit_next(self) -> None:
        """Admit the request that arrived first among those queued and those the image worker has built."""
        with self._cond:
            built = handle = None
            if self._built and (not self._pending
                                or self._built[0].handle.request.arrival <= self._pending[0].request.arrival):
                built = self._built.popleft()
            elif self._pending:
                handle = self._pending.popleft()
        if built is not None:
            self._admit(built.handle, built.timings, built.prompt, built.error, built.build_ms)
        elif handle is not None:
            timings = Timings()
            t0 = time.perf_counter()
            prompt, error = None, None
            try:
                prompt = handle.request.build_prompt(timings)
            except Exception as e:  # noqa: BLE001 - reported by _admit, for this request only
                error = e
            self._admit(handle, timings, prompt, error, (time.perf_counter() - t0) * 1000)

    def _admit(self, handle: Handle, timings: Timings, prompt: Prompt | None, error: BaseException | None,
               build_ms: float) -> None:
        req = handle.request
        if handle.cancelled:
            self.stats.requests_cancelled += 1
            handle._emit(Failed(Cancelled("cancelled")))
            return
        try:
            if error is not None:
                raise error
            if len(prompt) == 0:
                raise RequestError("the prompt is empty")
            if len(prompt) >= self.n_ctx:
                raise ContextOverflowError(
                    f"the prompt has {len(prompt)} tokens but the context holds {self.n_ctx} (at least one token "
                    "must be left for the answer); shorten the conversation, send fewer or smaller images, "
                    "or start the server with a larger --ctx-size"
                )
            mt = req.params.max_tokens
            if req.max_tokens_explicit and mt is not None and len(prompt) + mt > self.n_ctx:
                raise ContextOverflowError(
                    f"the prompt has {len(prompt)} tokens and max_tokens asks for {mt} more, {len(prompt) + mt} "
                    f"in all, but the context holds {self.n_ctx}; lower max_tokens to at most "
                    f"{self.n_ctx - len(prompt)} or shorten the prompt"
                )
            cache, reused = self.pool.claim(prompt)
            seq = _Sequence(handle, prompt, cache, reused, timings, self.tokenizer, self.n_ctx)
        except OculaError as e:
            self._fail(handle, e)
            return
        except Exception as e:  # noqa: BLE001 - a bug while building: this request only
            log.error("admitting a request failed", exc_info=e)
            self._fail(handle, e)
            return
        seq.images_encoded, seq.images_cached = timings.images_encoded, timings.images_cached
        timings.prompt_tokens, timings.cached_tokens = len(prompt), reused
        st = self.stats
        st.requests_admitted += 1
        st.prompt_tokens += len(prompt)
        st.cached_prompt_tokens += reused
        self._prefilling = seq
        # queue time: waiting only; building the prompt (encoding its images) is work, reported as image_encode_ms
        queue_ms = max(0.0, (seq.t_prefill - req.arrival) * 1000 - build_ms)
        handle._emit(Started(len(prompt), reused, timings.image_tokens, seq.images_encoded, seq.images_cached,
                             queue_ms))

    def _prefill_chunk(self, seq: _Sequence) -> None:
        prompt = seq.prompt
        start = seq.prefilled
        stop = prompt.safe_cut(min(start + self.prefill_chunk, len(prompt)))
        if stop <= start:  # an image longer than one chunk goes in whole
            stop = next(img.stop for img in prompt.images if img.start == start)
        t0 = time.perf_counter()
        x, deepstack = self.engine._embed(prompt, start, stop)
        step = StepInput(prompt.positions[..., start:stop], seq.cache, prompt.groups(start, stop), deepstack)
        hidden = self.text(x[None], step)[0, -1]
        seq.prefilled = stop
        self.stats.prefilled_tokens += stop - start
        self.stats.prefill_seconds += time.perf_counter() - t0
        if stop < len(prompt):
            return
        self._prefilling = None
        if seq.req.share_prompt:  # siblings sampling the same prompt start from this prefill
            self.pool.put(list(seq.keys), copy_prefix(seq.cache, len(prompt), self.text.new_cache))
        logits = self.text.logits(hidden)
        seq.timings.prompt_ms = (time.perf_counter() - seq.t_prefill) * 1000
        if seq.budget <= 0:
            self._finish(seq, "length")
            return
        try:
            keep = self._after_logits(seq, logits)
        except Exception as e:  # noqa: BLE001 - e.g. a grammar error: this sequence only
            if not isinstance(e, OculaError):
                log.exception("sampling failed")
            self._fail(seq.handle, e)
            return
        if keep:
            self._active.append(seq)

    # ------------------------------------------------------------ decode

    def _position(self, p: int) -> torch.Tensor:
        pos = torch.tensor([p])
        return pos.expand(3, 1) if self.mrope else pos

    def _decode_step(self) -> None:
        seqs = list(self._active)
        t0 = time.perf_counter()
        x = self.text.embed(torch.tensor([[s.pending] for s in seqs]))
        steps = [StepInput(self._position(s.position), s.cache) for s in seqs]
        hidden = self.text(x, steps if len(steps) > 1 else steps[0])
        logits = self.text.logits(hidden[:, -1])
        dt = time.perf_counter() - t0
        st = self.stats
        st.decode_steps += 1
        st.decode_seconds += dt
        st.decode_batch_tokens += len(seqs)
        self._note_tps(len(seqs))
        for s, lg in zip(seqs, logits):
            s.keys.append(s.pending)
            s.position += 1
            s.pending = None
            try:
                keep = self._after_logits(s, lg)
            except Exception as e:  # noqa: BLE001 - e.g. a grammar error: this sequence only
                if not isinstance(e, OculaError):
                    log.exception("sampling failed")
                self._active.remove(s)
                self._fail(s.handle, e)
                continue
            if not keep:
                self._active.remove(s)

    def _note_tps(self, n: int) -> None:
        now = time.perf_counter()
        w = self._tps_window
        w.append((now, n))
        while w and now - w[0][0] > 5.0:
            w.popleft()
        span = now - w[0][0]
        total = sum(k for _, k in w)
        self.stats.recent_tps = total / span if span > 0.05 else 0.0

    # ------------------------------------------------------------ one sampled token

    def _after_logits(self, seq: _Sequence, logits: torch.Tensor) -> bool:
        """Sample, record, emit. True while the sequence goes on decoding."""
        req = seq.req
        raw = logits
        if req.logit_bias:
            logits = logits.clone()
            ids = torch.tensor(list(req.logit_bias), dtype=torch.long)
            logits[ids] += torch.tensor(list(req.logit_bias.values()), dtype=logits.dtype)
        if req.constraint is not None:
            logits = req.constraint.mask(logits)
        token = seq.sampler(logits, seq.history)
        now = time.perf_counter()
        if seq.t_first is None:
            seq.t_first = now
            seq.timings.ttft_ms = (now - seq.t_prefill) * 1000
            ttft = now - req.arrival
            st = self.stats
            st.ttft_sum += ttft
            st.ttft_count += 1
            for i, b in enumerate(TTFT_BUCKETS):
                if ttft <= b:
                    st.ttft_buckets[i] += 1
        if token in self.tokenizer.eot_ids and not req.params.ignore_eos:
            self._finish(seq, "stop")
            return False
        if req.constraint is not None:
            req.constraint.accept(token)
        lp = None
        if req.logprobs is not None:
            lp = [self._sampled_prob(seq.sampler, logits, seq.history, token, req.logprobs)
                  if req.post_sampling_probs else self._logprob(raw, token, req.logprobs)]
        seq.out_ids.append(token)
        seq.history.append(token)
        self.stats.generated_tokens += 1
        seq.text += seq.decoder.add(token)
        stops = req.params.stop
        cut = find_stop(seq.text, stops, seq.emitted)
        if cut != -1:
            seq.text = seq.text[:cut]
            seq.handle._emit(Delta("", [token], lp))
            self._finish(seq, "stop")
            return False
        hold = partial_stop_len(seq.text, stops)
        end = max(seq.emitted, len(seq.text) - hold)
        seq.handle._emit(Delta(seq.text[seq.emitted : end], [token], lp))
        seq.emitted = end
        if req.constraint is not None and req.constraint.finished:
            self._finish(seq, "stop")
            return False
        if len(seq.out_ids) >= seq.budget:
            self._finish(seq, "length")
            return False
        seq.pending = token
        return True

    @staticmethod
    def _logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
        lsm = torch.log_softmax(logits.float(), -1)
        top = []
        if k > 0:
            vals, ids = torch.topk(lsm, min(k, lsm.shape[-1]))
            top = [(int(i), float(v)) for i, v in zip(ids, vals)]
        return TokenLogprob(int(token), float(lsm[token]), top)

    @staticmethod
    def _sampled_prob(sampler: Sampler, logits: torch.Tensor, history: list[int], token: int, k: int) -> TokenLogprob:
        """The chosen token's and the top k's log-probabilities in the distribution the token was drawn from
        (after bias, grammar, penalties, top-k/top-p/min-p and temperature; greedy: all mass on the argmax)."""
        scores = sampler.apply_penalties(logits, history).float().cpu()
        if sampler.params.greedy:
            probs = torch.zeros(logits.shape[-1])
            probs[token] = 1.0
        else:
            probs = sampler.probabilities(scores.to(logits.device)).float().cpu()
        lps = torch.log(probs)
        top = []
        if k > 0:
            vals, ids = torch.topk(lps, min(k, lps.shape[-1]))
            # tokens the samplers ruled out (probability 0) are no alternatives: fewer than k is the true answer
            top = [(int(i), float(v)) for i, v in zip(ids, vals) if v > float("-inf")]
        return TokenLogprob(int(token), float(lps[token]), top)

    def _finish(self, seq: _Sequence, reason: str) -> None:
        if reason == "length" or (seq.req.constraint is not None and reason == "stop"):
            seq.text += seq.decoder.flush()
        t = seq.timings
        t.generated_tokens = len(seq.out_ids)
        if seq.t_first is not None:
            t.generation_ms = (time.perf_counter() - seq.t_first) * 1000
        result = Result(seq.text, list(seq.out_ids), len(seq.prompt), reason, t)
        tail = seq.text[seq.emitted :] if len(seq.text) > seq.emitted else ""
        self.stats.requests_finished += 1
        cache, keys = seq.cache, seq.keys
        seq.cache = None
        if cache is not None:
            self.pool.put(keys, cache)
        seq.handle._emit(Finished(result, tail, seq.images_encoded, seq.images_cached))
