"""Continuous-batching scheduler, in process, on tiny random models: batched == alone, prefix reuse,
chunked prefill, cancellation, the bounded queue, context checks, constraints."""
import json
import threading
import time

import pytest
from tiny import write_tiny_model

import ocula
from ocula.engine.sampling import SamplingParams
from ocula.engine.scheduler import (
    Cancelled, ContextOverflowError, Delta, Failed, Finished, GenerationRequest, QueueFullError, Scheduler, Started,
)

PROMPTS = [
    "hello there",
    "the quick brown fox jumps over the lazy dog " * 3,
    "a",
    "in the beginning " * 6,
    "tea or coffee?",
    "the the the the",
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("sched") / "tiny-qwen2.gguf", "qwen2")
    return ocula.load(path)


def chat_request(model, text, **params):
    params.setdefault("temperature", 0)
    params.setdefault("max_tokens", 24)
    messages = [{"role": "user", "content": text}]
    return GenerationRequest(build_prompt=lambda t: model.build_prompt(messages, t), params=SamplingParams(**params))


def alone(model, text, **params):
    params.setdefault("temperature", 0)
    params.setdefault("max_tokens", 24)
    return model.chat([{"role": "user", "content": text}], **params)


@pytest.fixture()
def sched(model):
    s = Scheduler(model, max_batch=4, max_queue=16).start()
    yield s
    s.stop()


def test_batched_greedy_equals_alone(model, sched):
    want = [alone(model, p).token_ids for p in PROMPTS]
    handles = [sched.submit(chat_request(model, p)) for p in PROMPTS]  # 6 requests, batches of <= 4
    got = [h.result() for h in handles]
    assert [r.token_ids for r in got] == want
    assert all(r.finish_reason == "length" for r in got)
    assert sched.stats.decode_batch_tokens > sched.stats.decode_steps  # some steps really were batched


def test_seeded_sampling_equals_alone(model, sched):
    opts = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    want = [alone(model, p, seed=7 + i, **opts).token_ids for i, p in enumerate(PROMPTS[:4])]
    handles = [sched.submit(chat_request(model, p, seed=7 + i, **opts)) for i, p in enumerate(PROMPTS[:4])]
    assert [h.result().token_ids for h in handles] == want


def test_chunked_prefill_and_events(model):
    text = "a long prompt that will be prefilled in several small chunks " * 2
    want = alone(model, text)
    with Scheduler(model, max_batch=2, prefill_chunk=8) as s:
        events = list(s.submit(chat_request(model, text)))
    assert isinstance(events[0], Started) and events[0].prompt_tokens == want.prompt_tokens
    assert isinstance(events[-1], Finished)
    deltas = [e for e in events if isinstance(e, Delta)]
    assert [t for d in deltas for t in d.token_ids] == want.token_ids
    assert "".join(d.text for d in deltas) + events[-1].tail == want.text == events[-1].result.text


def test_prefix_reuse_copies_and_matches(model, sched):
    first = sched.submit(chat_request(model, PROMPTS[1])).result()
    assert first.timings.cached_tokens == 0
    # the same prompt twice at once: both copy the pooled prefix, neither disturbs the other
    h = [sched.submit(chat_request(model, PROMPTS[1])) for _ in range(2)]
    again = [x.result() for x in h]
    for r in again:
        assert r.token_ids == first.token_ids
        assert r.timings.cached_tokens == r.prompt_tokens - 1
    # a second turn reuses the first turn's prompt and answer
    turn2 = [{"role": "user", "content": PROMPTS[1]}, {"role": "assistant", "content": first.text},
             {"role": "user", "content": "and then?"}]
    req = GenerationRequest(build_prompt=lambda t: model.build_prompt(turn2, t),
                            params=SamplingParams(max_tokens=8, temperature=0))
    r2 = sched.submit(req).result()
    assert r2.timings.cached_tokens >= first.prompt_tokens
    assert r2.token_ids == model.chat(turn2, max_tokens=8, temperature=0).token_ids
    assert sched.pool.hits >= 3 and sched.pool.bytes <= sched.pool.max_bytes


def test_prefix_pool_is_bounded(model):
    with Scheduler(model, prefix_cache_bytes=1) as s:  # smaller than any cache: nothing is kept
        s.submit(chat_request(model, "x")).result()
        assert len(s.pool) == 0 and s.pool.bytes == 0
        assert s.submit(chat_request(model, "x")).result().timings.cached_tokens == 0
    size = None
    with Scheduler(model) as s:
        for p in PROMPTS:
            s.submit(chat_request(model, p)).result()
        size = max(e.nbytes for e in s.pool._entries.values())
    with Scheduler(model, prefix_cache_bytes=2 * size) as s:  # room for two: least recently used go first
        for p in PROMPTS:
            s.submit(chat_request(model, p)).result()
        assert len(s.pool) == 2 and s.pool.bytes <= 2 * size
        recent = s.submit(chat_request(model, PROMPTS[-1])).result()
        assert recent.timings.cached_tokens == recent.prompt_tokens - 1
        evicted = s.submit(chat_request(model, PROMPTS[0])).result()  # only the chat template's start is shared
        assert 0 < evicted.timings.cached_tokens < evicted.prompt_tokens - 2


def test_cancel_frees_the_sequence(model, sched):
    h = sched.submit(chat_request(model, "go on forever", max_tokens=200, ignore_eos=True))
    for event in h:
        if isinstance(event, Delta):
            h.cancel()
            break
    rest = list(h)
    assert isinstance(rest[-1], Failed) and isinstance(rest[-1].error, Cancelled)
    deadline = time.time() + 5
    while sched.active and time.time() < deadline:
        time.sleep(0.01)
    assert sched.active == 0 and sched.stats.requests_cancelled >= 1
    assert sched.submit(chat_request(model, "still alive", max_tokens=4)).result().completion_tokens == 4


def test_queue_full_is_refused(model):
    s = Scheduler(model, max_batch=1, max_queue=2).start()
    try:
        gate = threading.Event()

        def slow_build(t):
            gate.wait(5)
            return model.build_prompt([{"role": "user", "content": "hi"}], t)

        blocker = s.submit(GenerationRequest(slow_build, SamplingParams(max_tokens=2)))
        time.sleep(0.1)  # the scheduler is now inside slow_build; the queue is empty again
        queued = [s.submit(chat_request(model, "q", max_tokens=2)) for _ in range(2)]
        with pytest.raises(QueueFullError, match="busy"):
            s.submit(chat_request(model, "one too many"))
        gate.set()
        for h in [blocker, *queued]:
            assert h.result().completion_tokens == 2
        assert s.stats.requests_rejected == 1
    finally:
        s.stop()


def test_context_overflow_is_an_error(model, sched):
    n_ctx = model.n_ctx
    long_text = "the " * (n_ctx + 10)
    with pytest.raises(ContextOverflowError, match=rf"the prompt has \d+ tokens but the context holds {n_ctx}"):
        sched.submit(chat_request(model, long_text)).result()
    req = chat_request(model, "hi", max_tokens=n_ctx)
    req.max_tokens_explicit = True
    with pytest.raises(ContextOverflowError, match=rf"max_tokens asks for {n_ctx} more"):
        sched.submit(req).result()
    # without an explicit max_tokens the answer just stops at the context's end
    r = sched.submit(chat_request(model, "hi", max_tokens=None, ignore_eos=True)).result()
    assert r.finish_reason == "length" and r.prompt_tokens + r.completion_tokens == n_ctx


def test_stop_strings_and_logprobs(model, sched):
    base = alone(model, PROMPTS[0], max_tokens=16)
    stop = base.text[3:6]
    want = alone(model, PROMPTS[0], max_tokens=16, stop=[stop])
    req = chat_request(model, PROMPTS[0], max_tokens=16, stop=[stop])
    req.logprobs = 3
    events = list(sched.submit(req))
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.result.text == want.text and fin.result.finish_reason == "stop"
    lps = [lp for e in events if isinstance(e, Delta) for lp in e.logprobs]
    assert len(lps) == len(fin.result.token_ids)
    for lp in lps:
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
        assert lp.logprob <= 0 and lp.token == lp.top[0][0]  # greedy: the chosen one is the best


def test_json_schema_constraint(model, sched):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
              "maximum": 9}}, "required": ["ok", "n"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
    want = model.chat([{"role": "user", "content": "json"}], max_tokens=40, temperature=0, response_format=fmt)
    req = chat_request(model, "json", max_tokens=40)
    req.constraint = model.response_constraint(fmt)
    got = sched.submit(req).result()
    assert got.text == want.text and got.finish_reason == "stop"
    obj = json.loads(got.text)
    assert set(obj) == {"ok", "n"} and isinstance(obj["ok"], bool) and 0 <= obj["n"] <= 9


def test_bad_prompt_fails_only_its_request(model, sched):
    def boom(t):
        raise RuntimeError("kaput")

    bad = sched.submit(GenerationRequest(boom, SamplingParams(max_tokens=2)))
    good = sched.submit(chat_request(model, "fine", max_tokens=3))
    with pytest.raises(RuntimeError, match="kaput"):
        bad.result()
    assert good.result().completion_tokens == 3
