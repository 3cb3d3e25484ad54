"""Prometheus text exposition (format 0.0.4) of the server's counters, without a client library."""
from __future__ import annotations

import threading
from collections import defaultdict

from ocula.engine.scheduler import TTFT_BUCKETS

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, status) -> count
        self.latency_sum = 0.0
        self.latency_count = 0
        self.latency_buckets = [0] * len(LATENCY_BUCKETS)
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.disconnects = 0

    def request_done(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if seconds is not None and status == 200:
                self.latency_sum += seconds
                self.latency_count += 1
                for i, b in enumerate(LATENCY_BUCKETS):
                    if seconds <= b:
                        self.latency_buckets[i] += 1

    def tokens(self, prompt: int, completion: int, cached: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.cached_tokens += cached

    def render(self, scheduler, model) -> str:
        st = scheduler.stats
        pool = scheduler.pool
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {_num(value)}")

        def histogram(name: str, help_: str, buckets, counts, total, count):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} histogram")
            for b, c in zip(buckets, counts):
                lines.append(f'{name}_bucket{{le="{b}"}} {c}')
            lines.append(f'{name}_bucket{{le="+Inf"}} {count}')
            lines.append(f"{name}_sum {_num(total)}")
            lines.append(f"{name}_count {count}")

        with self._lock:
            reqs = sorted(self.requests.items())
            metric("ocula_requests_total", "counter", "HTTP requests by endpoint and status code.",
                   [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in reqs] or [('{endpoint="",status=""}', 0)])
            metric("ocula_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                   [("", self.prompt_tokens)])
            metric("ocula_completion_tokens_total", "counter", "Generated tokens of finished requests.",
                   [("", self.completion_tokens)])
            metric("ocula_prompt_tokens_cached_total", "counter",
                   "Prompt tokens of finished requests whose KV came from the prefix cache.", [("", self.cached_tokens)])
            metric("ocula_client_disconnects_total", "counter", "Requests whose client went away before the end.",
                   [("", self.disconnects)])
            histogram("ocula_request_duration_seconds", "End-to-end time of successful generation requests.",
                      LATENCY_BUCKETS, _cumulative(self.latency_buckets), self.latency_sum, self.latency_count)
        histogram("ocula_time_to_first_token_seconds", "From arrival (queue wait included) to the first token.",
                  TTFT_BUCKETS, st.ttft_buckets, st.ttft_sum, st.ttft_count)
        metric("ocula_tokens_generated_total", "counter", "Tokens sampled by the scheduler.", [("", st.generated_tokens)])
        metric("ocula_tokens_prefilled_total", "counter", "Prompt tokens computed (not taken from the prefix cache).",
               [("", st.prefilled_tokens)])
        metric("ocula_decode_tokens_per_second", "gauge", "Decode throughput over the last 5 seconds, all sequences.",
               [("", st.recent_tps)])
        metric("ocula_decode_steps_total", "counter", "Batched decode forwards.", [("", st.decode_steps)])
        metric("ocula_decode_seconds_total", "counter", "Time spent in decode forwards and sampling.",
               [("", st.decode_seconds)])
        metric("ocula_decode_batch_size_mean", "gauge", "Mean number of sequences per decode forward.",
               [("", st.decode_batch_tokens / st.decode_steps if st.decode_steps else 0.0)])
        metric("ocula_prefill_seconds_total", "counter", "Time spent in prefill forwards.", [("", st.prefill_seconds)])
        metric("ocula_queue_depth", "gauge", "Requests waiting for admission.", [("", scheduler.queue_depth)])
        metric("ocula_active_sequences", "gauge", "Sequences being prefilled or decoded.", [("", scheduler.active)])
        metric("ocula_image_workers_busy", "gauge", "Image workers encoding a request's images now.",
               [("", scheduler.images.busy)])
        metric("ocula_scheduler_requests_total", "counter", "Scheduler outcomes.",
               [('{outcome="admitted"}', st.requests_admitted), ('{outcome="finished"}', st.requests_finished),
                ('{outcome="failed"}', st.requests_failed), ('{outcome="cancelled"}', st.requests_cancelled),
                ('{outcome="rejected_queue_full"}', st.requests_rejected)])
        metric("ocula_prefix_cache_hits_total", "counter", "Admissions that reused a cached prompt prefix.",
               [("", pool.hits)])
        metric("ocula_prefix_cache_misses_total", "counter", "Admissions that found no reusable prefix.",
               [("", pool.misses)])
        metric("ocula_prefix_cache_hit_tokens_total", "counter", "Prompt tokens taken from the prefix cache.",
               [("", pool.hit_tokens)])
        metric("ocula_prefix_cache_bytes", "gauge", "Bytes held by the prefix cache pool.", [("", pool.bytes)])
        metric("ocula_prefix_cache_entries", "gauge", "Sequences held by the prefix cache pool.", [("", len(pool))])
        vision = getattr(model, "vision", None)
        if vision is not None:
            c = vision.cache
            metric("ocula_image_cache_hits_total", "counter", "Images whose embeddings came from the cache.",
                   [("", c.hits)])
            metric("ocula_image_cache_misses_total", "counter", "Images that had to be encoded.", [("", c.misses)])
            metric("ocula_image_cache_bytes", "gauge", "Bytes of cached image embeddings.", [("", c._bytes)])
        return "\n".join(lines) + "\n"


def _cumulative(counts: list[int]) -> list[int]:
    return list(counts)  # already cumulative: each request is counted in every bucket >= its value


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return repr(float(v))
