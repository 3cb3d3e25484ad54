"""Run one fixture case (manifest.json entry) through the public API and measure it against its HF reference."""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

import ocula
from ocula.media import load_image
from ocula.models.vision.base import ImageOptions

FIXTURES = Path(os.environ.get("OCULA_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
MARGIN_FLOOR = 1e-3  # greedy steps whose HF top1-top2 margin is below this are numerically ambiguous


def manifest() -> dict:
    path = FIXTURES / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {"models": {}, "cases": []}


@lru_cache(maxsize=2)
def load_model(text: str, mmproj: str | None) -> ocula.Model:
    return ocula.load(FIXTURES / text, mmproj=(FIXTURES / mmproj) if mmproj else None, dtype="float32")


def case_messages(case: dict) -> list[dict]:
    messages = [{"role": "system", "content": case["system"]}] if case.get("system") else []
    parts = [{"type": "image", "image": str(FIXTURES / img)} for img in case["images"]]
    content = parts + [{"type": "text", "text": case["question"]}] if parts else case["question"]
    return messages + [{"role": "user", "content": content}]


def run_case(case: dict) -> dict:
    """Every parity figure of one case; keys absent where the case has no such output."""
    files = manifest()["models"][case["model"]]["gguf"]
    model = load_model(files["text"], files.get("mmproj") if case["images"] else None)
    ref = np.load(FIXTURES / case["reference_npz"])
    messages = case_messages(case)
    fig: dict = {"case": case["id"]}
    fig["prompt_ids_equal"] = model.prompt_token_ids(messages) == ref["input_ids"].tolist()
    if case["images"]:
        vision = model.vision.vision
        pixels = [vision.preprocess(load_image(FIXTURES / img), ImageOptions()).pixel_values.numpy().ravel()
                  for img in case["images"]]
        pixels, want = np.concatenate(pixels), ref["proc_pixel_values"].ravel()
        fig["pixel_max_abs"] = float(np.abs(pixels - want).max()) if pixels.shape == want.shape else float("inf")
        encoded = [model.encode_image(FIXTURES / img, deepstack=True) for img in case["images"]]
        feats = np.concatenate([f.numpy() for f, _ in encoded])
        want = ref["image_features"]
        fig["feature_rel_err"] = (float(np.abs(feats - want).max() / np.abs(want).max())
                                  if feats.shape == want.shape else float("inf"))
        if "deepstack_features" in ref.files:
            deep = np.concatenate([np.stack([d.numpy() for d in ds]) for _, ds in encoded], axis=1)
            want = ref["deepstack_features"]
            fig["deepstack_rel_err"] = (float(np.abs(deep - want).max() / np.abs(want).max())
                                        if deep.shape == want.shape else float("inf"))
    logits = model.logits(messages).numpy()
    fig["logits_max_abs"] = float(np.abs(logits - ref["logits_last"]).max())
    fig["argmax_equal"] = bool(logits.argmax() == ref["logits_last"].argmax())
    out = model.chat(messages, max_tokens=len(ref["greedy_tokens"]), temperature=0, ignore_eos=True)
    want = ref["greedy_tokens"].tolist()
    margins = case.get("greedy_margins") or [1.0] * len(want)
    checkable = next((i for i, m in enumerate(margins) if m < MARGIN_FLOOR), len(want))
    fig["greedy_prefix"] = next((i for i, (a, b) in enumerate(zip(out.token_ids, want)) if a != b), len(want))
    fig["greedy_checkable"] = checkable
    return fig
