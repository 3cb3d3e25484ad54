#!/usr/bin/env python3
"""Build Hugging Face references for TEXT-ONLY prompts on the text models of the shared VLM fixtures.

One-off generator, NOT part of ocula's runtime or CI.  It needs `transformers` (tested with 5.24.0) and
`accelerate` next to the project's CPU torch; the shipped test (`tests/test_text_only_vlm.py`) only reads
the `.npz` files this writes to `tests/data/text_only/`.

The fixtures' own references (`../shared/fixtures/reference/*.npz`) all have an image in the prompt, so a
text-decoder bug could hide behind a vision bug (or vice versa).  These references exercise the text decoder
of every fixture architecture alone: qwen2vl, qwen25vl (GGUF arch qwen2vl, M-RoPE), qwen3vl (interleaved
M-RoPE, q/k norms), gemma3 (gemma3), internvl (qwen2), smolvlm and llava (llama).

How the HF model is obtained
----------------------------
* smolvlm, llava: the HF checkpoint shipped in `models/<m>/hf/` (full VLM class, float32, eager attention).
* the others (no HF checkpoint shipped): the full VLM class is built from `manifest.json → models[m].hf_config`
  (vision tower randomly initialised, unused for text), and the text model's weights are taken from the f16
  GGUF: `gguf.quants.dequantize` (f16 is exact), GGUF names mapped back to HF names, llama.cpp's q/k row
  permutation undone for `llama`-arch files, Gemma norm weights stored as 1+w in the GGUF → w = gguf - 1.

How the conversion is checked (all asserted; figures printed and stored in each npz under `checks`)
-------------------------------------------------------------------------------------------------------
1. **Image-case replay** — every fixture image case of the model is re-run through the HF VLM with the
   reference's own projector output fed in as precomputed image features (`mm_encoder_outputs`, plus the
   deepstack features for Qwen3-VL, the processor's grid/mm_token_type_ids for M-RoPE, token_type_ids for
   Gemma 3).  This reproduces the fixtures' `logits_last` from the GGUF text weights alone, so embeddings,
   every block, the final norm, the (tied) LM head and the VLM's position handling are all confirmed.
2. **transformers' own GGUF loader** where it supports the architecture (gemma3, qwen2 = internvl, llama =
   smolvlm/llava): its dequantized state dict must equal ours bit for bit and its text-only logits ours.
3. smolvlm/llava: the GGUF-mapped weights must equal the HF checkpoint's language-model weights bit for bit.
4. **Plain text LM**: with a text-only prompt the M-RoPE position ids are equal on all three axes, so the plain
   text LM class (Qwen2/Qwen3/Gemma3 text/Llama ForCausalLM) with the same weights must give the same logits.
5. Greedy: HF `generate` (EOS does not stop it) == a manual KV-cached loop == argmax of one uncached forward
   over prompt + continuation.
6. Tokenizers: the Qwen-family and Gemma 3 tokenizers come from the GGUF through transformers' GGUF tokenizer
   converter (no HF tokenizer is shipped for them); they must reproduce the text parts of the fixtures'
   HF-tokenized image prompts.  smolvlm/llava use the shipped HF tokenizer.

npz layout (`tests/data/text_only/<model>.npz`, k = 0 chat prompt, 1 raw text)
------------------------------------------------------------------------------
- `prompt_<k>`          str: the prompt string; `tokenize(prompt, add_special_tokens=False)` gives `input_ids_<k>`
                        (templates/raw texts that need BOS contain it literally).
- `messages_json_0`     str: the chat messages the chat prompt was rendered from (HF `apply_chat_template`
                        with the manifest's `chat_template_jinja`, add_generation_prompt=True).
- `raw_text_1`          str: the raw text without BOS; tokenizing it with the tokenizer's default special-token
                        handling (BOS only where the GGUF says add_bos_token) also gives `input_ids_1`.
- `input_ids_<k>`       int32 [L]
- `logits_last_<k>`     float32 [V]: logits at the last prompt position (V = config vocab size).
- `greedy_tokens_<k>`   int32 [16]: greedy continuation, EOS does not stop it.
- `greedy_margins_<k>`  float32 [16]: top1 - top2 logit at each greedy step.
- `greedy_text_<k>`     str: decoded continuation (for humans).
- `hf_class`, `checks` (json str), `versions` (str), `gguf_sha256` (str).

Usage
-----
    python3 scripts/make_text_only_references.py [--fixtures ../shared/fixtures] [--out tests/data/text_only]
        [--models qwen2vl gemma3 ...]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

MODELS = ["qwen2vl", "qwen25vl", "qwen3vl", "gemma3", "internvl", "smolvlm", "llava"]
CHAT_QUESTION = "Tell me about the history of Rome in two sentences."
# unicode (accents, Greek, Cyrillic, CJK, symbols), digits, punctuation, newlines, a tab; NFC-normalised so the
# reference does not depend on whether a tokenizer applies NFC (the Qwen GGUF tokenizer built by transformers
# does not, the original Qwen tokenizer does).
RAW_TEXT = (
    "Naïve café in Zürich sold 12,345 crêpes in 2024 — up 7.5%!\n"
    "Αθήνα, 東京 и Москва:\n"
    "\t1) 3.14159 ≈ π\n"
    "Next"
)
N_GREEDY = 16
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- utilities

def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def top2(logits: torch.Tensor) -> tuple[int, float]:
    v, i = torch.topk(logits.float(), 2)
    return int(i[0]), float(v[0] - v[1])


def max_abs(a, b) -> float:
    a = a.detach().float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float32)
    b = b.detach().float().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# --------------------------------------------------------------------------------- GGUF -> HF state dict

BLOCK_MAP = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GEMMA_BLOCK_MAP = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def unpermute_llama(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf `LlamaModel.permute` (rotary halves -> interleaved pairs)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_text_state_dict(path: Path) -> tuple[str, dict[str, torch.Tensor], bool]:
    """(GGUF architecture, {HF text-model name (without prefix) | 'lm_head.weight': float32 tensor}, tied)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = str(reader.fields["general.architecture"].contents())

    def meta(key):
        return reader.fields[f"{arch}.{key}"].contents()

    n_head, n_head_kv = int(meta("attention.head_count")), int(meta("attention.head_count_kv"))
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape.tolist())])
        name = t.name
        if name == "token_embd.weight":
            hf = "embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "norm.weight"
        elif name == "output.weight":
            hf = "lm_head.weight"
        else:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
            assert m, f"unexpected tensor {name}"
            layer, kind, suffix = m.groups()
            if arch == "gemma3":
                table = {**BLOCK_MAP, **GEMMA_BLOCK_MAP}
            else:
                table = {**BLOCK_MAP, "ffn_norm": "post_attention_layernorm"}
            assert kind in table, f"unmapped tensor {name}"
            hf = f"layers.{layer}.{table[kind]}.{suffix}"
            if arch == "llama" and suffix == "weight" and kind in ("attn_q", "attn_k"):
                w = unpermute_llama(w, n_head if kind == "attn_q" else n_head_kv)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w - np.float32(1.0)  # llama.cpp stores Gemma RMSNorm weights as 1 + w
        sd[hf] = torch.from_numpy(np.array(w, dtype=np.float32, copy=True))
    tied = "lm_head.weight" not in sd
    return arch, sd, tied


# ----------------------------------------------------------------------------------------- model building

def load_config(hf_config: dict):
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(hf_config))
        return AutoConfig.from_pretrained(d)


def language_model_and_head(model):
    """(text decoder module, lm_head module) of a *ForConditionalGeneration / *ForCausalLM model."""
    names = [n for n, _ in model.named_parameters() if n.endswith("embed_tokens.weight")]
    names = [n for n in names if "vision" not in n]
    assert len(names) == 1, names
    prefix = names[0][: -len("embed_tokens.weight")].rstrip(".")
    return model.get_submodule(prefix), model.get_output_embeddings(), prefix


@torch.no_grad()
def load_text_weights(model, sd: dict[str, torch.Tensor], tied: bool) -> None:
    lm, head, _ = language_model_and_head(model)
    body = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    missing, unexpected = lm.load_state_dict(body, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    for k, v in body.items():  # load_state_dict checks shapes; double-check values landed
        assert torch.equal(lm.state_dict()[k], v), k
    if tied:
        assert model.config.get_text_config().tie_word_embeddings or model.config.tie_word_embeddings
        head.weight.copy_(sd["embed_tokens.weight"])
    else:
        head.weight.copy_(sd["lm_head.weight"])
    assert torch.equal(head.weight, sd["lm_head.weight"] if not tied else sd["embed_tokens.weight"])


def build_vlm_from_gguf(entry: dict, gguf_path: Path):
    import transformers

    config = load_config(entry["hf_config"])
    cls = getattr(transformers, entry["hf_architecture"])
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    arch, sd, tied = gguf_text_state_dict(gguf_path)
    load_text_weights(model, sd, tied)
    return model, sd, tied


def plain_text_lm(model, sd, tied):
    """The plain text LM class (no M-RoPE / vision plumbing) with the same text weights."""
    import transformers

    tc = model.config.get_text_config().to_dict()
    mt = tc["model_type"]
    rope = dict(tc.get("rope_parameters") or {})
    rope.pop("mrope_section", None)
    rope.pop("mrope_interleaved", None)
    if mt in ("qwen2_vl_text", "qwen2_5_vl_text"):
        cfg = transformers.Qwen2Config(**{**tc, "model_type": "qwen2", "rope_parameters": rope, "layer_types": None})
        cls = transformers.Qwen2ForCausalLM
    elif mt == "qwen3_vl_text":
        cfg = transformers.Qwen3Config(**{**tc, "model_type": "qwen3", "rope_parameters": rope})
        cls = transformers.Qwen3ForCausalLM
    elif mt == "gemma3_text":
        cfg, cls = transformers.Gemma3TextConfig(**tc), transformers.Gemma3ForCausalLM
    elif mt == "qwen2":
        cfg, cls = transformers.Qwen2Config(**tc), transformers.Qwen2ForCausalLM
    elif mt == "llama":
        cfg, cls = transformers.LlamaConfig(**tc), transformers.LlamaForCausalLM
    else:
        raise NotImplementedError(mt)
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    lm = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    load_text_weights(lm, sd, tied)
    return lm


# --------------------------------------------------------------------------------------------- tokenizers

def load_tokenizer(name: str, entry: dict, fixtures: Path):
    from transformers import AutoTokenizer, Qwen2Tokenizer

    gguf_path = fixtures / entry["gguf"]["text"]
    if entry.get("hf_dir"):
        tok = AutoTokenizer.from_pretrained(fixtures / entry["hf_dir"])
    elif name == "gemma3":
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    else:  # Qwen family: transformers' GGUF tokenizer converter (AutoTokenizer refuses arch qwen2vl/qwen3vl)
        tok = Qwen2Tokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return tok


def check_tokenizer_on_fixture_cases(tok, name: str, manifest: dict, fixtures: Path) -> list[dict]:
    """The text parts of every fixture prompt must tokenize as HF's processor did (image runs excluded)."""
    out = []
    for case in manifest["cases"]:
        if case["model"] != name:
            continue
        ref = np.load(fixtures / case["reference_npz"])["input_ids"].tolist()
        ids = tok(case["prompt"], add_special_tokens=False).input_ids
        pre = next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), min(len(ids), len(ref)))
        suf = next((i for i, (a, b) in enumerate(zip(ids[::-1], ref[::-1])) if a != b), min(len(ids), len(ref)))
        leftover = ids[pre: len(ids) - suf]
        out.append({"case": case["id"], "prefix": pre, "suffix": suf, "n_ids": len(ids),
                    "leftover": tok.convert_ids_to_tokens(leftover)})
        # everything outside the (expanded) image placeholder must agree
        assert len(leftover) <= 3, (case["id"], out[-1])
    return out


# ------------------------------------------------------------------------------------------- HF running

def precomputed_image_outputs(name: str, ref) -> dict:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    feats = torch.from_numpy(ref["image_features"])
    if name in ("qwen2vl", "qwen25vl", "llava", "smolvlm"):  # these concatenate a per-image tuple
        return {"image": BaseModelOutputWithPooling(pooler_output=(feats,))}
    if name == "qwen3vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        deep = [(torch.from_numpy(d),) for d in ref["deepstack_features"]]
        return {"image": BaseModelOutputWithDeepstackFeatures(pooler_output=(feats,), deepstack_features=deep)}
    return {"image": BaseModelOutputWithPooling(pooler_output=feats)}


@torch.no_grad()
def replay_image_cases(model, name: str, manifest: dict, fixtures: Path) -> list[dict]:
    """Reproduce the fixtures' image-case logits from the text weights + the stored projector output."""
    out = []
    for case in manifest["cases"]:
        if case["model"] != name:
            continue
        ref = np.load(fixtures / case["reference_npz"])
        ids = torch.from_numpy(ref["input_ids"].astype(np.int64))[None]
        kw = {"mm_encoder_outputs": precomputed_image_outputs(name, ref)}
        if "proc_image_grid_thw" in ref.files:
            kw["image_grid_thw"] = torch.from_numpy(ref["proc_image_grid_thw"])
            kw["mm_token_type_ids"] = torch.from_numpy(ref["proc_mm_token_type_ids"])
        if "proc_token_type_ids" in ref.files:
            kw["token_type_ids"] = torch.from_numpy(ref["proc_token_type_ids"])
        if hasattr(model.model, "rope_deltas"):
            model.model.rope_deltas = None
        logits = model(input_ids=ids, use_cache=False, **kw).logits[0, -1]
        d = max_abs(logits, ref["logits_last"])
        same = bool(logits.argmax() == ref["logits_last"].argmax())
        out.append({"case": case["id"], "logits_max_abs": d, "argmax_equal": same})
        print(f"    replay {case['id']:22s} max|Δlogit| {d:.2e}  argmax equal {out[-1]['argmax_equal']}")
        assert d < 1e-3 and out[-1]["argmax_equal"], out[-1]
    return out


def reset_rope(model):
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None


@torch.no_grad()
def forward_last(model, ids: list[int]) -> torch.Tensor:
    reset_rope(model)
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


@torch.no_grad()
def run_prompt(model, ids: list[int]) -> dict:
    """Forward logits at the last position + 16-step greedy via HF generate, cross-checked two other ways."""
    logits_last = forward_last(model, ids)

    reset_rope(model)
    gen = model.generate(
        input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False, max_new_tokens=N_GREEDY, min_new_tokens=0, eos_token_id=None, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True, use_cache=True,
    )
    greedy = gen.sequences[0, len(ids):].tolist()
    assert len(greedy) == N_GREEDY, greedy
    step_logits = [s[0].float() for s in gen.logits]
    margins = []
    for tok, lg in zip(greedy, step_logits):
        a, m = top2(lg)
        assert a == tok
        margins.append(m)
    gen_vs_forward = max_abs(step_logits[0], logits_last)

    # manual KV-cached loop (no generate machinery)
    reset_rope(model)
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    past, lg, manual = out.past_key_values, out.logits[0, -1], []
    for _ in range(N_GREEDY):
        t = int(lg.argmax())
        manual.append(t)
        out = model(input_ids=torch.tensor([[t]]), past_key_values=past, use_cache=True)
        past, lg = out.past_key_values, out.logits[0, -1]
    # one uncached forward over prompt + continuation
    reset_rope(model)
    full = model(input_ids=torch.tensor([ids + greedy]), use_cache=False).logits[0]
    recomputed = full[len(ids) - 1: -1].argmax(-1).tolist()
    uncached_vs_gen = max(max_abs(full[len(ids) - 1 + i], step_logits[i]) for i in range(N_GREEDY))
    return {
        "logits_last": logits_last,
        "greedy": greedy,
        "margins": margins,
        "manual_equal": manual == greedy,
        "uncached_equal": recomputed == greedy,
        "generate_step0_vs_forward": gen_vs_forward,
        "uncached_vs_generate_max_abs": uncached_vs_gen,
    }


# --------------------------------------------------------------------------------------------------- main

def build_prompts(tok, entry: dict, gguf_add_bos: bool) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "text", "text": CHAT_QUESTION}]}]
    chat = tok.apply_chat_template(messages, chat_template=entry["chat_template_jinja"],
                                   add_generation_prompt=True, tokenize=False)
    bos = tok.bos_token if gguf_add_bos else ""
    return [
        {"prompt": chat, "messages": messages},
        {"prompt": bos + RAW_TEXT, "raw_text": RAW_TEXT},
    ]


def gguf_flag(path: Path, key: str) -> bool:
    import gguf

    f = gguf.GGUFReader(str(path)).fields.get(key)
    return bool(f.contents()) if f is not None else False


def make_one(name: str, manifest: dict, fixtures: Path, out_dir: Path) -> dict:
    import transformers

    entry = manifest["models"][name]
    gguf_path = fixtures / entry["gguf"]["text"]
    print(f"=== {name}: {entry['hf_architecture']} ({gguf_path.name})")
    checks: dict = {}

    # --- model ------------------------------------------------------------------------------------------
    arch, sd, tied = gguf_text_state_dict(gguf_path)
    if entry.get("hf_dir"):
        cls = getattr(transformers, entry["hf_architecture"])
        model = cls.from_pretrained(fixtures / entry["hf_dir"], dtype=torch.float32, attn_implementation="eager").eval()
        lm, head, _ = language_model_and_head(model)
        lm_sd = lm.state_dict()
        for k, v in sd.items():  # check 3: GGUF (mapped back) == HF checkpoint, bit for bit
            want = head.weight if k == "lm_head.weight" else lm_sd[k]
            assert torch.equal(want, v), f"GGUF {k} differs from the HF checkpoint"
        assert torch.equal(head.weight, sd["lm_head.weight"] if not tied else sd["embed_tokens.weight"])
        checks["gguf_equals_hf_checkpoint"] = True
        print(f"    GGUF text weights == HF checkpoint ({len(sd)} tensors, tied={tied})")
    else:
        model, sd, tied = build_vlm_from_gguf(entry, gguf_path)
    text_cfg = model.config.get_text_config()
    assert text_cfg.vocab_size == sd["embed_tokens.weight"].shape[0]

    # --- check 1: image-case replay --------------------------------------------------------------------
    checks["image_case_replay"] = replay_image_cases(model, name, manifest, fixtures)

    # --- tokenizer + prompts ---------------------------------------------------------------------------
    tok = load_tokenizer(name, entry, fixtures)
    checks["tokenizer_fixture_cases"] = check_tokenizer_on_fixture_cases(tok, name, manifest, fixtures)
    add_bos = gguf_flag(gguf_path, "tokenizer.ggml.add_bos_token")
    prompts = build_prompts(tok, entry, add_bos)

    # --- check 2 / 4 models ----------------------------------------------------------------------------
    plain = plain_text_lm(model, sd, tied)
    tf_gguf = None
    if arch in ("gemma3", "qwen2", "llama"):
        from transformers import AutoModelForCausalLM

        # The GGUF has no key for Gemma's query_pre_attn_scalar, so transformers' GGUF config falls back to its
        # default (256); llama.cpp (and the fixture's HF config) use head_dim.  Pass the real value.
        extra = {"query_pre_attn_scalar": text_cfg.query_pre_attn_scalar} if arch == "gemma3" else {}
        tf_gguf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                                       attn_implementation="eager", **extra).eval()
        if extra:
            checks["transformers_gguf_loader_config_override"] = extra
        tsd = tf_gguf.state_dict()
        for k, v in sd.items():
            key = k if k == "lm_head.weight" else "model." + k
            assert torch.equal(tsd[key], v), f"transformers' GGUF loader disagrees on {k}"
        if tied:
            assert torch.equal(tsd["lm_head.weight"], sd["embed_tokens.weight"])
        checks["transformers_gguf_loader_state_dict_equal"] = True
        print(f"    transformers' GGUF loader ({type(tf_gguf).__name__}): identical state dict")

    record: dict[str, np.ndarray] = {}
    per_prompt = []
    for k, p in enumerate(prompts):
        ids = tok(p["prompt"], add_special_tokens=False).input_ids
        if "raw_text" in p:
            assert tok(p["raw_text"]).input_ids == ids, "default special-token handling != literal BOS prompt"
        # HF's tokenizing apply_chat_template agrees with tokenizing the rendered string
        if "messages" in p:
            tids = tok.apply_chat_template(p["messages"], chat_template=entry["chat_template_jinja"],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
            if isinstance(tids, dict) or hasattr(tids, "input_ids"):
                tids = tids["input_ids"]
            if tids and isinstance(tids[0], list):
                tids = tids[0]
            assert list(tids) == ids, (tids, ids)
        res = run_prompt(model, ids)
        fig = {
            "prompt": k, "n_ids": len(ids),
            "min_margin": float(min(res["margins"])),
            "manual_loop_equal": res["manual_equal"],
            "uncached_argmax_equal": res["uncached_equal"],
            "generate_step0_vs_forward": res["generate_step0_vs_forward"],
            "uncached_vs_generate_max_abs": res["uncached_vs_generate_max_abs"],
            "plain_text_lm_max_abs": max_abs(forward_last(plain, ids), res["logits_last"]),
        }
        if tf_gguf is not None:
            fig["transformers_gguf_loader_max_abs"] = max_abs(forward_last(tf_gguf, ids), res["logits_last"])
        per_prompt.append(fig)
        assert res["manual_equal"] and res["uncached_equal"], fig
        assert fig["plain_text_lm_max_abs"] < 1e-4, fig
        assert fig.get("transformers_gguf_loader_max_abs", 0.0) < 1e-4, fig

        record[f"prompt_{k}"] = np.asarray(p["prompt"])
        if "messages" in p:
            record[f"messages_json_{k}"] = np.asarray(json.dumps(p["messages"], ensure_ascii=False))
        if "raw_text" in p:
            record[f"raw_text_{k}"] = np.asarray(p["raw_text"])
        record[f"input_ids_{k}"] = np.asarray(ids, dtype=np.int32)
        record[f"logits_last_{k}"] = res["logits_last"].numpy().astype(np.float32)
        record[f"greedy_tokens_{k}"] = np.asarray(res["greedy"], dtype=np.int32)
        record[f"greedy_margins_{k}"] = np.asarray(res["margins"], dtype=np.float32)
        text = tok.decode(res["greedy"], skip_special_tokens=False)
        record[f"greedy_text_{k}"] = np.asarray(text)
        print(f"    prompt {k}: {len(ids)} ids, logits std {res['logits_last'].std():.2f}, "
              f"min greedy margin {fig['min_margin']:.4f}, plain LM Δ {fig['plain_text_lm_max_abs']:.1e}"
              + (f", tf-GGUF Δ {fig['transformers_gguf_loader_max_abs']:.1e}" if tf_gguf is not None else "")
              + f", gen-vs-fwd Δ {fig['generate_step0_vs_forward']:.1e}")
        print(f"      {p['prompt']!r}")
        print(f"      -> {text!r}")
    checks["prompts"] = per_prompt

    record["hf_class"] = np.asarray(type(model).__name__)
    record["checks"] = np.asarray(json.dumps(checks))
    record["gguf_sha256"] = np.asarray(sha256_of(gguf_path))
    record["versions"] = np.asarray(
        f"transformers={transformers.__version__} torch={torch.__version__} "
        f"gguf={importlib.metadata.version('gguf')} numpy={np.__version__}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.npz"
    np.savez_compressed(path, **record)
    print(f"    wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
    return checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixtures", type=Path, default=REPO.parent / "shared" / "fixtures")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "text_only")
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    manifest = json.loads((args.fixtures / "manifest.json").read_text())
    for name in args.models:
        make_one(name, manifest, args.fixtures, args.out)


if __name__ == "__main__":
    main()
