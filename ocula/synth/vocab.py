"""Tokenizer metadata: the real vocabulary copied from a fixture GGUF, or a byte-level BPE trained locally."""
from __future__ import annotations

import glob
import json
import os
import sysconfig
from pathlib import Path
from typing import Any

from ocula.synth.presets import TextSpec


def fixtures_dir() -> Path | None:
    """shared/fixtures/models beside the checkout (or $OCULA_FIXTURES)."""
    env = os.environ.get("OCULA_FIXTURES")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[2]
    candidates += [repo.parent / "shared" / "fixtures" / "models", Path("/work/shared/fixtures/models")]
    for c in candidates:
        if c.is_dir():
            return c
    return None


def _read_fixture_tokenizer(family: str) -> dict[str, Any] | None:
    root = fixtures_dir()
    if root is None:
        return None
    files = sorted(glob.glob(str(root / family / "*.gguf")))
    files = [f for f in files if not Path(f).name.startswith("mmproj")]
    if not files:
        return None
    from ocula.gguf import GGUFFile

    md = GGUFFile(files[0]).metadata
    return {k: v for k, v in md.items() if k.startswith("tokenizer.")}


SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}IMAGE_MARKUP{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# special tokens of the families whose vocabulary must be synthesized (fixtures absent)
SPECIALS = {
    "smolvlm": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
                + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]),
    "qwen": ([], ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<img>", "</img>",
                  "<IMG_CONTEXT>"]),
    "gemma": (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"],
              ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]),
}
IMAGE_MARKUP = {
    "qwen25vl": "<|vision_start|><|image_pad|><|vision_end|>", "qwen3vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "internvl": "<img><IMG_CONTEXT></img>", "gemma3": "<start_of_image>",
}


def _cache_dir() -> Path:
    d = Path(os.environ.get("OCULA_CACHE", Path.home() / ".cache" / "ocula")) / "synth"
    d.mkdir(parents=True, exist_ok=True)
    return d


def train_bpe(n_tokens: int) -> tuple[list[str], list[str]]:
    """A byte-level BPE of exactly `n_tokens` tokens (256 bytes + merges) trained on local Python
    source text; cached. Returns (tokens, merges) in GPT-2 byte-unicode form."""
    cache = _cache_dir() / f"bpe-{n_tokens}.json"
    if cache.exists():
        data = json.loads(cache.read_text())
        return data["tokens"], data["merges"]
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(root + "/**/*.py", recursive=True)
                   if "site-packages" not in f and "/test" not in f)

    def texts():
        total = 0
        for f in files:
            try:
                s = Path(f).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            total += len(s)
            yield s
            if total > 16_000_000:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=n_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    # the corpus may be too small to reach n_tokens: pad with merges of existing tokens
    have = set(tokens)
    i = 0
    while len(tokens) < n_tokens:
        a, b = tokens[256 + i % 4096], tokens[256 + (i * 7919) % 4096]
        i += 1
        if a + b not in have and " " not in a + b:
            tokens.append(a + b)
            merges.append(f"{a} {b}")
            have.add(a + b)
    cache.write_text(json.dumps({"tokens": tokens, "merges": merges}))
    return tokens, merges


def synth_bpe_tokenizer(n_vocab: int, family: str, n_base: int | None = None) -> dict[str, Any]:
    lead, added = SPECIALS[family]
    n_base = n_base or (n_vocab - len(added) - 8)
    tokens, merges = train_bpe(n_base - len(lead))
    toks = lead + tokens + added
    types = [3] * len(lead) + [1] * len(tokens) + [3] * len(added)
    while len(toks) < n_vocab:
        toks.append(f"[PAD{len(toks)}]")
        types.append(5)
    toks, types = toks[:n_vocab], types[:n_vocab]
    idx = {t: i for i, t in enumerate(toks)}
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": toks,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
    }
    if family == "smolvlm":
        md.update({"tokenizer.ggml.pre": "smollm", "tokenizer.ggml.bos_token_id": idx["<|im_start|>"],
                   "tokenizer.ggml.eos_token_id": idx["<end_of_utterance>"], "tokenizer.ggml.unknown_token_id": 0,
                   "tokenizer.ggml.padding_token_id": idx["<|im_end|>"], "tokenizer.chat_template": SMOLVLM_TEMPLATE})
    elif family == "qwen":
        md.update({"tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.bos_token_id": idx["<|endoftext|>"],
                   "tokenizer.ggml.eos_token_id": idx["<|im_end|>"],
                   "tokenizer.ggml.padding_token_id": idx["<|endoftext|>"]})
    else:  # gemma with a BPE vocabulary (the real one is SentencePiece)
        md.update({"tokenizer.ggml.pre": "default", "tokenizer.ggml.bos_token_id": idx["<bos>"],
                   "tokenizer.ggml.eos_token_id": idx["<end_of_turn>"], "tokenizer.ggml.padding_token_id": 0,
                   "tokenizer.ggml.add_bos_token": True})
    return md


def tokenizer_metadata(t: TextSpec) -> dict[str, Any]:
    if t.vocab.startswith("bpe:"):
        return synth_bpe_tokenizer(t.n_vocab, t.vocab[4:], t.n_vocab_base)
    md = _read_fixture_tokenizer(t.vocab)
    if md is not None and len(md.get("tokenizer.ggml.tokens", [])) == t.n_vocab:
        return md
    family = "gemma" if t.vocab == "gemma3" else "qwen"
    md = synth_bpe_tokenizer(t.n_vocab, family)
    md["tokenizer.chat_template"] = CHATML_TEMPLATE.replace("IMAGE_MARKUP", IMAGE_MARKUP[t.vocab])
    return md
