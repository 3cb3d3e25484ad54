"""Finished sequences' KV caches kept for reuse: a new prompt starts from the longest common prefix."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from ocula.engine.prompt import Prompt
from ocula.models.layers import KVCache


def _common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def copy_prefix(src: KVCache, n: int, new_cache: Callable[[], KVCache]) -> KVCache:
    """A new cache holding the first n tokens of `src` (src is not touched)."""
    dst = new_cache()
    for layer, (k, v) in enumerate(zip(src.k, src.v)):
        if k is not None and n:
            dst.update(layer, k[:, :, :n], v[:, :, :n])
    dst.advance(n)
    return dst


@dataclass
class _PoolEntry:
    keys: list
    cache: KVCache
    nbytes: int


class PrefixPool:
    """Finished sequences' KV caches, keyed by their per-token identities, bounded in bytes (LRU).

    `claim(prompt)` copies the longest reusable prefix into a fresh cache (copy-on-reuse: pooled caches are
    read-only, so any number of live sequences may start from the same entry). A new entry replaces
    entries whose keys are a prefix of its own (a second turn supersedes the first).
    """

    def __init__(self, max_bytes: int, new_cache: Callable[[], KVCache]):
        self.max_bytes = max_bytes
        self.new_cache = new_cache
        self._entries: OrderedDict[int, _PoolEntry] = OrderedDict()
        self._next = 0
        self.bytes = 0
        self.hits = self.misses = self.hit_tokens = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, prompt: Prompt) -> tuple[KVCache, int]:
        keys = prompt.cache_keys()
        with self._lock:
            best_id, best_n = None, 0
            for eid, e in self._entries.items():
                n = _common_prefix(e.keys, keys)
                if n > best_n:
                    best_id, best_n = eid, n
            n = prompt.safe_cut(min(best_n, len(prompt) - 1))
            if best_id is None or n <= 0:
                self.misses += 1
                return self.new_cache(), 0
            entry = self._entries[best_id]
            self._entries.move_to_end(best_id)
            self.hits += 1
            self.hit_tokens += n
        return copy_prefix(entry.cache, n, self.new_cache), n

    def put(self, keys: list, cache: KVCache) -> None:
        keys = keys[: cache.length]
        if not keys or self.max_bytes <= 0:
            return
        size = cache.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            for eid, e in list(self._entries.items()):
                if len(e.keys) >= len(keys) and e.keys[: len(keys)] == keys:
                    self._entries.move_to_end(eid)  # an entry already covers this one
                    return
                if len(e.keys) < len(keys) and keys[: len(e.keys)] == e.keys:
                    del self._entries[eid]
                    self.bytes -= e.nbytes
            self._entries[self._next] = _PoolEntry(keys, cache, size)
            self._next += 1
            self.bytes += size
            while self.bytes > self.max_bytes and self._entries:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0
