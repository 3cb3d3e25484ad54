"""The library API: `ocula.load(...)` returns a `Model` that chats, generates, tokenizes and scores."""
from __future__ import annotations

import contextlib
import numbers
import os
import sys
import time
from typing import Any, Iterator

import torch

from ocula.text.chat import ChatTemplate
from ocula.engine import video_prompt
from ocula.engine.generate import Chunk, Engine, Result, Timings
from ocula.engine.prompt import Prompt
from ocula.engine.sampling import SamplingParams
from ocula.errors import RequestError, UnsupportedError
from ocula.gguf import GGUFFile
from ocula.models.text import build_text_model
from ocula.models.vision.base import ImageOptions
from ocula.models.weights import load_gguf_weights
from ocula.quant.kernels import check_mode
from ocula.quant.linear import use_kernels
from ocula.text.tokenizer import Tokenizer

PROGRESS_MIN_BYTES = 512 * 1024 * 1024
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UnsupportedError(f"{what} {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (default: cuda when torch sees a GPU, else cpu); an UnsupportedError names a device
    torch does not know, one ocula does not run on, or a GPU this torch build or machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UnsupportedError(f"device {device!r} is not a device name torch knows; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise UnsupportedError(f"device {device!r} is not supported: ocula runs on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support (a CPU-only wheel)" if torch.version.cuda is None
                   else "torch sees no CUDA GPU on this machine")
            raise UnsupportedError(f"device {device!r} asked for, but {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UnsupportedError(f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    return dev


def load(
    model: str | os.PathLike,
    mmproj: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    n_ctx: int | None = None,
    threads: int | None = None,
    kernels: str = "auto",
    kv_dtype: str | torch.dtype | None = None,
) -> "Model":
    """Load a GGUF text model (and optionally its mmproj vision projector).

    kernels: how linear layers read the GGUF blocks (ocula.quant.kernels): "auto" (exact for
    float32; for other dtypes 8-bit-activation decode kernels: ggml's when ggml-python is installed,
    else ocula's own "q8", and "q16" for ffn_down), "exact", "q8" (lossy; x86 CPUs with AVX2 or
    AVX-512 VNNI; on AVX2 its prompts' matmuls take a 16-bit-activation GEMM),
    "q16" (16-bit activations, about bfloat16's rounding; AVX2 CPUs), "ggml" (lossy,
    needs ocula[fast]) or "torch" (reference tile dequantization).
    kv_dtype: the KV cache's dtype (default: the compute dtype); "float16" or "bfloat16" halve it
    (llama.cpp's default is float16) at the cost of rounding every cached key and value."""
    if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, numbers.Integral) or n_ctx < 0):
        raise RequestError(f"n_ctx must be a positive number of tokens (0 or None: the model's own context), "
                           f"got {n_ctx!r}")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
            raise RequestError(f"threads must be a whole number >= 1, got {threads!r}")
        torch.set_num_threads(int(threads))
    return Model(model, mmproj, dtype=resolve_dtype(dtype), device=device, n_ctx=None if n_ctx is None else int(n_ctx),
                 kernels=kernels, kv_dtype=None if kv_dtype is None else resolve_dtype(kv_dtype, "kv_dtype"))


class Model:
    def __init__(self, path, mmproj=None, *, dtype=torch.float32, device=None, n_ctx=None, kernels="auto",
                 kv_dtype=None):
        t0 = time.perf_counter()
        check_mode(kernels)
        self.device = resolve_device(device)
        self.dtype = dtype
        self.gguf = GGUFFile(path)
        self.text = build_text_model(self.gguf)
        with load_progress(self.gguf) as progress:
            # MoE files only: a dense model's first prompt touches every weight anyway, an MoE model's first
            # prompts fault its experts in page by page over many requests
            populated = (self.device.type == "cpu" and self.text.cfg.moe is not None
                         and fits_in_memory(self.gguf.file_size) and self.gguf.populate(progress))
            load_gguf_weights(self.text, self.gguf, dtype=dtype, device=self.device,
                              aliases=self.text.weight_aliases(), progress=None if populated else progress)
        self.text.eval()
        self.text.kv_dtype = kv_dtype
        self.kernels = use_kernels(self.text, dtype, kernels)  # Counter: backend -> number of layers
        self.tokenizer = Tokenizer.from_metadata(self.gguf.metadata)
        self.template = ChatTemplate(
            self.gguf.get("tokenizer.chat_template"), self.tokenizer.bos_token, self.tokenizer.eos_token,
            self.architecture,
        )
        self.gguf.release_arrays()  # the tokenizer keeps what it needs of the vocabulary
        self.vision = None
        if mmproj is not None:
            from ocula.engine.multimodal import VisionRuntime
            from ocula.models.vision import build_vision_model

            from ocula.models.vision.pairing import check_pairing

            vision = build_vision_model(mmproj, self.text.cfg.n_embd, dtype=dtype, device=self.device)
            check_pairing(vision.cfg.projector_type, vision.gguf.path.name, self.gguf,
                          lambda token: self.tokenizer.token_id(token) is not None, vision.cfg)
            self.kernels += use_kernels(vision, dtype, kernels)
            self.vision = VisionRuntime(vision, self.tokenizer, self.text.cfg)
        self.engine = Engine(self.text, self.tokenizer, n_ctx=n_ctx)
        release_free_memory()
        self.load_ms = (time.perf_counter() - t0) * 1000

    # ------------------------------------------------------------ info

    @property
    def architecture(self) -> str:
        return self.gguf.architecture

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def has_chat_template(self) -> bool:
        """Whether the GGUF carries a chat template (without one, chat() wraps messages in the architecture's
        fallback format: Gemma's turns for Gemma, else ChatML; base models are better run with generate())."""
        return not self.template.is_fallback

    @property
    def supports_images(self) -> bool:
        return self.vision is not None

    def __repr__(self) -> str:
        return f"ocula.Model({self.gguf.path.name!r}, arch={self.architecture!r}, vision={self.supports_images})"

    # ------------------------------------------------------------ tokens

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: list[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return self.template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    # ------------------------------------------------------------ prompts

    def build_prompt(self, messages: list[dict], timings: Timings | None = None,
                     image_min_tokens: int | None = None, image_max_tokens: int | None = None,
                     media_policy=None, max_images: int | None = None, video_options: dict | None = None,
                     video_limits=None, image_limit=None, **template_kwargs) -> Prompt:
        """Render the chat template and turn the conversation into decoder input (images and videos encoded).
        `video_options`: the HF video processor's keywords (fps, num_frames, do_sample_frames, min_frames,
        max_frames, size, min_pixels, max_pixels, cap_pixels_per_frame) and max_tokens (default: the context size;
        ocula.engine.video_prompt). `image_limit`
        (an ImageTokenLimit) refuses images needing too many tokens before any is encoded."""
        videos = []
        if self.vision is not None and video_prompt.has_video(messages):
            # a clip that cannot fit the context is refused before its frames are decoded
            video_options = {"max_tokens": self.n_ctx, **(video_options or {})}
            if self.supports_native_video:
                messages, videos = video_prompt.take_video_parts(messages)
            else:
                messages = video_prompt.frames_as_images(messages, media_policy, video_options, video_limits)
        if max_images is not None:  # a clip's frames (other families) do not count as images sent
            max_images += sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                              for p in m["content"] if isinstance(p, dict) and p.get("video_frame"))
        text = self.apply_chat_template(messages, **template_kwargs)
        if self.vision is not None:
            options = ImageOptions(image_min_tokens, image_max_tokens)
            return self.vision.build_prompt(text, messages, timings, options, media_policy, max_images,
                                            videos, video_options, video_limits, image_limit)
        from ocula.text.chat import image_parts

        if image_parts(messages) or video_prompt.has_video(messages):
            raise RequestError(
                f"{self.gguf.path.name} is a text-only model: images and videos need a vision projector (load it "
                "with mmproj=...)"
            )
        return self._text_prompt(text, add_special=False)

    def _text_prompt(self, text: str, add_special: bool = True) -> Prompt:
        # Templates write BOS themselves; avoid a second one.
        ids = self.tokenizer.encode(text, add_special=add_special)
        return Prompt.from_tokens(ids, self.text.cfg.is_mrope)

    def prompt_token_ids(self, messages: list[dict], **image_options) -> list[int]:
        """Prompt ids with each image's (and video's) placeholder expanded as the HF processor does."""
        return self.build_prompt(messages, **image_options).token_ids

    def encode_image(self, image, *, deepstack: bool = False, image_min_tokens: int | None = None,
                     image_max_tokens: int | None = None):
        """Projector output [n_tokens, n_embd] that replaces the image's placeholder tokens.

        With deepstack=True returns (features, [per-layer deepstack features]) (Qwen3-VL; [] otherwise).
        """
        if self.vision is None:
            raise RequestError(f"{self.gguf.path.name} has no vision projector: load it with mmproj=...")
        _, enc = self.vision.encode(image, ImageOptions(image_min_tokens, image_max_tokens))
        return (enc.features, list(enc.deepstack or [])) if deepstack else enc.features

    @property
    def supports_video(self) -> bool:
        """Whether chats take video parts: a vision projector, and PyAV to decode clips."""
        if self.vision is None:
            return False
        import importlib.util

        return importlib.util.find_spec("av") is not None

    @property
    def supports_native_video(self) -> bool:
        """Whether the projector takes clips itself (Qwen2/2.5/3-VL); other families get frames as images."""
        return self.vision is not None and getattr(self.vision.vision, "temporal", 1) == 2

    def encode_video(self, video, *, video_options: dict | None = None, deepstack: bool = False):
        """Projector output [n_tokens, n_embd] for a clip (path, URL, bytes, frames or a video part), slot by slot
        (Qwen2/2.5/3-VL). With deepstack=True returns (features, [per-layer deepstack features])."""
        if self.vision is None:
            raise RequestError(f"{self.gguf.path.name} has no vision projector: load it with mmproj=...")
        if not self.supports_native_video:
            raise RequestError(f"{self.vision.vision.cfg.projector_type!r} has no video encoder: its chats take a "
                               "clip as sampled frames (images), see encode_image")
        _, enc = video_prompt.encode_video(self.vision, video, video_options)
        return (enc.features, list(enc.deepstack or [])) if deepstack else enc.features

    def _as_prompt(self, source) -> Prompt:
        if isinstance(source, Prompt):
            return source
        if isinstance(source, str):
            return self._text_prompt(source)
        if isinstance(source, (list, tuple)) and all(isinstance(t, int) for t in source):
            bad = [t for t in source if not 0 <= t < self.text.cfg.n_vocab]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.text.cfg.n_vocab - 1})")
            return Prompt.from_tokens(list(source), self.text.cfg.is_mrope)
        if isinstance(source, (list, tuple)):
            return self.build_prompt(list(source))
        raise RequestError("expected chat messages, a list of token ids or a prompt string")

    # ------------------------------------------------------------ running

    def logits(self, messages_or_token_ids, **image_options) -> torch.Tensor:
        """float32 logits [vocab] at the last position of a conversation or token-id list."""
        source = messages_or_token_ids
        if isinstance(source, (list, tuple)) and source and isinstance(source[0], dict):
            prompt = self.build_prompt(list(source), **image_options)
        else:
            prompt = self._as_prompt(source)
        return self.engine.prompt_logits(prompt).float().cpu()

    def chat(self, messages: list[dict], *, stream: bool = False, image_min_tokens: int | None = None,
             image_max_tokens: int | None = None, response_format: dict | None = None,
             video_options: dict | None = None, tools: list[dict] | None = None, tool_choice: Any = None,
             parallel_tool_calls: bool | None = None, chat_template_kwargs: dict | None = None,
             **sampling: Any) -> Result | Iterator[Chunk]:
        """Answer a conversation. `response_format` is OpenAI's: {"type": "json_object"} or
        {"type": "json_schema", "json_schema": {"schema": {...}}} constrains the answer to that JSON.

        `tools` / `tool_choice` / `parallel_tool_calls` are OpenAI's: the tools go into the chat template, and
        the Result's `parsed` (ocula.engine.tool_calls.ParsedAnswer) holds the answer's text, reasoning and
        tool calls; "required" or a named function forces a valid call. `chat_template_kwargs` go to the
        template (e.g. {"enable_thinking": False})."""
        from ocula.engine.tool_calls import ToolPlan
        from ocula.engine.tool_parse import parse_answer

        plan = ToolPlan.create(tools, tool_choice, self.template.source, parallel_tool_calls)
        if stream and plan.active:
            raise UnsupportedError("chat(stream=True) with tools is not supported; stream through the server, "
                                   "or call without stream and read result.parsed")
        messages = plan.history(messages)
        kwargs = {**(chat_template_kwargs or {}), **plan.template_kwargs()}
        thinking = "<think>" in self.template.source and \
            self.apply_chat_template(messages, **kwargs).rstrip().endswith("<think>")
        constraint = self.response_constraint(response_format)
        grammar = plan.grammar(close_think=thinking, tokenizer=self.tokenizer)
        from ocula.engine.structured import available, structured_for

        if plan.mode == "auto" and not available():
            grammar = None  # without llguidance, auto calls are only parsed
        if constraint is None and grammar is not None:
            constraint = structured_for(self).for_lark(grammar, "the tool schema")
        timings = Timings()
        prompt = self.build_prompt(messages, timings, image_min_tokens, image_max_tokens,
                                   video_options=video_options, **kwargs)
        result = self._run(prompt, stream, timings, sampling, constraint)
        if not stream:
            result.parsed = parse_answer(result.text, plan, in_reasoning=thinking)
        return result

    def generate(self, prompt: str | list[int], *, stream: bool = False, response_format: dict | None = None,
                 **sampling: Any) -> Result | Iterator[Chunk]:
        """Complete a raw prompt (no chat template). A string gets BOS as the GGUF says."""
        constraint = self.response_constraint(response_format)
        return self._run(self._as_prompt(prompt), stream, Timings(), sampling, constraint)

    def response_constraint(self, response_format: dict | None):
        """A grammar Constraint for an OpenAI `response_format` (None for free text); needs llguidance."""
        if response_format is None:
            return None
        from ocula.engine.structured import structured_for

        return structured_for(self).constraint(response_format)

    def _run(self, prompt: Prompt, stream: bool, timings: Timings, sampling: dict, constraint=None):
        params = sampling_params(sampling)
        if stream:
            return self.engine.stream(prompt, params, timings, constraint)
        return self.engine.run(prompt, params, timings, constraint)


@contextlib.contextmanager
def load_progress(f: GGUFFile):
    """A byte progress bar on stderr for big files loaded interactively; otherwise no bar."""
    if f.file_size < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=f.file_size, unit="B", unit_scale=True, desc=f"loading {f.path.name}", leave=False) as bar:
        yield bar.update


def fits_in_memory(n_bytes: int) -> bool:
    """Whether a file of n_bytes fits in 80% of the memory the kernel can give (MemAvailable) and
    populating it at load is not switched off (OCULA_POPULATE=0): then ocula.load maps a whole MoE model
    file in at once (GGUFFile.populate) instead of page by page during the first prompts."""
    if os.environ.get("OCULA_POPULATE", "1") == "0":
        return False
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return False
    return n_bytes <= 0.8 * available


def release_free_memory() -> None:
    """Hand the heap freed by loading (vocabulary lists, merge tables) back to the OS."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def sampling_params(options: dict) -> SamplingParams:
    """Build SamplingParams from keyword options; unknown names are an error, not silently dropped."""
    options = dict(options)
    if "max_completion_tokens" in options:
        options["max_tokens"] = options.pop("max_completion_tokens")
    if "temp" in options:
        options["temperature"] = options.pop("temp")
    allowed = set(SamplingParams.__dataclass_fields__)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise RequestError(f"unknown generation option(s): {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    options = {k: v for k, v in options.items() if v is not None}
    return SamplingParams(**options)
