"""The shared fixtures (../shared/fixtures, or $OCULA_FIXTURES): their manifest, cases, HF references and models,
and one fixture case run through the public API and measured against its HF reference."""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import ocula
from ocula.media import load_image
from ocula.models.vision.base import ImageOptions, ProcessedImage

FIXTURES = Path(os.environ.get("OCULA_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
MARGIN_FLOOR = 1e-3  # greedy steps whose HF top1-top2 margin is below this are numerically ambiguous


@lru_cache(maxsize=None)
def manifest() -> dict:
    """The fixture manifest (read once; treat it as read-only)."""
    path = FIXTURES / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {"models": {}, "cases": []}


def cases_of(*models: str) -> list[dict]:
    """The manifest's cases of these models, in manifest order."""
    return [c for c in manifest()["cases"] if c["model"] in models]


def case_by_id(case_id: str) -> dict:
    return next(c for c in manifest()["cases"] if c["id"] == case_id)


def reference(case: dict | str):
    """The HF reference arrays (npz) of a case or case id."""
    return np.load(FIXTURES / (case_by_id(case) if isinstance(case, str) else case)["reference_npz"])


def have_models(*models: str) -> bool:
    """Whether the manifest lists these models and their text and mmproj GGUFs are present."""
    files = [manifest()["models"].get(m, {}).get("gguf", {}) for m in models]
    return all(f and all((FIXTURES / f[k]).exists() for k in ("text", "mmproj") if k in f) for f in files)


@lru_cache(maxsize=None)
def load_model(text: str, mmproj: str | None) -> ocula.Model:
    """A float32 model, loaded once per session (every fixture model is small)."""
    return ocula.load(FIXTURES / text, mmproj=(FIXTURES / mmproj) if mmproj else None, dtype="float32")


def model_for(model: str) -> ocula.Model:
    """The manifest model with its mmproj (the same cached instance run_case uses for its image cases)."""
    files = manifest()["models"][model]["gguf"]
    return load_model(files["text"], files.get("mmproj"))


def vision_for(model: str):
    """The manifest model's vision encoder + projector (float32), shared with model_for(model)."""
    return model_for(model).vision.vision


def open_image(path: str | Path) -> Image.Image:
    """A fixture image (path relative to FIXTURES) as PIL opens it: its stored mode (L, RGBA, ...), no conversion."""
    image = Image.open(FIXTURES / path)
    image.load()
    return image


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (inf when the shapes differ)."""
    got, want = np.asarray(got), np.asarray(want)
    return float(np.abs(got - want).max() / np.abs(want).max()) if got.shape == want.shape else float("inf")


def greedy_checkable(case: dict, n_tokens: int) -> int:
    """How many of the first n_tokens greedy tokens must equal HF's: those before the first step whose HF
    top1-top2 margin is below MARGIN_FLOOR (all of them when the case records no margins)."""
    margins = case.get("greedy_margins") or [1.0] * n_tokens
    return min(next((i for i, m in enumerate(margins) if m < MARGIN_FLOOR), n_tokens), n_tokens)


def check_preprocess(vision, case: dict) -> ProcessedImage:
    """The case's single image, opened as stored and preprocessed with default options, against HF's processor output:
    the same pixel shape, pixels within 1e-4, the same token count. Returns it for family-specific checks."""
    ref = reference(case)
    processed = vision.preprocess(open_image(case["images"][0]), ImageOptions())
    want = ref["proc_pixel_values"]
    assert tuple(processed.pixel_values.shape) == want.shape
    assert float(np.abs(processed.pixel_values.numpy() - want).max()) < 1e-4
    assert processed.n_tokens == int(ref["image_token_counts"][0])
    return processed


@torch.inference_mode()
def check_encoder(vision, case: dict) -> None:
    """Features of HF's own pixel values (so encoder errors are not masked by preprocessing) within rtol 1e-4 of HF's;
    features of our pixels, through encode_image, are checked by run_case."""
    ref = reference(case)
    processed = ProcessedImage(torch.from_numpy(ref["proc_pixel_values"]), int(ref["image_token_counts"][0]))
    feats = vision.encode(processed).float().numpy()
    assert feats.shape == ref["image_features"].shape
    assert rel_err(feats, ref["image_features"]) < 1e-4


def case_messages(case: dict) -> list[dict]:
    messages = [{"role": "system", "content": case["system"]}] if case.get("system") else []
    parts = [{"type": "image", "image": str(FIXTURES / img)} for img in case["images"]]
    content = parts + [{"type": "text", "text": case["question"]}] if parts else case["question"]
    return messages + [{"role": "user", "content": content}]


def run_case(case: dict) -> dict:
    """Every parity figure of one case; keys absent where the case has no such output."""
    if case["images"]:
        model = model_for(case["model"])
    else:
        model = load_model(manifest()["models"][case["model"]]["gguf"]["text"], None)
    ref = reference(case)
    messages = case_messages(case)
    fig: dict = {"case": case["id"]}
    fig["prompt_ids_equal"] = model.prompt_token_ids(messages) == ref["input_ids"].tolist()
    if case["images"]:
        vision = model.vision.vision
        if "proc_pixel_values" in ref.files:  # some references leave it out for size (their manifest says so)
            pixels = [vision.preprocess(load_image(FIXTURES / img), ImageOptions()).pixel_values.numpy().ravel()
                      for img in case["images"]]
            pixels, want = np.concatenate(pixels), ref["proc_pixel_values"].ravel()
            fig["pixel_max_abs"] = float(np.abs(pixels - want).max()) if pixels.shape == want.shape else float("inf")
        encoded = [model.encode_image(FIXTURES / img, deepstack=True) for img in case["images"]]
        fig["feature_rel_err"] = rel_err(np.concatenate([f.numpy() for f, _ in encoded]), ref["image_features"])
        if "deepstack_features" in ref.files:
            deep = np.concatenate([np.stack([d.numpy() for d in ds]) for _, ds in encoded], axis=1)
            fig["deepstack_rel_err"] = rel_err(deep, ref["deepstack_features"])
    logits, want = model.logits(messages).numpy(), ref["logits_last"]
    fig["logits_max_abs"] = float(np.abs(logits - want).max()) if logits.shape == want.shape else float("inf")
    fig["argmax_equal"] = bool(logits.argmax() == want.argmax())
    want = ref["greedy_tokens"].tolist()
    got = model.chat(messages, max_tokens=len(want), temperature=0, ignore_eos=True).token_ids
    fig["greedy_prefix"] = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    fig["greedy_checkable"] = greedy_checkable(case, len(want))
    return fig
