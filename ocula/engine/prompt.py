"""A prompt ready for the decoder: token ids with image placeholders, their embeddings and positions."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageSpan:
    """One image's run of placeholder tokens and the projector output that replaces them."""

    start: int  # index of the first placeholder token in the prompt
    features: torch.Tensor  # [n_tokens, n_embd]
    key: str  # content hash (image bytes + preprocessing + mmproj); identifies the image in caches
    deepstack: list[torch.Tensor] | None = None  # Qwen3-VL: per early layer [n_tokens, n_embd]
    bidirectional: bool = False  # tokens of this image attend to each other both ways (Gemma 3)
    encode_ms: float = 0.0

    @property
    def stop(self) -> int:
        return self.start + self.features.shape[0]


@dataclass
class Prompt:
    token_ids: list[int]
    positions: torch.Tensor  # [L] or [3, L]
    next_position: int  # position of the first generated token
    images: list[ImageSpan] = field(default_factory=list)

    @classmethod
    def from_tokens(cls, ids: list[int], mrope: bool = False) -> "Prompt":
        pos = torch.arange(len(ids))
        return cls(list(ids), pos.expand(3, -1).clone() if mrope else pos, len(ids))

    def __len__(self) -> int:
        return len(self.token_ids)

    def cache_keys(self) -> list:
        """Per-token identity used for prefix reuse: the id for text, (image key, offset) for images."""
        keys: list = list(self.token_ids)
        for img in self.images:
            for j in range(img.start, img.stop):
                keys[j] = (img.key, j - img.start)
        return keys

    def safe_cut(self, n: int) -> int:
        """Largest cut <= n that does not split an image (images are prefilled whole)."""
        for img in self.images:
            if img.start < n < img.stop:
                return img.start
        return n

    def groups(self, start: int, stop: int) -> torch.Tensor | None:
        """Image group id per token in [start, stop) for bidirectional attention, or None."""
        spans = [(i + 1, img) for i, img in enumerate(self.images) if img.bidirectional]
        if not spans:
            return None
        g = torch.zeros(stop - start, dtype=torch.long)
        for gid, img in spans:
            a, b = max(img.start, start), min(img.stop, stop)
            if a < b:
                g[a - start : b - start] = gid
        return g if bool((g > 0).any()) else None
