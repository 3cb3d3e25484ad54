"""Token sampling: penalties, then top-k / top-p / min-p filtering, then temperature and a draw."""
from __future__ import annotations

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
        checks = [
            (self.max_tokens is None or self.max_tokens >= 0, "max_tokens must be >= 0"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

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
