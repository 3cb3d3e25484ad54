import pytest
import torch

from ocula.engine.sampling import Sampler, SamplingParams, find_stop, partial_stop_len
from ocula.errors import RequestError


def logits(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_greedy_is_argmax():
    s = Sampler(SamplingParams(temperature=0))
    assert s(logits(0.1, 3.0, 2.0), []) == 1


def test_seed_reproducible_and_varies():
    lg = torch.randn(100)
    a = [Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1, min_p=0, seed=7))(lg, []) for _ in range(5)]
    b = [Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1, min_p=0, seed=7))(lg, []) for _ in range(5)]
    assert a == b
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1, min_p=0, seed=1))
    assert len({s(lg, []) for _ in range(50)}) > 5


def test_top_k_keeps_k_best():
    p = Sampler(SamplingParams(temperature=1.0, top_k=2, top_p=1, min_p=0)).probabilities(logits(1, 5, 3, 4))
    assert (p > 0).tolist() == [False, True, False, True]


def test_top_p_keeps_smallest_reaching_set():
    # probs ~ [0.64, 0.24, 0.09, 0.03]
    lg = torch.log(torch.tensor([0.64, 0.24, 0.09, 0.03]))
    p = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.8, min_p=0)).probabilities(lg)
    assert (p > 0).tolist() == [True, True, False, False]
    assert abs(float(p.sum()) - 1) < 1e-6


def test_min_p():
    lg = torch.log(torch.tensor([0.5, 0.3, 0.04, 0.16]))
    p = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1, min_p=0.1)).probabilities(lg)
    assert (p > 0).tolist() == [True, True, False, True]


def test_low_temperature_sharpens():
    lg = logits(1.0, 2.0)
    hot = Sampler(SamplingParams(temperature=2.0, top_k=0, top_p=1, min_p=0)).probabilities(lg)
    cold = Sampler(SamplingParams(temperature=0.2, top_k=0, top_p=1, min_p=0)).probabilities(lg)
    assert cold[1] > hot[1]


def test_penalties():
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0))
    out = s.apply_penalties(logits(4.0, -4.0, 1.0), [0, 1])
    assert out.tolist() == [2.0, -8.0, 1.0]
    s = Sampler(SamplingParams(temperature=0, presence_penalty=1.0, frequency_penalty=0.5))
    out = s.apply_penalties(logits(4.0, 4.0, 4.0), [0, 0, 1])
    assert out.tolist() == [2.0, 2.5, 4.0]
    # a repeated token loses to a fresh one under the penalty
    assert s(logits(4.0, 3.9), [0, 0]) == 1


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(min_p=2), "min_p"),
    (dict(top_k=-1), "top_k"), (dict(presence_penalty=3), "presence_penalty"), (dict(max_tokens=-1), "max_tokens"),
])
def test_invalid_params(kw, msg):
    with pytest.raises(RequestError, match=msg):
        SamplingParams(**kw)


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=INF), "temperature must be a finite number, got inf"),
    (dict(temperature=NAN), "temperature must be a finite number, got nan"),
    (dict(temperature=1e308), r"temperature must be in \[0, 1e6\], got 1e\+308"),
    (dict(temperature="hot"), "temperature must be a number, got 'hot'"),
    (dict(top_p=NAN), "top_p must be a finite number"),
    (dict(min_p=-INF), "min_p must be a finite number"),
    (dict(repetition_penalty=INF), "repetition_penalty must be a finite number"),
    (dict(repetition_penalty=1e-300), "repetition_penalty must be in"),
    (dict(repetition_penalty=1e308), "repetition_penalty must be in"),
    (dict(presence_penalty=NAN), "presence_penalty must be a finite number"),
    (dict(frequency_penalty=-INF), "frequency_penalty must be a finite number"),
    (dict(top_k=1.5), "top_k must be an integer"),
    (dict(seed=2**70), "seed must be in"),
])
def test_non_finite_and_overflowing_values_are_refused_by_name(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


@pytest.mark.parametrize("kw", [dict(temperature=1e6), dict(temperature=50.0, top_k=0, top_p=1.0, min_p=0.0),
                                dict(repetition_penalty=1e-6), dict(repetition_penalty=1e6)])
def test_extreme_accepted_values_still_sample_a_token(kw):
    lg = torch.randn(50) * 30
    s = Sampler(SamplingParams(seed=0, **kw))
    assert 0 <= s(lg, [1, 2, 3, 3]) < 50


def test_stop_helpers():
    assert find_stop("hello world", ["wor"]) == 6
    assert find_stop("hello", ["xyz"]) == -1
    assert partial_stop_len("hello wo", ["world"]) == 2
    assert partial_stop_len("hello", ["world"]) == 0
    assert SamplingParams(stop="END").stop == ["END"]
