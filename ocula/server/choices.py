"""Several generations answered as one response: OpenAI's `n` > 1 (independent samples of one prompt) and
llama-server's multi-prompt `/completion`.

Every generation is its own scheduler request. Samples of one prompt share its prefill: the first asks the
scheduler to keep a copy of its prompt's KV cache in the prefix pool (`GenerationRequest.share_prompt`), and
the others, admitted after that prefill, start from it and compute only the prompt's last token. Choice i
samples with seed `seed + i` when the request gives a seed, with fresh randomness otherwise; a grammar
constraint is forked so that every choice has its own state.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from ocula.engine.scheduler import (
    Delta, Failed, Finished, GenerationRequest, QueueFullError, SchedulerStoppedError, Started,
)
from ocula.server import protocol as P
from ocula.server.errors import APIError, to_api_error

MAX_CHOICES = 16


def fork_constraint(constraint):
    """A copy of a grammar constraint with its own matcher state (llguidance's deep_copy)."""
    if constraint is None:
        return None
    twin = copy.copy(constraint)
    twin.matcher = constraint.matcher.deep_copy()
    if hasattr(constraint, "_bits"):
        twin._bits = constraint._bits.clone()
    return twin


def fork_format(fmt):
    """A response format for another choice: the same id and tokenizer, its own state (logprob offsets; a
    tool/reasoning parser wrapped around a ChatFormat gets a fresh parser)."""
    if hasattr(fmt, "base") and hasattr(fmt, "plan"):  # chat_tools.ParsedChatFormat(base, plan)
        return type(fmt)(fork_format(fmt.base), fmt.plan)
    return copy.copy(fmt)


def innermost(fmt):
    """The ChatFormat / CompletionFormat inside any wrappers (which keep it as `base`)."""
    while hasattr(fmt, "base"):
        fmt = fmt.base
    return fmt


def sample_requests(greq: GenerationRequest, n: int) -> list[GenerationRequest]:
    """n requests for n independent samples of greq's prompt; the first shares its prefill with the rest."""
    if n > MAX_CHOICES:
        raise APIError(400, f"n: at most {MAX_CHOICES} choices per request, got {n}", param="n", code="invalid_value")
    out = []
    seed = greq.params.seed
    for i in range(n):
        params = greq.params
        if seed is not None and i:
            params = dataclasses.replace(params, seed=(seed + i) % 2**64)
        constraint = greq.constraint if i == 0 else fork_constraint(greq.constraint)
        out.append(dataclasses.replace(greq, params=params, constraint=constraint, share_prompt=i == 0))
    return out


class HandleGroup:
    """Cancel / done over the handles of one response (what ClientWatch and EventStream use)."""

    def __init__(self, handles):
        self.handles = handles

    @property
    def done(self) -> bool:
        return all(h.done for h in self.handles)

    def cancel(self) -> None:
        for h in self.handles:
            if not h.done:
                h.cancel()


@dataclasses.dataclass
class Outcome:
    first: Started
    deltas: list[Delta]
    finished: Finished


async def submit_all(sched, greqs: list[GenerationRequest]) -> tuple[HandleGroup, asyncio.Queue]:
    """Submit every request; events arrive on the queue as (index, event)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    handles = []
    try:
        for i, g in enumerate(greqs):
            handles.append(sched.submit(g, lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev))))
    except (QueueFullError, SchedulerStoppedError) as e:
        HandleGroup(handles).cancel()
        raise to_api_error(e) from None
    return HandleGroup(handles), events


async def wait_started(request: Request, group: HandleGroup, events: asyncio.Queue, n: int):
    """Wait until every generation started (or one failed: then all are cancelled and its error raised).
    Returns (Started per index, events that came meanwhile) or None when the client left."""
    from ocula.server.app import ClientWatch

    watch = ClientWatch(events, request, group)
    started: list[Started | None] = [None] * n
    early: list[tuple[int, Any]] = []
    while any(s is None for s in started):
        item = await watch.next()
        if item is None:
            return None
        i, ev = item
        if isinstance(ev, Failed):
            group.cancel()
            raise to_api_error(ev.error)
        if isinstance(ev, Started):
            started[i] = ev
        else:
            early.append(item)
    return started, early


async def collect(request: Request, group: HandleGroup, events: asyncio.Queue, n: int) -> list[Outcome] | None:
    """Run every generation to its end; None when the client left. The first failure cancels the rest."""
    from ocula.server.app import ClientWatch

    got = await wait_started(request, group, events, n)
    if got is None:
        return None
    started, early = got
    watch = ClientWatch(events, request, group)
    deltas: list[list[Delta]] = [[] for _ in range(n)]
    finished: list[Finished | None] = [None] * n
    pending = list(early)
    while any(f is None for f in finished):
        item = pending.pop(0) if pending else await watch.next()
        if item is None:
            return None
        i, ev = item
        if isinstance(ev, Delta):
            deltas[i].append(ev)
        elif isinstance(ev, Finished):
            finished[i] = ev
        elif isinstance(ev, Failed):
            group.cancel()
            raise to_api_error(ev.error)
    return [Outcome(s, d, f) for s, d, f in zip(started, deltas, finished)]


def set_index(chunk: dict, i: int) -> dict:
    for c in chunk.get("choices") or []:
        c["index"] = i
    return chunk


def merged_usage(outcomes: list[Outcome], prompts: int = 1) -> dict:
    """n completions of each prompt: every prompt counts once (as OpenAI counts them), the completions add up."""
    per = len(outcomes) // prompts
    firsts = outcomes[::per]
    completion = sum(o.finished.result.completion_tokens for o in outcomes)
    return P.usage(sum(o.finished.result.prompt_tokens for o in firsts), completion,
                   sum(o.first.cached_tokens for o in firsts))


async def run_choices(sched, metrics, request: Request, greq, fmt, n: int, stream: bool,
                      include_usage: bool, endpoint: str, t0: float):
    """OpenAI `n` > 1 and several completion prompts: one response whose choices are n samples of each prompt
    (`index` = prompt * n + sample), streamed or whole. `greq` / `fmt` are one, or lists (one per prompt)."""
    from ocula.server.app import EventStream

    per_prompt = list(zip(greq, fmt)) if isinstance(greq, list) else [(greq, fmt)]
    greqs, fmts = [], []
    for g, f in per_prompt:
        greqs += sample_requests(g, n)
        fmts += [f] + [fork_format(f) for _ in range(n - 1)]
    first = innermost(fmts[0])
    for f in fmts[1:]:  # one response: the same id and time in every chunk (several prompts had their own)
        inner = innermost(f)
        inner.id, inner.created = first.id, first.created
    n = len(greqs)
    group, events = await submit_all(sched, greqs)
    handed_off = False
    try:
        if stream:
            got = await wait_started(request, group, events, n)
            if got is None:
                return disconnected(metrics)
            started, early = got
            handed_off = True
            return EventStream(stream_choices(metrics, fmts, started, early, events, n, include_usage, endpoint, t0,
                                              len(per_prompt)), group)
        outcomes = await collect(request, group, events, n)
        if outcomes is None:
            return disconnected(metrics)
        bodies = []
        for i, (f, o) in enumerate(zip(fmts, outcomes)):
            r = o.finished.result
            metrics.tokens(r.prompt_tokens, r.completion_tokens, o.first.cached_tokens)
            bodies.append(f.full(o.first, o.deltas, o.finished))
        body = bodies[0]
        body["choices"] = [set_index(b, i)["choices"][0] for i, b in enumerate(bodies)]
        body["usage"] = merged_usage(outcomes, len(per_prompt))
        return JSONResponse(body)
    finally:
        if not handed_off:
            group.cancel()


async def stream_choices(metrics, fmts, started, early, events: asyncio.Queue, n: int, include_usage: bool,
                         endpoint: str, t0: float, prompts: int = 1) -> AsyncIterator[str]:
    from ocula.server.app import _data

    status = 200
    finished: list[Finished | None] = [None] * n
    pending = list(early)
    try:
        for i, f in enumerate(fmts):
            for chunk in f.start():
                yield _data(set_index(chunk, i))
        while any(x is None for x in finished):
            i, ev = pending.pop(0) if pending else await events.get()
            f = fmts[i]
            if isinstance(ev, Delta):
                chunk = f.delta(ev)  # a chunk, None, or a list of chunks (the tool/reasoning parser's)
                for c in chunk if isinstance(chunk, list) else [chunk] if chunk is not None else []:
                    yield _data(set_index(c, i))
            elif isinstance(ev, Finished):
                finished[i] = ev
                r = ev.result
                metrics.tokens(r.prompt_tokens, r.completion_tokens, started[i].cached_tokens)
                last = all(x is not None for x in finished)
                for chunk in f.finish(started[i], ev, include_usage and last):
                    if not chunk.get("choices") and "usage" in chunk:  # the one usage chunk, for all choices
                        chunk["usage"] = merged_usage([_Done(s, x) for s, x in zip(started, finished)], prompts)
                    yield _data(set_index(chunk, i))
            elif isinstance(ev, Failed):
                err = to_api_error(ev.error)
                status = err.status
                yield _data(err.body())
                break
        yield "data: [DONE]\n\n"
    except BaseException:
        status = 499
        metrics.disconnects += 1
        raise
    finally:
        metrics.request_done(endpoint, status, time.perf_counter() - t0)


def _Done(first: Started, finished: Finished) -> Outcome:
    return Outcome(first, [], finished)


def disconnected(metrics) -> JSONResponse:
    metrics.disconnects += 1
    return JSONResponse(APIError(499, "client disconnected", code="cancelled").body(), status_code=499)
