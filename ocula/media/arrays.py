"""numpy arrays and torch tensors to PIL images (the dtype and layout rules are in ocula.media's docstring)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from ocula.media.decode import check_pixels
from ocula.media.policy import MediaPolicy, fail

_NUMPY_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def from_numpy(arr: np.ndarray, policy: MediaPolicy, kind: str = "numpy array") -> Image.Image:
    if arr.dtype != np.uint8:
        raise fail(kind, f"wrong dtype {arr.dtype} (expected uint8 with shape (H, W), (H, W, 1), (H, W, 3) "
                         f"or (H, W, 4))")
    if arr.ndim == 2:
        mode = "L"
    elif arr.ndim == 3 and arr.shape[2] in _NUMPY_MODES:
        mode = _NUMPY_MODES[arr.shape[2]]
        if arr.shape[2] == 1:
            arr = arr[:, :, 0]
    else:
        raise fail(kind, f"wrong shape {tuple(arr.shape)} (expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4))")
    h, w = arr.shape[:2]
    check_pixels((w, h), policy, kind)
    img = Image.fromarray(np.ascontiguousarray(arr))  # uint8 (H, W) -> L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA
    if img.mode != mode:  # pragma: no cover - fromarray's inference is stable for uint8
        raise fail(kind, f"unexpected mode {img.mode} for shape {tuple(arr.shape)}")
    return img


def is_torch_tensor(obj) -> bool:
    mod = type(obj).__module__
    if not mod.startswith("torch"):
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, torch.Tensor)


_CHANNELS = (1, 3, 4)


def from_torch(t, policy: MediaPolicy) -> Image.Image:
    import torch

    kind = "torch tensor"
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    shape = tuple(t.shape)
    if t.is_floating_point():
        # Channels-first float in [0, 1] (torchvision's convention).
        if t.ndim == 2:
            chw = t.unsqueeze(0)
        elif t.ndim == 3 and shape[0] in _CHANNELS:
            chw = t
        else:
            raise fail(kind, f"wrong shape {shape} for a float tensor (expected (C, H, W) with C in 1, 3, 4, "
                             f"or (H, W), values in [0, 1])")
        check_pixels((chw.shape[2], chw.shape[1]), policy, kind)
        x = chw.to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise fail(kind, "float tensor has NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise fail(kind, f"float tensor values must be in [0, 1], got [{lo:g}, {hi:g}]")
        hwc = (x * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        return from_numpy(hwc, policy, kind)
    if t.dtype != torch.uint8:
        raise fail(kind, f"wrong dtype {t.dtype} (expected uint8 HWC/CHW, or a float CHW tensor in [0, 1])")
    if t.ndim == 2:
        return from_numpy(t.contiguous().numpy(), policy, kind)
    if t.ndim == 3:
        if shape[2] in _CHANNELS:
            return from_numpy(t.contiguous().numpy(), policy, kind)
        if shape[0] in _CHANNELS:
            return from_numpy(t.permute(1, 2, 0).contiguous().numpy(), policy, kind)
    raise fail(kind, f"wrong shape {shape} (expected uint8 (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4)")
