"""Constrained decoding for OpenAI `response_format` (JSON object / JSON schema) with llguidance.

    constraint = structured_for(model).constraint({"type": "json_schema", "json_schema": {"schema": {...}}})
    # per decoding step:
    logits = constraint.mask(logits)      # tokens the grammar forbids get -inf
    token = sampler(logits, history)
    constraint.accept(token)              # advance the grammar; constraint.finished: nothing more may follow

The token vocabulary is handed to llguidance as the exact byte string of every token (`Tokenizer.token_to_bytes`),
and the text it forces is tokenized to exactly its bytes (`Tokenizer.encode_exact`: no SentencePiece space
prefix), so the mask is right for both byte-level BPE and SentencePiece vocabularies; control tokens are marked special
(llguidance never lets them into JSON text) and the end-of-turn ids are its EOS tokens, allowed once the JSON is
complete. Building that vocabulary view takes about a second for a 150k vocabulary: it is built once per model,
lazily, and shared by every request (matchers are per sequence).
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Any

import numpy as np
import torch

from ocula.errors import OculaError, RequestError

try:  # optional: `pip install 'ocula[server]'`
    import llguidance
except ImportError:  # pragma: no cover - exercised only without the extra
    llguidance = None

log = logging.getLogger("ocula.structured")
# Compact JSON ("a":1,"b":2): no free whitespace, so a weak model cannot wander off into endless blanks.
JSON_OPTIONS = {"whitespace_flexible": False}
MAX_SCHEMA_CHARS = 256 * 1024


class ConstraintError(OculaError):
    """The grammar rejected a token it had allowed (a bug in masking), or the matcher failed."""


def _failure(detail: str | None) -> ConstraintError:
    """A ConstraintError whose message a client may see: llguidance's first line, without its parser state,
    token dumps or a Rust backtrace (those go to the log)."""
    detail = detail or "token rejected"
    log.warning("constrained decoding failed: %s", detail)
    first = detail.split("<backtrace>")[0].split("<state>")[0].strip().splitlines()
    first = first[0] if first else "token rejected"
    return ConstraintError(f"constrained decoding failed: {first[:200]}")


def available() -> bool:
    return llguidance is not None


def schema_from_response_format(response_format: Any) -> dict | None:
    """OpenAI `response_format` → the JSON schema to enforce, or None for free text.

    Accepts {"type": "text"}, {"type": "json_object"} (any JSON object; llama.cpp's optional "schema" key is
    honoured), and {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise RequestError("response_format must be an object such as {\"type\": \"json_object\"}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        if schema is None:
            return {"type": "object"}
        if not isinstance(schema, dict):
            raise RequestError("response_format.schema must be a JSON schema object")
        return schema
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise RequestError("response_format.json_schema must be an object with a 'schema' (and a 'name')")
        schema = spec.get("schema", {})
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            raise RequestError("response_format.json_schema.schema must be a JSON schema object")
        return schema
    raise RequestError(
        f"response_format.type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'"
    )


class Constraint:
    """One sequence's grammar state."""

    def __init__(self, matcher, n_vocab: int):
        self.matcher = matcher
        self.n_vocab = n_vocab
        self._bits = torch.zeros((n_vocab + 31) // 32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """Boolean [n_vocab]: tokens the grammar allows next."""
        m = self.matcher
        buf = self._bits
        m.unsafe_compute_mask_ptr(buf.data_ptr(), buf.numel() * buf.element_size())
        if m.is_error():
            raise _failure(m.get_error())
        bits = np.unpackbits(buf.numpy().view(np.uint8), bitorder="little")[: self.n_vocab]
        return torch.from_numpy(bits.astype(bool))

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [vocab] with every token the grammar forbids set to -inf (a new tensor)."""
        allowed = self.allowed().to(logits.device)
        n = min(allowed.shape[0], logits.shape[-1])
        out = torch.full_like(logits, float("-inf"))
        out[..., :n] = logits[..., :n].masked_fill(~allowed[:n], float("-inf"))
        return out

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise _failure(self.matcher.get_error())

    @property
    def finished(self) -> bool:
        """The grammar is complete and nothing else may follow (only end-of-turn)."""
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()


class _VocabView:
    """What llguidance.TokenizerWrapper reads: token bytes, EOS/BOS, special ids, and an encode callable."""

    def __init__(self, tokenizer, n_vocab: int):
        from ocula.text.tokenizer import CONTROL, UNKNOWN

        self._tok = tokenizer
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eot_ids, default=0)
        self.bos_token_id = tokenizer.bos_id
        tokens, special = [], []
        for i in range(tokenizer.vocab_size):
            b = tokenizer.token_to_bytes(i)
            if tokenizer._types[i] in (CONTROL, UNKNOWN):
                b = b"\xff" + b  # llguidance's marker for special tokens
                special.append(i)
            tokens.append(b)
        tokens += [b""] * max(0, n_vocab - len(tokens))  # padded embedding rows: never allowed
        self.tokens = tokens
        self.special_token_ids = special

    def __call__(self, s) -> list[int]:
        """Tokens spelling exactly `s` (llguidance tokenizes the text a grammar forces with it)."""
        if isinstance(s, (bytes, bytearray)):
            s = bytes(s).decode("utf-8", errors="replace")
        return self._tok.encode_exact(s)


class StructuredOutputs:
    """Per model: the llguidance vocabulary (built on first use) and a factory of per-request constraints."""

    def __init__(self, tokenizer, n_vocab: int):
        self.tokenizer = tokenizer
        self.n_vocab = n_vocab
        self._ll = None
        self._lock = threading.Lock()

    def lltokenizer(self):
        if llguidance is None:
            raise RequestError(
                "response_format needs the llguidance package, which is not installed: pip install 'ocula[server]'"
            )
        with self._lock:
            if self._ll is None:
                view = _VocabView(self.tokenizer, self.n_vocab)
                self._ll = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(view), n_vocab=len(view.tokens),
                    eos_token=sorted(self.tokenizer.eot_ids) or [view.eos_token_id],
                )
            return self._ll

    def constraint(self, response_format: Any) -> Constraint | None:
        """A fresh Constraint for `response_format`, None for free text; RequestError when it is unusable."""
        schema = schema_from_response_format(response_format)
        if schema is None:
            return None
        return self.for_schema(schema)

    def for_schema(self, schema: dict) -> Constraint:
        ll = self.lltokenizer()
        try:
            text = json.dumps(schema)
        except (TypeError, ValueError) as e:
            raise RequestError(f"response_format schema is not JSON-serializable: {e}") from None
        if len(text) > MAX_SCHEMA_CHARS:
            raise RequestError(f"response_format schema is too large ({len(text)} > {MAX_SCHEMA_CHARS} characters)")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        except Exception as e:  # noqa: BLE001 - llguidance raises ValueError/RuntimeError on bad input
            raise RequestError(f"response_format schema is not usable: {e}") from None
        try:
            matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
        except Exception as e:  # noqa: BLE001
            raise RequestError(f"response_format schema is not usable: {e}") from None
        if matcher.is_error():
            raise RequestError(f"response_format schema is not usable: {matcher.get_error()}")
        return Constraint(matcher, self.n_vocab)

    def for_lark(self, grammar: str, what: str = "grammar") -> Constraint:
        """A Constraint for a grammar in llguidance's lark syntax (e.g. a forced tool call)."""
        ll = self.lltokenizer()
        try:
            matcher = llguidance.LLMatcher(ll, llguidance.grammar_from("lark", grammar), log_level=0)
        except Exception as e:  # noqa: BLE001
            raise RequestError(f"{what} is not usable: {e}") from None
        if matcher.is_error():
            raise RequestError(f"{what} is not usable: {_failure(matcher.get_error())}")
        return Constraint(matcher, self.n_vocab)


_FACTORY_LOCK = threading.Lock()


def structured_for(model) -> StructuredOutputs:
    """The StructuredOutputs of an `ocula.Model` (created once, kept on the model)."""
    with _FACTORY_LOCK:
        so = getattr(model, "_structured", None)
        if so is None:
            so = model._structured = StructuredOutputs(model.tokenizer, model.text.cfg.n_vocab)
        return so
