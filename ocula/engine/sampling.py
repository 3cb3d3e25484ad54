"""Token sampling: penalties, then top-k / top-p / min-p filtering, then temperature and a draw."""
from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import dataclass, field

import torch

from ocula.errors import RequestError


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0  # HF style: divide positive / multiply negative logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI style: subtract once per seen token
    frequency_penalty: float = 0.0  # OpenAI style: subtract per occurrence
    penalty_last_n: int = 64  # how many recent tokens the penalties look at (-1: all)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        for name, lo, hi, how in _RANGES:
            setattr(self, name, _checked_number(name, getattr(self, name), lo, hi, how))
        if self.max_tokens is not None:
            self.max_tokens = _checked_int("max_tokens", self.max_tokens, 0, None)
        self.top_k = _checked_int("top_k", self.top_k, 0, None, " (0 disables it)")
        self.penalty_last_n = _checked_int("penalty_last_n", self.penalty_last_n, -1, None, " (-1: all)")
        if self.seed is not None:
            self.seed = _checked_int("seed", self.seed, -(2**63), 2**64 - 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """Stateful per sequence: owns its random generator so a seed makes a run reproducible."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator = torch.Generator(device="cpu")
        if params.seed is not None:
            self.generator.manual_seed(int(params.seed))
        else:
            self.generator.seed()

    def apply_penalties(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        p = self.params
        if not history or (p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty):
            return logits
        recent = history if p.penalty_last_n < 0 else history[-p.penalty_last_n :] if p.penalty_last_n else []
        if not recent:
            return logits
        counts = Counter(recent)
        ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
        freq = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        logits = logits.clone()
        seen = logits[ids]
        if p.repetition_penalty != 1.0:
            seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        seen = seen - p.presence_penalty - p.frequency_penalty * freq
        logits[ids] = seen
        return logits

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Filtered, temperature-scaled distribution over the vocabulary (float32)."""
        p = self.params
        logits = logits.float()
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits / max(p.temperature, 1e-6), dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cum = sorted_probs.cumsum(-1)
            drop_sorted = (cum - sorted_probs) >= p.top_p  # keep the smallest set reaching top_p
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return probs / probs.sum()

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits [vocab] (float32) → next token id."""
        logits = self.apply_penalties(logits, history)
        if self.params.greedy:
            return int(torch.argmax(logits))
        probs = self.probabilities(logits).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))


# name, low, high, how the interval reads: sampling happens in float32, so a bound keeps every value (and its
# reciprocal, where the sampler divides by it) finite there; beyond these bounds nothing changes any more
# (a temperature of 1e6 is already a uniform draw)
MAX_TEMPERATURE = 1e6
_RANGES = [
    ("temperature", 0.0, MAX_TEMPERATURE, "[0, 1e6]"),
    ("top_p", 0.0, 1.0, "(0, 1]"),
    ("min_p", 0.0, 1.0, "[0, 1]"),
    ("repetition_penalty", 1e-6, 1e6, "[1e-6, 1e6] (1 is off)"),
    ("presence_penalty", -2.0, 2.0, "[-2, 2]"),
    ("frequency_penalty", -2.0, 2.0, "[-2, 2]"),
]


def _checked_number(name: str, value, lo: float, hi: float, how: str) -> float:
    """`value` as a float, or a RequestError naming the option and the value: a non-number, NaN, an infinity
    or a number outside [lo, hi] ((lo, hi] when `how` says so)."""
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):  # numpy / torch scalars pass
        raise RequestError(f"{name} must be a number, got {value!r}")
    try:
        x = float(value)
    except OverflowError:  # an int too large for a float
        raise RequestError(f"{name} must be in {how}, got {value}") from None
    except (TypeError, ValueError, RuntimeError):  # e.g. a tensor of several values
        raise RequestError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise RequestError(f"{name} must be a finite number, got {value!r}")
    open_low = how.startswith("(")
    if x > hi or x < lo or (open_low and x == lo):
        raise RequestError(f"{name} must be in {how}, got {value!r}")
    return x


def _checked_int(name: str, value, lo: int, hi: int | None, note: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
            value = int(value)
        else:
            raise RequestError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise RequestError(f"{name} must be {bound}{note}, got {value}")
    return value


def find_stop(text: str, stops: list[str], start: int = 0) -> int:
    """Index in `text` where the first stop string begins (searching from `start`), or -1."""
    best = -1
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best
