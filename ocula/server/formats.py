"""OpenAI response bodies and stream chunks of the chat and completions routes, built from the scheduler's
events (Started, Delta, Finished); the wrappers in chat_tools and choices keep one of these as `base`."""
from __future__ import annotations

from ocula.engine.scheduler import Delta, Finished, Started
from ocula.server import protocol as P
from ocula.server.native_completion import llama_timings

class ChatFormat:
    def __init__(self, model_id: str, tokenizer, logprobs: bool):
        self.id, self.created, self.model = P.new_id("chatcmpl"), P.now(), model_id
        self.tokenizer, self.logprobs = tokenizer, logprobs

    def _chunk(self, delta: dict, finish=None, logprobs=None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": P.SYSTEM_FINGERPRINT, "choices": [choice]}

    def _lp(self, items) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": P.chat_logprobs(self.tokenizer, items or []), "refusal": None}

    def start(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": None})]

    def delta(self, ev: Delta) -> dict | None:
        if not ev.text and not (self.logprobs and ev.logprobs):
            return None
        return self._chunk({"content": ev.text}, None, self._lp(ev.logprobs))

    def finish(self, first: Started, ev: Finished, include_usage: bool) -> list[dict]:
        out = []
        if ev.tail:  # text held back earlier; its tokens' logprobs went out already (an empty list here)
            out.append(self._chunk({"content": ev.tail}, None, self._lp([])))
        out.append(self._chunk({}, ev.result.finish_reason))
        if include_usage:
            out.append({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "system_fingerprint": P.SYSTEM_FINGERPRINT, "choices": [],
                        "usage": _usage(first, ev), "timings": _timings(first, ev)})
        return out

    def full(self, first: Started, deltas: list[Delta], ev: Finished) -> dict:
        r = ev.result
        lp = None
        if self.logprobs:
            lp = self._lp(_logprobs(deltas))
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "system_fingerprint": P.SYSTEM_FINGERPRINT,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text, "refusal": None},
                         "logprobs": lp, "finish_reason": r.finish_reason}],
            "usage": _usage(first, ev),
            "timings": _timings(first, ev),
        }


class CompletionFormat:
    def __init__(self, model_id: str, tokenizer, logprobs: bool, echo: str):
        self.id, self.created, self.model = P.new_id("cmpl"), P.now(), model_id
        self.tokenizer, self.logprobs, self.echo = tokenizer, logprobs, echo
        self.offset = len(echo)

    def _chunk(self, text: str, finish=None, logprobs=None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": P.SYSTEM_FINGERPRINT,
                "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]}

    def start(self) -> list[dict]:
        return [self._chunk(self.echo)] if self.echo else []

    def delta(self, ev: Delta) -> dict | None:
        if not ev.text and not (self.logprobs and ev.logprobs):
            return None
        lp = None
        if self.logprobs:
            lp, self.offset = P.completion_logprobs(self.tokenizer, ev.logprobs or [], self.offset)
        return self._chunk(ev.text, None, lp)

    def finish(self, first: Started, ev: Finished, include_usage: bool) -> list[dict]:
        r = ev.result
        out = [self._chunk(ev.tail, r.finish_reason)]
        if include_usage:
            c = self._chunk("")
            c["choices"] = []
            c["usage"] = _usage(first, ev)
            c["timings"] = _timings(first, ev)
            out.append(c)
        return out

    def full(self, first: Started, deltas: list[Delta], ev: Finished) -> dict:
        r = ev.result
        lp = None
        if self.logprobs:
            lp, _ = P.completion_logprobs(self.tokenizer, _logprobs(deltas), len(self.echo))
        body = self._chunk(self.echo + r.text, r.finish_reason, lp)
        body["usage"] = _usage(first, ev)
        body["timings"] = _timings(first, ev)
        return body


def _usage(first: Started, ev: Finished) -> dict:
    return P.usage(ev.result.prompt_tokens, ev.result.completion_tokens, first.cached_tokens)


def _logprobs(deltas: list[Delta]) -> list:
    return [item for d in deltas for item in (d.logprobs or [])]


def _timings(first: Started, ev: Finished) -> dict:
    t = ev.result.timings
    return {
        **llama_timings(first, ev.result),  # llama-server's keys (prompt_n, predicted_per_second, ...)
        "queue_ms": round(first.queue_ms, 2), "prompt_ms": round(t.prompt_ms, 2), "ttft_ms": round(t.ttft_ms, 2),
        "generation_ms": round(t.generation_ms, 2), "generation_tps": round(t.generation_tps, 2),
        "cached_tokens": first.cached_tokens, "image_tokens": first.image_tokens,
        "image_ms": round(t.image_encode_ms, 2),
        "images_encoded": first.images_encoded, "images_cached": first.images_cached,
    }
