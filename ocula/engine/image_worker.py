"""The scheduler's image worker: builds the prompts of requests that carry images on a thread of its own.

Building such a prompt preprocesses and encodes its images, which takes seconds to minutes for a large one
(a 7000x7000 PNG: 16,384 tokens, ~110 s). On the scheduler thread that stopped every other sequence for as
long; here the scheduler thread goes on decoding meanwhile and admits the request once its prompt is built.

Cores: torch's intra-op thread count is per thread (OpenMP's is a per-thread setting, and ocula's C kernels
ask `torch.get_num_threads()` on the calling thread), so the worker sets its own count (`threads`) and
leaves the scheduler thread's alone. Both compute at once only while an image encodes; the Python parts of
the two take turns on the GIL, the kernels (torch ops, ocula's C calls through ctypes) run without it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from ocula.engine.generate import Timings
from ocula.engine.prompt import Prompt
from ocula.engine.request import Handle

log = logging.getLogger("ocula.scheduler")


@dataclass
class Built:
    """A request whose prompt the worker has built, or failed to build (`error`)."""

    handle: Handle
    timings: Timings
    prompt: Prompt | None
    error: BaseException | None
    build_ms: float  # spent building (image loading, preprocessing, encoding, tokenizing): not queue time


class ImageWorker:
    def __init__(self, threads: int, deliver: Callable[[Built], None]):
        if threads < 1:
            raise ValueError("the image worker needs at least one thread")
        self.threads = threads
        self._deliver = deliver
        self._queue: deque[Handle] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.busy = False  # building a prompt now

    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._run, name="ocula-image-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> list[Handle]:
        """Stop after the prompt being built (if any); the requests still waiting, never started."""
        with self._cond:
            self._running = False
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return waiting

    def submit(self, handle: Handle) -> None:
        with self._cond:
            self._queue.append(handle)
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._queue)

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while self._running and not self._queue:
                        self._cond.wait(0.5)
                    if not self._running:
                        return
                    handle = self._queue.popleft()
                    self.busy = True
                try:
                    self._deliver(self._build(handle))
                finally:
                    self.busy = False

    @staticmethod
    def _build(handle: Handle) -> Built:
        timings = Timings()
        if handle.cancelled:  # the client left while waiting: the scheduler reports it
            return Built(handle, timings, None, None, 0.0)
        t0 = time.perf_counter()
        prompt, error = None, None
        try:
            prompt = handle.request.build_prompt(timings)
        except Exception as e:  # noqa: BLE001 - bad input or a bug: this request only
            error = e
        return Built(handle, timings, prompt, error, (time.perf_counter() - t0) * 1000)
