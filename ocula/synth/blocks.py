"""Tensor bytes: random but valid quantized blocks, scaled so dequantized weights have std ~WEIGHT_STD."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ocula.errors import OculaError
from ocula.synth.tensors import WEIGHT_STD, TensorSpec

ROUTER_SCALE = 4.0  # MoE router weights: std ROUTER_SCALE / sqrt(n_embd), so expert logits have std ~4

# f16 scale fields (byte offsets) of each block type; everything else in a block is random bits
_SCALE_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
POOL_BLOCKS = 1 << 16


class BlockPool:
    """A few MiB of random valid blocks per tensor type, reused (rotated) to fill every tensor."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.pools: dict[tuple, np.ndarray] = {}  # (qtype, std) -> blocks

    def pool(self, qtype, std: float = WEIGHT_STD) -> np.ndarray:
        from gguf import GGMLQuantizationType as QT
        from gguf.constants import GGML_QUANT_SIZES

        qtype = QT(qtype)
        if (qtype, std) in self.pools:
            return self.pools[qtype, std]
        if qtype in (QT.F16, QT.F32):
            dt = np.float16 if qtype == QT.F16 else np.float32
            pool = (self.rng.standard_normal(POOL_BLOCKS * 64, dtype=np.float32) * std).astype(dt)
            self.pools[qtype, std] = pool.view(np.uint8)
            return self.pools[qtype, std]
        if qtype.name not in _SCALE_FIELDS:
            raise OculaError(f"synth cannot write {qtype.name} blocks")
        _, nbytes = GGML_QUANT_SIZES[qtype]
        blocks = self.rng.integers(0, 256, size=(POOL_BLOCKS, nbytes), dtype=np.uint8)
        if qtype == QT.Q6_K:  # int8 sub-block scales: keep them moderate
            blocks[:, 192:208] = self.rng.integers(-24, 25, size=(POOL_BLOCKS, 16)).astype(np.int8).view(np.uint8)
        fields = _SCALE_FIELDS[qtype.name]
        self._set_scales(blocks, fields, 1.0)
        measured = float(self._dequant(blocks[:256], qtype).std())
        self._set_scales(blocks, fields, std / measured)
        self.pools[qtype, std] = blocks.reshape(-1)
        return self.pools[qtype, std]

    def _set_scales(self, blocks: np.ndarray, fields, value: float) -> None:
        # jitter each block's scale by +-25% so blocks differ, and give half the blocks negative scales: random
        # bits decode to values with a nonzero mean (Q4_K: d*sc*q - dmin*m), and with every block alike that mean
        # becomes a direction all hidden states share, so a MoE router sends every token to the same experts
        jitter = self.rng.uniform(0.75, 1.25, size=(blocks.shape[0],)).astype(np.float32)
        jitter *= self.rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=blocks.shape[0])
        for off in fields:
            blocks[:, off : off + 2] = (jitter * value).astype(np.float16).view(np.uint8).reshape(-1, 2)

    @staticmethod
    def _dequant(blocks: np.ndarray, qtype) -> np.ndarray:
        from gguf import quants

        return quants.dequantize(blocks.reshape(1, -1), qtype).reshape(-1)


class PoolTensor:
    """Duck-typed stand-in for a numpy array in GGUFWriter.write_tensor_data: streams pool bytes.

    `start` is the first pool block (unit) of the tensor, or one start per slab for a tensor cut into
    equal slabs (the experts of a 3-D MoE tensor): distinct starts make every expert different while
    the bytes still come from the one small pool (nothing tensor-sized is ever held in memory)."""

    def __init__(self, pool: np.ndarray, nbytes: int, unit: int, start: int | Sequence[int]):
        self.pool, self.nbytes, self.unit = pool, nbytes, unit
        self.starts = [int(start)] if np.ndim(start) == 0 else [int(x) for x in start]
        self.start = self.starts[0]
        if nbytes % len(self.starts) or (nbytes // len(self.starts)) % unit:
            raise OculaError(f"{nbytes} bytes do not split into {len(self.starts)} slabs of whole blocks")

    def tofile(self, fout) -> None:
        slab = self.nbytes // len(self.starts)
        for start in self.starts:
            left, pos = slab, (start * self.unit) % len(self.pool)
            pos -= pos % self.unit
            while left:
                chunk = self.pool[pos : pos + left]
                fout.write(chunk.data)
                left -= len(chunk)
                pos = 0


def tensor_nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf.constants import GGML_QUANT_SIZES

    block, nbytes = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    if shape[-1] % block:
        raise OculaError(f"row length {shape[-1]} is not a multiple of the {block}-element block")
    return n // block * nbytes


def tensor_data(ts: TensorSpec, qtype, pools: BlockPool, rng: np.random.Generator):
    from gguf import GGMLQuantizationType as QT

    nbytes = tensor_nbytes(ts.shape, qtype)
    if ts.kind == "router":  # MoE ffn_gate_inp [n_expert, n_embd], F32 as llama.cpp keeps it
        arr = rng.standard_normal(ts.shape, dtype=np.float32) * np.float32(ROUTER_SCALE / np.sqrt(ts.shape[-1]))
        return arr.astype(np.float16) if qtype == QT.F16 else arr
    if ts.kind in ("norm", "scale", "bias"):
        value = {"norm": 1.0, "scale": 0.1, "bias": 0.0}[ts.kind]
        arr = np.full(ts.shape, value, dtype=np.float32)
        if ts.kind == "bias":
            arr += rng.standard_normal(ts.shape, dtype=np.float32) * WEIGHT_STD
        return arr.astype(np.float16) if qtype == QT.F16 else arr
    from gguf.constants import GGML_QUANT_SIZES

    _, unit = GGML_QUANT_SIZES[qtype]
    pool = pools.pool(qtype, ts.std or WEIGHT_STD)
    if ts.role.endswith("_exps"):  # [n_expert, rows, cols]: each expert from its own place in the pool
        return PoolTensor(pool, nbytes, unit, rng.choice(len(pool) // unit, size=ts.shape[0], replace=False))
    return PoolTensor(pool, nbytes, unit, int(rng.integers(0, len(pool) // unit)))
