"""A generation request submitted to the Scheduler, the events it produces, and the submitter's Handle."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ocula.engine.generate import Result, Timings
from ocula.engine.prompt import Prompt
from ocula.engine.sampling import SamplingParams
from ocula.errors import OculaError, RequestError


class QueueFullError(OculaError):
    """The scheduler's waiting queue is full (the server answers 503)."""


class ContextOverflowError(RequestError):
    """The prompt (plus the requested completion) does not fit in the context."""


class SchedulerStoppedError(OculaError):
    """The scheduler is not running."""


class Cancelled(OculaError):
    """The request was cancelled before it finished."""


@dataclass
class GenerationRequest:
    build_prompt: Callable[[Timings], Prompt]  # runs on the scheduler thread (owns the model)
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens_explicit: bool = False  # True: prompt + max_tokens > context is an error, not a cut
    constraint: object | None = None  # ocula.engine.structured.Constraint
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    logit_bias: dict[int, float] | None = None
    share_prompt: bool = False  # keep a copy of the prefilled prompt's KV in the prefix pool (n > 1 samples)
    post_sampling_probs: bool = False  # logprobs of the distribution sampled from, not of the raw logits
    arrival: float = field(default_factory=time.perf_counter)
    # the prompt has images to preprocess and encode: built on the scheduler's image worker thread, so that
    # the other sequences go on decoding meanwhile (False: built on the scheduler thread, e.g. text)
    has_images: bool = False


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class Started:
    prompt_tokens: int
    cached_tokens: int
    image_tokens: int
    images_encoded: int
    images_cached: int
    queue_ms: float


@dataclass
class Delta:
    text: str  # may be "" (an incomplete UTF-8 character, or text held back that may start a stop string)
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Finished:
    result: Result
    tail: str  # text not yet sent in a Delta
    images_encoded: int = 0
    images_cached: int = 0


@dataclass
class Failed:
    error: BaseException


Event = Started | Delta | Finished | Failed


class Handle:
    """The submitter's side of a request: events arrive through `sink` (default: an internal queue that
    iterating the handle reads), and `cancel()` asks the scheduler to drop the request."""

    def __init__(self, request: GenerationRequest, sink: Callable[[Event], None] | None = None):
        self.request = request
        self._cancel = threading.Event()
        self._queue: queue.SimpleQueue | None = None
        if sink is None:
            self._queue = queue.SimpleQueue()
            sink = self._queue.put
        self._sink = sink
        self.done = False

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _emit(self, event: Event) -> None:
        if isinstance(event, (Finished, Failed)):
            self.done = True
        try:
            self._sink(event)
        except Exception:  # noqa: BLE001 - the consumer (e.g. a closed event loop) is gone
            self._cancel.set()

    def __iter__(self) -> Iterator[Event]:
        if self._queue is None:
            raise TypeError("this handle delivers its events to a sink; it cannot be iterated")
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    def result(self) -> Result:
        """Wait for the end; the Result, or the error raised."""
        for event in self:
            if isinstance(event, Finished):
                return event.result
            if isinstance(event, Failed):
                raise event.error
        raise SchedulerStoppedError("the scheduler stopped")
