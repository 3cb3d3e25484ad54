"""A request's image parts → PIL images, off the event loop, without one request's slow URL holding up another's.

http(s) URLs are fetched on a pool of their own, at most `max_fetches` at once (each fetch ends at the media
policy's total deadline); waiting for a free fetch slot counts against that same deadline. Everything else
(data URIs, base64, local files) and the decoding of fetched bytes runs in the server's ordinary thread pool,
which therefore never has its threads parked on a network peer: 45 dripping URLs used to occupy them all and
delay an unrelated data-URI image by 75 s.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from starlette.concurrency import run_in_threadpool

from ocula.media import MediaPolicy, load_image
from ocula.media.decode import decode_bytes
from ocula.media.policy import fail, short
from ocula.media.url_fetch import fetch_url


def is_http_url(source) -> bool:
    if not isinstance(source, str):
        return False
    head = source.lstrip()[:8].lower()
    return head.startswith("http://") or head.startswith("https://")


class MediaLoader:
    def __init__(self, policy: MediaPolicy, max_fetches: int):
        if max_fetches < 1:
            raise ValueError("max_fetches must be >= 1")
        self.policy = policy
        self.max_fetches = max_fetches
        self._pool = ThreadPoolExecutor(max_fetches, thread_name_prefix="ocula-fetch")
        self._slots: asyncio.Semaphore | None = None  # made on the event loop, at the first fetch
        self.active = 0  # fetches running now

    async def load(self, source) -> Image.Image:
        """The image of one part's source (URL, data URI, base64, path); MediaError when it cannot be had."""
        if not is_http_url(source):
            return await run_in_threadpool(load_image, source, self.policy)
        data, final_url = await self.fetch(source.strip())
        return await run_in_threadpool(decode_bytes, data, self.policy, "URL", short(final_url))

    async def fetch(self, url: str, policy: MediaPolicy | None = None) -> tuple[bytes, str]:
        """The body of `url` under `policy` (default: the loader's; video passes its own byte cap)."""
        policy = policy or self.policy
        if not policy.allow_urls:  # refused at once, without waiting for a slot
            raise fail("URL", f"URLs are not allowed by the media policy: {short(url)}")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_fetches)
        budget = policy.url_timeout
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(self._slots.acquire(), budget)
        except asyncio.TimeoutError:
            raise fail("URL", f"timed out after {budget:g} s waiting for a fetch slot (all {self.max_fetches} "
                              f"concurrent image fetches are busy): {short(url)}") from None
        self.active += 1
        try:
            left = budget - (time.monotonic() - t0)
            if left <= 0:
                raise fail("URL", f"timed out after {budget:g} s waiting for a fetch slot: {short(url)}")
            # the deadline is the request's: time spent waiting for the slot is taken off the fetch's own
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, fetch_url, url, policy, left)
        finally:
            self.active -= 1
            self._slots.release()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
