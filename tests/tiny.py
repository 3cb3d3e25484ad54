"""Write tiny random GGUF models with the `gguf` writer, so tests run without any downloaded file."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from ocula.text.tokenizer import bytes_to_unicode

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"

# byte-level BPE vocabulary: the 256 byte symbols, a few merges, chat special tokens


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = [bytes_to_unicode()[b] for b in range(256)]
    for m in MERGES:
        tokens.append(m.replace(" ", ""))
    types = [1] * len(tokens)
    tokens += SPECIALS
    types += [3] * len(SPECIALS)
    return tokens, types, MERGES


def write_tiny_model(path: Path, arch: str = "llama", qtype: Q = Q.F32, n_embd: int = 64, n_layer: int = 2,
                     n_head: int = 4, n_head_kv: int = 2, n_ff: int = 128, seed: int = 0,
                     tied: bool = False, chat_template: str | None = None, skip_tensors: tuple[str, ...] = (),
                     bad_shapes: dict[str, tuple[int, ...]] | None = None) -> Path:
    """A runnable random model of `arch` (llama, qwen2, qwen3, gemma3) with a byte-level BPE tokenizer."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab()
    n_vocab = len(tokens)
    head_dim = n_embd // n_head
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == "gemma3":
        w.add_sliding_window(4)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(n_vocab - 3)
    w.add_eos_token_id(n_vocab - 1)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)

    def add(name: str, shape: tuple[int, ...], quant: Q = qtype, scale: float = 0.2):
        if name in skip_tensors:
            return
        shape = (bad_shapes or {}).get(name, shape)
        data = (rng.standard_normal(shape) * scale).astype(np.float32)
        if quant == Q.F32 or len(shape) == 1:
            w.add_tensor(name, data)
        elif quant == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            raw = gguf.quants.quantize(data, quant)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=quant)

    add("token_embd.weight", (n_vocab, n_embd), scale=1.0)
    add("output_norm.weight", (n_embd,))
    if not tied:
        add("output.weight", (n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (n_embd,))
        add(p + "attn_q.weight", (n_head * head_dim, n_embd))
        add(p + "attn_k.weight", (n_head_kv * head_dim, n_embd))
        add(p + "attn_v.weight", (n_head_kv * head_dim, n_embd))
        add(p + "attn_output.weight", (n_embd, n_head * head_dim))
        if arch == "qwen2":
            for t, n in (("q", n_head), ("k", n_head_kv), ("v", n_head_kv)):
                add(p + f"attn_{t}.bias", (n * head_dim,))
        if arch in ("qwen3", "gemma3"):
            add(p + "attn_q_norm.weight", (head_dim,))
            add(p + "attn_k_norm.weight", (head_dim,))
        add(p + "ffn_norm.weight", (n_embd,))
        add(p + "ffn_gate.weight", (n_ff, n_embd))
        add(p + "ffn_up.weight", (n_ff, n_embd))
        add(p + "ffn_down.weight", (n_embd, n_ff))
        if arch == "gemma3":
            add(p + "post_attention_norm.weight", (n_embd,))
            add(p + "post_ffw_norm.weight", (n_embd,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
