"""The scheduler's image workers: build the prompts of requests that carry images on threads of their own.

Building such a prompt preprocesses and encodes its images, which takes seconds to minutes for a large one
(a 7000x7000 PNG: 16,384 tokens, ~110 s). On the scheduler thread that stopped every other sequence for as
long; here the scheduler thread goes on decoding meanwhile and admits the request once its prompt is built.
With two workers (the default), a small image is not stuck behind a large one either: it takes the other.

Cores: torch's intra-op thread count is per thread (OpenMP's is a per-thread setting, and ocula's C kernels
ask `torch.get_num_threads()` on the calling thread), so each worker sets its own count (`threads`) and
leaves the scheduler thread's alone. They compute beside the scheduler thread only while images encode;
the Python parts take turns on the GIL, the kernels (torch ops, ocula's C calls through ctypes) run
without it.
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
    def __init__(self, threads: int, deliver: Callable[[Built], None], workers: int = 2):
        if threads < 1 or workers < 1:
            raise ValueError("image workers: at least one, with at least one thread each")
        self.threads, self.workers = threads, workers
        self._deliver = deliver
        self._queue: deque[Handle] = deque()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._running = False
        self.busy = 0  # prompts being built now

    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
        self._threads = [threading.Thread(target=self._run, name=f"ocula-image-worker-{i}", daemon=True)
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> list[Handle]:
        """Stop after the prompts being built (if any); the requests still waiting, never started."""
        with self._cond:
            self._running = False
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        end = time.monotonic() + timeout
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, end - time.monotonic()))
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
                    self.busy += 1
                try:
                    self._deliver(self._build(handle))
                finally:
                    with self._cond:
                        self.busy -= 1

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
