"""Tokenizers rebuilt from a GGUF's `tokenizer.ggml.*` metadata.

Two vocabulary families are supported:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE with the file's merges, on HF `tokenizers`. Text
  is split by the regexes llama.cpp uses for ``tokenizer.ggml.pre`` (qwen2, llama3/llama-bpe, smollm,
  gpt2, ...), then byte-mapped and merged.
* ``tokenizer.ggml.model == "llama"``: SentencePiece-style BPE with byte fallback (Llama-2, Gemma),
  encoded by ``ocula.text.spm`` from the scores (the file has no merges) exactly as HF `tokenizers` does
  with the merges transformers' GGUF converter derives, which reproduces llama.cpp's score-driven
  SPM merging. Spaces become ``▁``; with ``add_space_prefix`` (the default) a ``▁`` is prepended to
  every stretch of text, including after special tokens (Llama-2 "legacy" behaviour).

Tokens typed control (3), unknown (2) or user-defined (4) are whole-match tokens (longest match
first): control and unknown ones are "special" (only matched when ``parse_special=True``),
user-defined ones are always matched, as in llama.cpp. Decoding is done here from per-token byte
pieces so it can stream.

Known deviations from llama.cpp, all chosen to match the HF reference tokenizers:
* SPM text that already starts with a space gets no second ``▁`` (HF ``Metaspace``; llama.cpp and
  sentencepiece would produce ``▁▁``).
* qwen2-family pre-tokenizers apply Unicode NFC first, as the original Qwen ``tokenizer.json`` does.
"""
from __future__ import annotations

import functools
import logging
import operator
import threading
from typing import Any, Sequence

from ocula.errors import GGUFError, RequestError, UnsupportedError
from ocula.text.spm import SpmEncoder

log = logging.getLogger(__name__)

# token types (llama.cpp / gguf)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# ----------------------------------------------------------------------------- pre-tokenizer regexes

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35_SPLIT = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SEED_CODER_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BLOOM_SPLIT = r" ?[^(\s|.,!?…。，、।۔،)]+"
DEEPSEEK_LLM_SPLITS = (
    r"[\r\n]",
    # cased letters (escaped: editors must not NFC-normalize them)
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-"
    "\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-"
    "\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113"
    "\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149"
    "\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-"
    "\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
)
DEEPSEEK_CODER_SPLITS = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}")
DEEPSEEK3_SPLITS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
FALCON_SPLITS = (
    r"[\p{P}\$\+<=>\^~\|`]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"[0-9][0-9][0-9]",
)

# pre name -> (regex list applied in sequence, NFC normalize, ignore_merges, default add_bos)
_PRE: dict[str, tuple[tuple[str, ...], bool, bool, bool]] = {}


def _register(names: str, splits: tuple[str, ...], nfc: bool = False, ignore_merges: bool = False,
              add_bos: bool = False) -> None:
    for name in names.split():
        _PRE[name] = (splits, nfc, ignore_merges, add_bos)


_register("default gpt2 gpt-2 phi-2 mpt olmo jais trillion granite-docling exaone4 jina-es jina-de gigachat "
          "jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert roberta-bpe jina-v1-en jina-v2-code", (GPT2_SPLIT,))
_register("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
          (LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_register("dbrx smaug-bpe glm4 chatglm-bpe", (LLAMA3_SPLIT,))
_register("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez", (QWEN2_SPLIT,), nfc=True)
_register("stablelm2 hunyuan solar-open grok-2", (QWEN2_SPLIT,))
_register("qwen35", (QWEN35_SPLIT,), nfc=True)
_register("smollm starcoder refact command-r codeshell exaone minerva-7b mellum2", (r"\p{N}", GPT2_SPLIT))
_register("tekken", (TEKKEN_SPLIT,), ignore_merges=True, add_bos=True)
_register("gpt-4o llama4 kanana2 talkie minimax-m2", (GPT4O_SPLIT,))
_register("seed-coder", (SEED_CODER_SPLIT,))
_register("poro-chat bloom gpt3-finnish", (BLOOM_SPLIT,))
_register("deepseek-llm", DEEPSEEK_LLM_SPLITS)
_register("deepseek-coder", DEEPSEEK_CODER_SPLITS)
_register("deepseek-v3 hunyuan-dense joyai-llm hy_v4", DEEPSEEK3_SPLITS)
_register("falcon", FALCON_SPLITS)

SUPPORTED_PRE = tuple(sorted(_PRE))

# texts of tokens that end a turn (llama.cpp's end-of-generation list)
_EOT_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "<|end_of_text|>", "<end_of_utterance>",
    "<｜end▁of▁sentence｜>",
])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}


def _byte_token_value(text: str) -> int | None:
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        try:
            return int(text[3:5], 16)
        except ValueError:
            return None
    return None


class Tokenizer:
    """Encode/decode text with the vocabulary a GGUF file describes."""

    def __init__(self, *, hf_tokenizer=None, spm: SpmEncoder | None = None, model: str, pre: str | None,
                 tokens: Sequence[str], types: bytes, bos_id: int | None, eos_id: int | None, eot_ids: set[int],
                 add_bos: bool, add_eos: bool, add_space_prefix: bool, added: dict[str, int]):
        self._hf = hf_tokenizer  # gpt2 vocabularies
        self._spm = spm  # llama (sentencepiece) vocabularies
        self.model = model
        self.pre = pre
        self._tokens = tokens
        self._types = types  # one byte per token
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.eot_ids = eot_ids
        self.add_bos, self.add_eos = add_bos, add_eos
        self.add_space_prefix = add_space_prefix
        self.bos_token = tokens[bos_id] if bos_id is not None else ""
        self.eos_token = tokens[eos_id] if eos_id is not None else ""
        self._added = added
        self._vocab: dict[str, int] | None = None
        self._pieces: list[bytes | None] = [None] * len(tokens)
        self._lock = threading.Lock()

    StreamDecoder: type  # set below

    # ------------------------------------------------------------------ building

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        from ocula.gguf import GGUFFile

        return cls.from_metadata(GGUFFile(path).metadata)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> "Tokenizer":
        def require(key: str):
            if key not in metadata:
                raise GGUFError(f"tokenizer metadata key {key!r} is missing")
            return metadata[key]

        model = require("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise UnsupportedError(
                f"tokenizer model {model!r} (tokenizer.ggml.model) is not supported; ocula supports 'gpt2' and 'llama'"
            )
        tokens = require("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens[:16]):
            raise GGUFError("tokenizer.ggml.tokens is empty or not a list of strings")
        n = len(tokens)
        types = metadata.get("tokenizer.ggml.token_type")
        if types is None:
            types = [BYTE if model == "llama" and _byte_token_value(t) is not None else NORMAL for t in tokens]
        elif len(types) != n:
            raise GGUFError(f"tokenizer.ggml.token_type has {len(types)} entries but there are {n} tokens")
        # one byte per token; a type outside 0..255 is no known type either way
        types = bytearray(t if 0 <= t < 256 else 0 for t in map(int, types))

        def token_id_key(name: str) -> int | None:
            v = metadata.get(f"tokenizer.ggml.{name}_token_id")
            if v is None:
                return None
            v = int(v)
            if not 0 <= v < n:
                log.warning("tokenizer.ggml.%s_token_id = %d is outside the vocabulary (%d tokens); ignored",
                            name, v, n)
                return None
            return v

        bos_id, eos_id, unk_id = token_id_key("bos"), token_id_key("eos"), token_id_key("unknown")
        # without token types, the ids the file names are still special
        if metadata.get("tokenizer.ggml.token_type") is None:
            for i in (bos_id, eos_id, unk_id, token_id_key("padding")):
                if i is not None:
                    types[i] = CONTROL

        pre = metadata.get("tokenizer.ggml.pre")
        add_space_prefix = False
        hf = spm = None
        if model == "gpt2":
            hf, vocab, default_bos = _byte_level_bpe(metadata, tokens, pre)
            last_id = vocab.get
        else:  # llama: sentencepiece BPE
            scores = require("tokenizer.ggml.scores")
            if len(scores) != n:
                raise GGUFError(f"tokenizer.ggml.scores has {len(scores)} entries but there are {n} tokens")
            default_bos = True
            add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
            spm = SpmEncoder(tokens, types, scores, unk_id=unk_id, add_space_prefix=add_space_prefix,
                             remove_extra_whitespaces=bool(metadata.get("tokenizer.ggml.remove_extra_whitespaces")))
            last_id = spm.token_id

        # whole-match tokens: control/unknown ones only when parsing specials, user-defined always
        added: dict[str, int] = {}
        special: set[str] = set()
        for i, ty in enumerate(types):
            t = tokens[i]
            if ty in (CONTROL, UNKNOWN, USER_DEFINED) and t:
                if last_id(t) != i:  # duplicate spelling: the later id owns the text
                    continue
                added[t] = i
                if ty != USER_DEFINED:
                    special.add(t)
        if spm is not None:
            spm.set_added_tokens(added, special)
        else:
            _add_whole_match_tokens(hf, added, special)

        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        if add_bos and bos_id is None:
            log.warning("tokenizer.ggml.add_bos_token is set but there is no bos_token_id; no BOS will be added")
            add_bos = False
        if add_eos and eos_id is None:
            log.warning("tokenizer.ggml.add_eos_token is set but there is no eos_token_id; no EOS will be added")
            add_eos = False

        eot_ids = {i for i in (eos_id, token_id_key("eot"), token_id_key("eom")) if i is not None}
        for t in _EOT_TEXTS:
            i = last_id(t)
            if i is not None:  # llama.cpp goes by the text whatever the type
                eot_ids.add(i)

        # sentencepiece: token texts from the encoder's compact table, so the metadata list can go
        return cls(hf_tokenizer=hf, spm=spm, model=model, pre=pre, tokens=spm.table if spm else tokens,
                   types=bytes(types),
                   bos_id=bos_id, eos_id=eos_id, eot_ids=eot_ids, add_bos=add_bos, add_eos=add_eos,
                   add_space_prefix=add_space_prefix, added=added)

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. `add_special` adds BOS/EOS as the file asks; with `parse_special` control
        tokens written in the text (e.g. "<|im_start|>") become their ids, otherwise they are plain text."""
        if not isinstance(text, str):
            raise RequestError(f"can only tokenize a string, not {type(text).__name__}")
        ids: list[int] = []
        if text and self._spm is not None:
            ids = self._spm.encode(text, parse_special)
        elif text:
            # `encode_special_tokens` is a flag on the shared HF tokenizer: hold the lock while it is set
            with self._lock:
                if parse_special:
                    ids = self._hf.encode(text, add_special_tokens=False).ids
                else:
                    self._hf.encode_special_tokens = True
                    try:
                        ids = self._hf.encode(text, add_special_tokens=False).ids
                    finally:
                        self._hf.encode_special_tokens = False
        if add_special:
            if self.add_bos:
                ids = [self.bos_id] + ids
            if self.add_eos:
                ids = ids + [self.eos_id]
        return ids

    def encode_exact(self, text: str) -> list[int]:
        """Ids whose bytes (`token_to_bytes`) are exactly `text`'s UTF-8: no SentencePiece space prefix or
        whitespace clean-up, control tokens as plain text. What a grammar engine needs to tokenize the text
        it forces; `encode` would put the prefix's space in front of it."""
        if not isinstance(text, str):
            raise RequestError(f"can only tokenize a string, not {type(text).__name__}")
        if self._spm is not None:
            return self._spm.encode(text, parse_special=False, exact=True) if text else []
        return self.encode(text, add_special=False, parse_special=False)

    def token_id(self, text: str) -> int | None:
        """Id of a special or added token (or any vocabulary entry) spelled exactly `text`."""
        i = self._added.get(text)
        if i is not None:
            return i
        if self._spm is not None:
            return self._spm.token_id(text)
        if self._vocab is None:
            self._vocab = {t: i for i, t in enumerate(self._tokens)}
        return self._vocab.get(text)

    def is_special(self, id: int) -> bool:
        """Control or unknown tokens: the ones `skip_special` drops."""
        return self._types[id] in (CONTROL, UNKNOWN)

    # ------------------------------------------------------------------ decoding

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes one token spells (control tokens: their text): a text of n bytes takes at least
        n / max_token_bytes tokens, a bound that needs no tokenizing."""
        return max((len(self.token_to_bytes(i)) for i in range(self.vocab_size)), default=1) or 1

    def token_to_bytes(self, id: int) -> bytes:
        """The bytes one token stands for in decoded text (control tokens: their text)."""
        try:
            id = operator.index(id)
        except TypeError:
            raise RequestError(f"token id {id!r} is not an integer") from None
        if not 0 <= id < self.vocab_size:
            raise RequestError(f"token id {id!r} is outside the vocabulary (0..{self.vocab_size - 1})")
        piece = self._pieces[id]
        if piece is None:
            piece = self._pieces[id] = self._make_piece(id)
        return piece

    def _make_piece(self, id: int) -> bytes:
        text, ty = self._tokens[id], self._types[id]
        if ty in (CONTROL, UNKNOWN, USER_DEFINED):
            return text.encode("utf-8")
        if self.model == "gpt2":
            dec = _BYTE_DECODER
            try:
                return bytes(dec[c] for c in text)
            except KeyError:
                return text.encode("utf-8")
        if ty == BYTE:
            b = _byte_token_value(text)
            if b is not None:
                return bytes([b])
        return text.replace("▁", " ").encode("utf-8")

    def token_to_piece(self, id: int) -> str:
        """Text of one token as it appears in decoded text (a partial UTF-8 byte shows as U+FFFD)."""
        return self.token_to_bytes(id).decode("utf-8", errors="replace")

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Text of `ids`. `skip_special` drops control tokens. For sentencepiece vocabularies with a
        dummy prefix, the one leading space it stands for is removed (as HF does)."""
        parts = []
        types = self._types
        for i in ids:
            piece = self.token_to_bytes(i)
            i = operator.index(i)
            if skip_special and types[i] in (CONTROL, UNKNOWN):
                continue
            parts.append(piece)
        text = b"".join(parts).decode("utf-8", errors="replace")
        if self.add_space_prefix and text.startswith(" "):
            text = text[1:]
        return text

    def stream_decoder(self, skip_special: bool = True, strip_leading_space: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special, strip_leading_space=strip_leading_space)

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_token!r}, eos={self.eos_token!r})")


def _byte_level_bpe(metadata: dict[str, Any], tokens: list[str], pre: str | None):
    """HF tokenizer for a gpt2-type vocabulary, its text -> id map and the pre-tokenizer's default add_bos."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import normalizers, pre_tokenizers
    from tokenizers.models import BPE

    if "tokenizer.ggml.merges" not in metadata:
        raise GGUFError("tokenizer metadata key 'tokenizer.ggml.merges' is missing")
    if pre is None or pre not in _PRE:
        log.warning("tokenizer pre-tokenizer %r is unknown; using the GPT-2 split (tokens may differ from "
                    "the original tokenizer)", pre)
        splits, nfc, ignore_merges, default_bos = (GPT2_SPLIT,), False, False, False
    else:
        splits, nfc, ignore_merges, default_bos = _PRE[pre]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for m in metadata["tokenizer.ggml.merges"]:
        a, sep, b = m.partition(" ")
        if not sep:
            raise GGUFError(f"tokenizer.ggml.merges entry {m!r} is not two tokens separated by a space")
        merges.append((a, b))
    try:
        bpe = BPE(vocab, merges, ignore_merges=ignore_merges)
    except Exception as e:  # noqa: BLE001 - e.g. a merge naming a token the vocabulary lacks
        raise GGUFError(f"tokenizer.ggml.merges does not fit tokenizer.ggml.tokens ({e})") from None
    hf = HFTokenizer(bpe)
    if nfc:
        hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    return hf, vocab, default_bos


def _add_whole_match_tokens(hf, added: dict[str, int], special: set[str]) -> None:
    from tokenizers import AddedToken

    specials = [AddedToken(t, special=True, normalized=False) for t in added if t in special]
    plain = [AddedToken(t, special=False, normalized=False) for t in added if t not in special]
    if specials:
        hf.add_special_tokens(specials)
    if plain:
        hf.add_tokens(plain)


def _incomplete_tail(buf: bytes | bytearray) -> int:
    """How many bytes at the end of `buf` start a UTF-8 character that is not complete yet."""
    n = len(buf)
    for back in range(1, min(4, n) + 1):
        b = buf[n - back]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        if b >= 0xF0:
            need = 4
        elif b >= 0xE0:
            need = 3
        elif b >= 0xC0:
            need = 2
        else:
            need = 1
        return back if need > back else 0
    return 0


class StreamDecoder:
    """Incremental detokenizer: `add(id)` returns the text that became complete, holding back the
    bytes of an unfinished UTF-8 character; `flush()` returns what is left (invalid bytes as U+FFFD).

    By default control tokens are skipped (the text a user sees) and the leading space of the first
    piece is kept, because generated tokens continue a prompt.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True, strip_leading_space: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._strip = strip_leading_space and tokenizer.add_space_prefix
        self._buf = bytearray()
        self.text = ""  # everything returned so far

    def add(self, id: int) -> str:
        tok = self.tokenizer
        piece = tok.token_to_bytes(id)
        if self.skip_special and tok.is_special(operator.index(id)):
            return ""
        self._buf += piece
        hold = _incomplete_tail(self._buf)
        if hold == len(self._buf):
            return ""
        if hold:
            ready, self._buf = bytes(self._buf[:-hold]), bytearray(self._buf[-hold:])
        else:
            ready, self._buf = bytes(self._buf), bytearray()
        return self._emit(ready.decode("utf-8", errors="replace"))

    def add_many(self, ids) -> str:
        return "".join(self.add(i) for i in ids)

    def flush(self) -> str:
        ready, self._buf = bytes(self._buf), bytearray()
        return self._emit(ready.decode("utf-8", errors="replace")) if ready else ""

    def _emit(self, s: str) -> str:
        if self._strip and s:
            if s.startswith(" "):
                s = s[1:]
            self._strip = False
        self.text += s
        return s


Tokenizer.StreamDecoder = StreamDecoder
