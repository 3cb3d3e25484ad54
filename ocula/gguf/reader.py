"""Memory-mapped GGUF files: metadata as plain Python values, tensors as raw bytes of the file.

The header is parsed here rather than with gguf-py's GGUFReader, which builds a numpy object per
array element and needs ~15 s for a 151k-token vocabulary; this parser needs ~0.1 s. Nothing copies
tensor data: every `GGUFTensor.data` is a uint8 view into the file's memory map.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ocula.errors import GGUFError

GGUF_MAGIC = b"GGUF"
MADV_POPULATE_READ = 22  # Linux 5.14+: map a range's pages into the process now, reading them where needed
POPULATE_CHUNK = 256 << 20
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRUCT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_BOOL, _STRING, _ARRAY = 7, 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order: outermost first (e.g. (out_features, in_features))
    qtype: int  # gguf.GGMLQuantizationType value
    data: np.ndarray  # the tensor's raw bytes (uint8, 1-D) straight from the memory map
    offset: int  # absolute byte offset in the file

    @property
    def type_name(self) -> str:
        import gguf

        try:
            return gguf.GGMLQuantizationType(self.qtype).name
        except ValueError:
            return f"type{self.qtype}"

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_bytes(self) -> int:
        return int(self.data.nbytes)


class _Cursor:
    """Little-endian reads from a buffer, raising GGUFError (not struct.error) past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: broken or truncated GGUF header (wanted {n} bytes at offset {self.pos})")

    def scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        self.need(n)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self) -> int:
        return self.scalar("<I")

    def u64(self) -> int:
        return self.scalar("<Q")

    def string(self) -> str:
        n = self.u64()
        self.need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0):
        if vtype == _STRING:
            return self.string()
        if vtype == _BOOL:
            return bool(self.scalar("<B"))
        if vtype in _SCALARS:
            v = self.scalar(_STRUCT[vtype])
            return float(v) if vtype in (6, 12) else int(v)
        if vtype == _ARRAY and depth == 0:
            return self.array()
        raise GGUFError(f"{self.path}: unknown metadata value type {vtype} at offset {self.pos}")

    def array(self) -> list:
        etype, count = self.u32(), self.u64()
        if count > self.size:
            raise GGUFError(f"{self.path}: metadata array of {count} items cannot fit in the file")
        if etype == _STRING:  # the hot path: vocabularies and merges, up to ~10^6 strings
            buf, pos, end, out = self.buf, self.pos, self.size, []
            unpack, append = struct.unpack_from, out.append
            try:
                for _ in range(count):
                    (n,) = unpack("<Q", buf, pos)
                    pos += 8
                    if pos + n > end:
                        raise struct.error
                    append(buf[pos : pos + n].decode("utf-8", errors="replace"))
                    pos += n
            except struct.error:
                raise GGUFError(f"{self.path}: broken or truncated GGUF header (string array at offset {pos})") from None
            self.pos = pos
            return out
        if etype in _SCALARS:
            dt = np.dtype(_SCALARS[etype])
            self.need(count * dt.itemsize)
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos += count * dt.itemsize
            return [bool(x) for x in arr] if etype == _BOOL else arr.tolist()
        return [self.value(etype, 1) for _ in range(count)]


class Metadata(dict):
    """GGUF metadata. Arrays dropped with `GGUFFile.release_arrays` are read from the file again when
    asked for (`md[key]`, `md.get(key)`, `key in md`); iteration lists only the keys still held."""

    def __init__(self, reload):
        super().__init__()
        self._reload = reload
        self._released: set[str] = set()

    def __missing__(self, key):
        if key in self._released:
            return self._reload(key)
        raise KeyError(key)

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) or key in self._released

    def get(self, key, default=None):
        return self[key] if key in self else default


class GGUFFile:
    """A GGUF file opened read-only. `metadata[key]` gives str/int/float/bool or a list of them."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise GGUFError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise GGUFError(f"{self.path}: is a directory, expected a .gguf file")
        self.file_size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic bytes {magic!r}, expected {GGUF_MAGIC!r})")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.metadata: Metadata = Metadata(self._read_value)
        self._value_offsets: dict[str, int] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        self._parse()

    def populate(self, progress=None) -> bool:
        """Map every page of the file into this process now, so that no forward faults them in one at a
        time: the first 512-token prompt of a 17 GiB MoE file (which reads nearly every expert) ran at
        22 t/s against 37 for the next, and populating the file from the page cache took 7 s. Reads from
        disk what the page cache lacks. False where the kernel cannot (then pages come in on first use)."""
        raw = getattr(self._map, "_mmap", None)
        if raw is None or not hasattr(raw, "madvise"):
            return False
        for start in range(0, self.file_size, POPULATE_CHUNK):
            length = min(POPULATE_CHUNK, self.file_size - start)
            try:
                raw.madvise(MADV_POPULATE_READ, start, length)
            except (OSError, ValueError):
                return False
            if progress:
                progress(length)
        return True

    def _parse(self) -> None:
        with open(self.path, "rb") as fh:
            header = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        c = _Cursor(header, self.path)
        c.pos = 4
        self.version = c.u32()
        if self.version not in (2, 3):
            hint = " (big-endian files are not supported)" if self.version > 0xFFFF else ""
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported{hint}")
        n_tensors, n_kv = c.u64(), c.u64()
        if n_tensors > self.file_size or n_kv > self.file_size:
            raise GGUFError(f"{self.path}: broken GGUF header ({n_tensors} tensors, {n_kv} keys)")
        for _ in range(n_kv):
            key = c.string()
            self._value_offsets[key] = c.pos
            self.metadata[key] = c.value(c.u32())
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.u32()
            if n_dims > 8:
                raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (broken header)")
            dims = [c.u64() for _ in range(n_dims)]
            infos.append((name, dims, c.u32(), c.u64()))
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
        data_start = -(-c.pos // align) * align
        from ocula.quant.dequant import block_info

        for name, dims, qtype, rel in infos:
            try:
                block_elems, block_bytes = block_info(qtype)
            except ValueError:
                raise GGUFError(f"{self.path}: tensor {name!r} has unknown type id {qtype}") from None
            n_elements = int(np.prod(dims)) if dims else 1
            if dims and dims[0] % block_elems:
                raise GGUFError(f"{self.path}: tensor {name!r} rows of {dims[0]} are not whole blocks of {block_elems}")
            n_bytes = n_elements // block_elems * block_bytes
            start = data_start + rel
            if start + n_bytes > self.file_size:
                raise GGUFError(
                    f"{self.path}: tensor {name!r} ends at byte {start + n_bytes} but the file has only "
                    f"{self.file_size} bytes (truncated download?)"
                )
            if name in self.tensors:
                raise GGUFError(f"{self.path}: tensor {name!r} appears twice")
            shape = tuple(int(d) for d in reversed(dims))
            self.tensors[name] = GGUFTensor(name, shape, qtype, self._map[start : start + n_bytes], start)
        header.close()

    def release_arrays(self, min_items: int = 1024) -> None:
        """Drop metadata arrays of at least `min_items` values (the vocabulary, its scores and merges
        once a tokenizer holds what it needs); they are read from the file again if asked for."""
        for key, value in list(self.metadata.items()):
            if isinstance(value, list) and len(value) >= min_items:
                del self.metadata[key]
                self.metadata._released.add(key)

    def _read_value(self, key: str):
        with open(self.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as header:
            c = _Cursor(header, self.path)
            c.pos = self._value_offsets[key]
            return c.value(c.u32())

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
