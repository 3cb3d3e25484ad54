"""Memory-mapped GGUF files: metadata as plain Python values, tensors as raw quantized bytes.

Nothing here copies tensor data: every `GGUFTensor.data` is a view into the file's memory map.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ocula.errors import GGUFError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order: outermost first (e.g. (out_features, in_features))
    qtype: int  # gguf.GGMLQuantizationType value
    data: np.ndarray  # raw bytes (uint8) or typed values (F32/F16/...) straight from the memory map
    offset: int

    @property
    def type_name(self) -> str:
        import gguf

        return gguf.GGMLQuantizationType(self.qtype).name

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_bytes(self) -> int:
        return int(self.data.nbytes)


class GGUFFile:
    """A GGUF file opened read-only. `metadata[key]` gives str/int/float/bool or a list of them."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise GGUFError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise GGUFError(f"{self.path}: is a directory, expected a .gguf file")
        self.file_size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise GGUFError(
                f"{self.path}: not a GGUF file (magic bytes {magic!r}, expected {GGUF_MAGIC!r})"
            )
        import gguf

        try:
            reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, IndexError, OverflowError, KeyError, EOFError, OSError) as e:
            raise GGUFError(f"{self.path}: broken or truncated GGUF file ({e})") from None
        self._reader = reader
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except Exception as e:  # noqa: BLE001 - a malformed field is a broken file
                raise GGUFError(f"{self.path}: metadata key {key!r} is unreadable ({e})") from None
        self.tensors: dict[str, GGUFTensor] = {}
        for t in reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > self.file_size:
                raise GGUFError(
                    f"{self.path}: tensor {t.name!r} ends at byte {end} but the file has only "
                    f"{self.file_size} bytes (truncated download?)"
                )
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[t.name] = GGUFTensor(
                t.name, shape, int(t.tensor_type), t.data, int(t.data_offset)
            )

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: metadata has no general.architecture")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: required metadata key {key!r} is missing")
        return self.metadata[key]

    def tensor(self, name: str) -> GGUFTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: required tensor {name!r} is missing") from None

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, arch={self.metadata.get('general.architecture')!r}, tensors={len(self.tensors)})"
