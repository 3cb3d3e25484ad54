"""Conversation with images → Prompt: load, preprocess, encode (cached), expand placeholders, positions."""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ocula.text.chat import image_parts
from ocula.engine.prompt import ImageSpan, Prompt
from ocula.engine.request import ContextOverflowError, raise_if_cancelled
from ocula.engine.video_prompt import encode_video, expand_markers, video_spans
from ocula.errors import OculaError, RequestError
from ocula.media import MediaPolicy, image_digest, load_image
from ocula.models.vision.base import ImageOptions, ProcessedImage, VisionModel


class VisionEncodeError(OculaError):
    pass


class ImageBudgetError(RequestError):
    """A request's images need more tokens than it may have."""


@dataclass
class ImageTokenLimit:
    """Checked when a request's images are preprocessed, before any is encoded (a large image takes seconds
    to minutes): their tokens in all against a per-request total, and against the context."""

    per_request: int | None = None
    context: int | None = None

    def check(self, counts: list[int]) -> None:
        total = sum(counts)
        each = f" ({' + '.join(map(str, counts))})" if len(counts) > 1 else ""
        if self.per_request is not None and total > self.per_request:
            raise ImageBudgetError(
                f"the request's images need {total} image tokens{each}, more than the {self.per_request} allowed "
                "per request; send fewer or smaller images, or a lower image_max_tokens"
            )
        if self.context is not None and total >= self.context:
            raise ContextOverflowError(
                f"the request's images alone need {total} tokens{each} but the context holds {self.context}; "
                "send fewer or smaller images, or a lower image_max_tokens"
            )


@dataclass
class _Prepared:
    key: str
    cached: Encoded | None
    processed: ProcessedImage


@dataclass
class Encoded:
    features: torch.Tensor
    deepstack: list[torch.Tensor] | None
    processed: ProcessedImage
    encode_ms: float


class EmbeddingCache:
    """LRU of encoded images keyed by content hash + preprocessing settings, bounded in bytes."""

    def __init__(self, max_bytes: int = 512 * 1024 * 1024):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Encoded] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def _size(e: Encoded) -> int:
        tensors = [e.features, *(e.deepstack or [])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def __contains__(self, key: str) -> bool:  # a look that counts neither a hit nor a miss
        with self._lock:
            return key in self._items

    def get(self, key: str) -> Encoded | None:
        with self._lock:
            e = self._items.get(key)
            if e is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return e

    def put(self, key: str, e: Encoded) -> None:
        size = self._size(e)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = e
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= self._size(old)


class VisionRuntime:
    def __init__(self, vision: VisionModel, tokenizer, text_cfg, cache_bytes: int = 512 * 1024 * 1024):
        self.vision = vision
        self.tokenizer = tokenizer
        self.text_cfg = text_cfg
        self.cache = EmbeddingCache(cache_bytes)
        self.fingerprint = hashlib.sha256(
            f"{vision.gguf.path.resolve()}:{vision.gguf.file_size}".encode()
        ).hexdigest()[:16]
        self.image_token_id = tokenizer.token_id(vision.image_token)
        if self.image_token_id is None:
            raise RequestError(
                f"the text model's vocabulary has no {vision.image_token!r} token that "
                f"{vision.cfg.projector_type!r} images need: this mmproj does not match the model"
            )

    # ------------------------------------------------------------ one image

    def prepare(self, source, options: ImageOptions | None = None, policy: MediaPolicy | None = None) -> _Prepared:
        """Load the image and find it in the cache, or preprocess it: its token count is then known before the
        expensive part, the encoder, runs."""
        options = options or ImageOptions()
        image = load_image(source, policy)
        key = f"{self.fingerprint}:{image_digest(image)}:{options.key()}"
        cached = self.cache.get(key)
        if cached is not None:
            return _Prepared(key, cached, cached.processed)
        return _Prepared(key, None, self.vision.preprocess(image, options))

    @torch.inference_mode()
    def run_encoder(self, key: str, processed: ProcessedImage) -> Encoded:
        t0 = time.perf_counter()
        out = self.vision.encode(processed)
        features, deepstack = out if isinstance(out, tuple) else (out, None)
        if not bool(torch.isfinite(features).all()):
            raise VisionEncodeError(
                "the vision encoder produced NaN/Inf values (try dtype='float32'; the mmproj may be damaged)"
            )
        if features.shape[0] != processed.n_tokens:
            raise VisionEncodeError(
                f"the projector returned {features.shape[0]} embeddings for an image that needs {processed.n_tokens}"
            )
        encoded = Encoded(features, deepstack, processed, (time.perf_counter() - t0) * 1000)
        self.cache.put(key, encoded)
        return encoded

    def encode(self, source, options: ImageOptions | None = None, policy: MediaPolicy | None = None) -> tuple[str, Encoded]:
        p = self.prepare(source, options, policy)
        return p.key, p.cached if p.cached is not None else self.run_encoder(p.key, p.processed)

    def video_token_id(self) -> int:
        from ocula.models.vision.qwen_video import VIDEO_PAD

        tid = self.tokenizer.token_id(VIDEO_PAD)
        if tid is None:
            raise RequestError(f"the text model's vocabulary has no {VIDEO_PAD!r} token: it cannot take video")
        return tid

    # ------------------------------------------------------------ whole prompt

    def build_prompt(self, text: str, messages: list[dict], timings=None, options: ImageOptions | None = None,
                     policy: MediaPolicy | None = None, max_images: int | None = None, videos=(),
                     video_options: dict | None = None, video_limits=None,
                     limit: ImageTokenLimit | None = None) -> Prompt:
        """`videos`: the video parts taken out of the messages (video_prompt.take_video_parts), whose markers
        the rendered `text` holds. `limit`: checked on the images' token counts after preprocessing, before
        any image or video is encoded."""
        parts = image_parts(messages)
        if max_images is not None and len(parts) > max_images:
            raise RequestError(f"{len(parts)} images sent but at most {max_images} are allowed per request")
        prepared = [self.prepare(p, options, policy) for p in parts]
        if limit is not None:
            limit.check([p.processed.n_tokens for p in prepared])
        encoded_videos = [encode_video(self, v, video_options, policy, video_limits) for v in videos]
        if encoded_videos:
            text = expand_markers(text, [e for _, e in encoded_videos])
        placeholder = self.vision.placeholder
        pieces = text.split(placeholder)
        if len(pieces) - 1 != len(parts):
            raise RequestError(
                f"the chat template placed {len(pieces) - 1} image placeholder(s) ({placeholder!r}) "
                f"for {len(parts)} image(s); messages must not contain that text literally, and the "
                "template must write one placeholder per image part"
            )
        fresh: dict[str, Encoded] = {}  # encoded for this request (an image sent twice is encoded once)
        encoded = []
        for p in prepared:
            enc = p.cached or fresh.get(p.key)
            if enc is None:
                raise_if_cancelled()  # the client has gone: the images not encoded yet are not
                enc = fresh[p.key] = self.run_encoder(p.key, p.processed)
            encoded.append((p.key, enc))
        expanded = pieces[0]
        for (_, enc), rest in zip(encoded, pieces[1:]):
            expanded += self.vision.prompt_text(enc.processed) + rest
        ids = self.tokenizer.encode(expanded, add_special=False)
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        want = sum(e.processed.n_tokens for _, e in encoded)
        if len(slots) != want:
            raise RequestError(
                f"the prompt has {len(slots)} image tokens but the images need {want}: "
                f"remove literal {self.vision.image_token!r} text from the messages"
            )
        spans, span_images, at = [], [], 0
        for key, enc in encoded:
            n = enc.processed.n_tokens
            mine = slots[at : at + n]
            # One span per contiguous run of image tokens: SmolVLM/Idefics3 put text (tile markers)
            # between the runs of one image; the features are consumed in order.
            cuts = [0] + [i for i in range(1, n) if mine[i] != mine[i - 1] + 1] + [n]
            if len(cuts) > 2 and (self.text_cfg.is_mrope or self.vision.bidirectional):
                raise RequestError("an image's placeholder tokens are not contiguous in the prompt")
            for r, (a, b) in enumerate(zip(cuts, cuts[1:])):
                deepstack = None if enc.deepstack is None else [d[a:b] for d in enc.deepstack]
                spans.append(ImageSpan(mine[a], enc.features[a:b], key if len(cuts) == 2 else f"{key}#{r}",
                                       deepstack, self.vision.bidirectional, enc.encode_ms if r == 0 else 0.0))
                span_images.append(enc.processed)
            at += n
        if encoded_videos:
            vspans, vgrids = video_spans(ids, self.video_token_id(), encoded_videos)
            order = sorted(range(len(spans) + len(vspans)), key=lambda i: (spans + vspans)[i].start)
            spans, span_images = [(spans + vspans)[i] for i in order], [(span_images + vgrids)[i] for i in order]
        if timings is not None:
            # images taken from the cache cost nothing now
            timings.image_encode_ms = sum(e.encode_ms for e in fresh.values()) + sum(e.encode_ms for _, e in encoded_videos)
            timings.image_tokens = want + sum(e.processed.n_tokens for _, e in encoded_videos)
            timings.images_encoded, timings.images_cached = len(fresh), len(prepared) - len(fresh)
        positions, next_pos = self.positions(ids, spans, span_images)
        return Prompt(ids, positions, next_pos, spans)

    def positions(self, ids: list[int], spans: list[ImageSpan], processed: list[ProcessedImage]):
        """Sequential positions, or Qwen-VL M-RoPE (t, h, w) ids that follow each image's grid."""
        L = len(ids)
        if not self.text_cfg.is_mrope:
            return torch.arange(L), L
        pos = torch.zeros(3, L, dtype=torch.long)
        cursor, nxt = 0, 0  # token index, next position value
        for span, pre in zip(spans, processed):
            n_text = span.start - cursor
            pos[:, cursor : span.start] = torch.arange(nxt, nxt + n_text)
            nxt += n_text
            t, h, w = pre.grid_thw
            m = self.vision.merge_size
            gh, gw = h // m, w // m
            t_index = pre.extra.get("t_index")  # video: Qwen2.5-VL's time-scaled temporal positions
            tt = (torch.tensor(t_index) if t_index is not None else torch.arange(t)).repeat_interleave(gh * gw)
            hh = torch.arange(gh).repeat_interleave(gw).repeat(t)
            ww = torch.arange(gw).repeat(t * gh)
            grid = torch.stack([tt, hh, ww]) + nxt
            pos[:, span.start : span.stop] = grid
            nxt = int(grid.max()) + 1
            cursor = span.stop
        pos[:, cursor:] = torch.arange(nxt, nxt + L - cursor)
        nxt += L - cursor
        return pos, nxt
