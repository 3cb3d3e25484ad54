"""`ocula inspect`: what a GGUF file holds, without loading any weights."""
from __future__ import annotations

from collections import Counter

from ocula.gguf import GGUFFile

ARRAY_PREVIEW = 8


def _summarize(value):
    if isinstance(value, list) and len(value) > ARRAY_PREVIEW:
        return f"[{', '.join(map(repr, value[:ARRAY_PREVIEW]))}, ... ({len(value)} items)]"
    if isinstance(value, str) and len(value) > 200:
        return value[:200].replace("\n", "\\n") + f"... ({len(value)} chars)"
    return value


def describe(path: str) -> dict:
    f = GGUFFile(path)
    arch = f.architecture
    types: dict[str, dict] = {}
    counts = Counter()
    for t in f.tensors.values():
        entry = types.setdefault(t.type_name, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += t.n_bytes
        counts[t.type_name] += t.n_elements
    n_params = sum(counts.values())
    info = {
        "file": str(f.path),
        "size": f"{f.file_size / 2**20:.1f} MiB",
        "architecture": arch,
        "kind": "mmproj (vision projector)" if arch == "clip" else "model",
        "name": f.get("general.name"),
        "parameters": f"{n_params / 1e6:.1f} M",
        "bits_per_weight": round(8 * sum(v["bytes"] for v in types.values()) / max(n_params, 1), 2),
        "tensors": len(f.tensors),
    }
    if arch == "clip":
        info["projector_type"] = f.get("clip.projector_type") or f.get("clip.vision.projector_type")
        info["image_size"] = f.get("clip.vision.image_size")
        info["vision_layers"] = f.get("clip.vision.block_count")
    else:
        for key in ("context_length", "embedding_length", "block_count", "attention.head_count",
                    "attention.head_count_kv", "feed_forward_length"):
            info[key.replace("attention.", "")] = f.get(f"{arch}.{key}")
        if f.get(f"{arch}.expert_count"):
            n_layer = int(f.get(f"{arch}.block_count") or 0)
            sparse = sum(f"blk.{i}.ffn_gate_inp.weight" in f.tensors for i in range(n_layer))
            fused = any(n.endswith("ffn_gate_up_exps.weight") for n in f.tensors)
            info["experts"] = (f"{f.get(f'{arch}.expert_count')} per layer, top-{f.get(f'{arch}.expert_used_count')} "
                               f"per token, expert ffn {f.get(f'{arch}.expert_feed_forward_length')}, "
                               f"{sparse} of {n_layer} layers sparse, gate/up {'fused' if fused else 'split'}")
        info["vocab_size"] = len(f.get("tokenizer.ggml.tokens") or []) or None
        info["tokenizer"] = f.get("tokenizer.ggml.model")
        if f.get("tokenizer.chat_template"):
            info["chat_template"] = "yes"
        else:
            from ocula.text.cli_template import fallback_name

            info["chat_template"] = (f"no (a base model?): ocula run / chat complete the prompt as is; chat messages "
                                     f"(model.chat, the server) are wrapped in {fallback_name(arch)}")
    info["tensor_types"] = types
    info["metadata"] = {k: _summarize(v) for k, v in f.metadata.items()}
    return info
