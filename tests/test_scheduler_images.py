"""The scheduler's image worker, in process on a tiny model: a request with images has its prompt built on
a thread of its own (with its own torch thread count) while the other sequences are admitted and decode;
the build time is not queue time; a request cancelled while waiting for the worker is reported cancelled."""
import threading
import time

import pytest
import torch
from tiny import write_tiny_model

import ocula
from ocula.engine.sampling import SamplingParams
from ocula.engine.scheduler import Cancelled, Failed, Finished, GenerationRequest, Scheduler, Started

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ocula.load(write_tiny_model(tmp_path_factory.mktemp("imgw") / "tiny-qwen2.gguf", "qwen2"))


def request(model, text, build_gate: threading.Event | None = None, seen: dict | None = None,
            has_images: bool | None = None, **params):
    """A request whose prompt build (standing in for an image encode) waits for `build_gate`; with a gate it
    goes to the image workers (as a request with images does) unless has_images says otherwise."""
    messages = [{"role": "user", "content": text}]

    def build(timings):
        if seen is not None:
            seen["thread"], seen["threads"] = threading.current_thread().name, torch.get_num_threads()
        if build_gate is not None:
            assert build_gate.wait(10), "the gate never opened"
        return model.build_prompt(messages, timings)

    params = {"temperature": 0, "max_tokens": 6, **params}
    images = build_gate is not None if has_images is None else has_images
    return GenerationRequest(build, SamplingParams(**params), has_images=images)


def test_text_requests_run_while_an_image_prompt_builds(model):
    gate, seen = threading.Event(), {}
    with Scheduler(model, max_batch=4, image_threads=2) as s:
        slow = s.submit(request(model, "look at this", gate, seen))
        time.sleep(0.2)  # the worker is inside the build now
        assert s.active == 1 and seen["thread"].startswith("ocula-image-worker")
        t0 = time.monotonic()
        texts = [s.submit(request(model, f"quick {i}")).result() for i in range(3)]
        assert time.monotonic() - t0 < 5 and all(r.completion_tokens == 6 for r in texts)
        assert not slow.done  # still building: the text requests did not wait for it
        time.sleep(0.3)
        gate.set()
        events = list(slow)
    started = next(e for e in events if isinstance(e, Started))
    assert isinstance(events[-1], Finished) and events[-1].result.completion_tokens == 6
    assert started.queue_ms < 300, started.queue_ms  # the ~0.5 s build is work, not waiting
    want = model.chat([{"role": "user", "content": "look at this"}], max_tokens=6, temperature=0)
    assert events[-1].result.text == want.text
    # the worker computes with its own thread count; this thread's (the caller's, 1) is untouched
    assert seen["threads"] == 2 and torch.get_num_threads() == 1


def test_a_small_image_takes_the_second_worker_while_a_large_one_builds(model):
    gate = threading.Event()
    with Scheduler(model, image_workers=2) as s:
        large = s.submit(request(model, "a large image", gate))
        time.sleep(0.1)
        small = s.submit(request(model, "a small image", has_images=True))  # builds at once
        assert small.result().completion_tokens == 6
        assert not large.done  # the first worker is still inside the large one's build
        gate.set()
        assert large.result().completion_tokens == 6


def test_a_request_cancelled_while_waiting_for_the_worker(model):
    gate = threading.Event()
    with Scheduler(model, image_threads=1, image_workers=1) as s:
        first = s.submit(request(model, "one", gate))
        second = s.submit(request(model, "two", gate))
        time.sleep(0.1)
        assert s.queue_depth == 1  # the second waits behind the first's build
        second.cancel()
        gate.set()
        assert first.result().completion_tokens == 6
        events = list(second)
    assert isinstance(events[-1], Failed) and isinstance(events[-1].error, Cancelled)
    assert s.stats.requests_cancelled == 1


def test_a_failed_build_fails_only_its_request(model):
    def boom(timings):
        raise RuntimeError("encoder exploded")

    with Scheduler(model) as s:
        bad = s.submit(GenerationRequest(boom, SamplingParams(max_tokens=2), has_images=True))
        good = s.submit(request(model, "fine"))
        with pytest.raises(RuntimeError, match="encoder exploded"):
            bad.result()
        assert good.result().completion_tokens == 6
        assert s.alive


def test_a_prompt_built_after_stop_is_failed_not_left_hanging(model):
    gate = threading.Event()
    s = Scheduler(model, image_workers=1).start()
    h = s.submit(request(model, "building while the server stops", gate))
    time.sleep(0.1)
    s.stop(timeout=0.2)  # the worker is still inside the build
    gate.set()
    event = h._queue.get(timeout=5)  # before: no event ever came, the client waited forever
    assert isinstance(event, Failed) and "shutting down" in str(event.error)
