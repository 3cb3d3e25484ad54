"""Rewrite a GGUF file with edited metadata or tensors (tests build variants of the fixture models)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

# (name, data, GGML type): data is what GGUFReader gives (float arrays, or uint8 rows of blocks)
Tensor = tuple[str, np.ndarray, int]


def rewrite_gguf(src: Path, dst: Path, *, tensors: Callable[[list[Tensor]], list[Tensor]] = lambda t: t,
                 metadata: dict | None = None, drop_keys: tuple[str, ...] = ()) -> Path:
    """Copy `src` to `dst`, passing its tensors through `tensors` and overriding metadata keys
    (`metadata`: key -> (value, GGUFValueType)) or dropping them."""
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(str(dst), arch)
    overrides = dict(metadata or {})
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in drop_keys:
            continue
        if field.name in overrides:
            value, vtype = overrides.pop(field.name)
            w.add_key_value(field.name, value, vtype)
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vtype, sub)
    for key, (value, vtype) in overrides.items():
        w.add_key_value(key, value, vtype)
    for name, data, qtype in tensors([(t.name, np.asarray(t.data), int(t.tensor_type)) for t in r.tensors]):
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def fuse_gate_up(tensors: list[Tensor]) -> list[Tensor]:
    """Each layer's ffn_gate_exps and ffn_up_exps as one ffn_gate_up_exps (gate rows of each expert first),
    as newer llama.cpp converters write it."""
    by_name = {name: (data, qtype) for name, data, qtype in tensors}
    out = []
    for name, data, qtype in tensors:
        if name.endswith("ffn_up_exps.weight"):
            continue
        if name.endswith("ffn_gate_exps.weight"):
            up, up_type = by_name[name.replace("ffn_gate_exps", "ffn_up_exps")]
            assert up_type == qtype
            out.append((name.replace("ffn_gate_exps", "ffn_gate_up_exps"), np.concatenate([data, up], axis=1), qtype))
        else:
            out.append((name, data, qtype))
    return out
