"""IQ4_NL: 32-weight blocks of 4-bit indices into a fixed non-uniform 16-value grid.

The grid is denser near zero, matching the bell shape of LLM weights. llama.cpp writes
this type where a Q2_K or Q3_K tensor's rows are not a multiple of 256 wide.

IQ4_NL, 18 bytes per 32 weights:

    byte  0       2                                   18
          +-------+-----------------------------------+
          |   d   |              qs[16]               |
          +-------+-----------------------------------+
           fp16     qs[j] bits 0-3: index of weight j
                          bits 4-7: index of weight j+16

    weight = d * GRID[index]

Quantizing follows llama.cpp's quantize_iq4_nl (the path llama-quantize takes): weights
x^2, or qw * sqrt(sigma2 + x^2) with importance (sigma2 = twice the block's mean
square). The first trial puts the largest-magnitude weight on the grid's far end
(d = max/127); 15 more use 1/d = (t - 127)/max for t in -7..7. Each trial gives every
weight its nearest grid value and then the weighted least-squares d for those values;
the best d is stored and every weight is re-assigned to its nearest value under it.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as T

from .common import F32, GROUP_MAX_EPS, fp16_bytes, fp16_from_bytes, pack_nibbles, reciprocal, safe_div, to_fp16
from .search import colsum, columns, first_absmax
from .table import BlockCodec

GRID = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)

# Nearest grid value by table look-up. Index i wins once 2v reaches GRID[i-1] + GRID[i]
# (ties go up). Those sums are integers, so only floor(2v) matters: a table over the
# integers from just below the first sum to just above the last one answers exactly.
# (Doubling v is exact in float32, so no tie is decided differently.)
_MID2 = GRID[:-1].astype(np.int32) + GRID[1:].astype(np.int32)
_LO, _HI = int(_MID2[0]) - 1, int(_MID2[-1]) + 1
_INDEX = np.searchsorted(_MID2, np.arange(_LO, _HI + 1), side="right").astype(np.uint8)
_VALUE = GRID.astype(F32)[_INDEX]


def _slot(v: np.ndarray) -> np.ndarray:
    k = np.floor(v + v)
    np.clip(k, _LO, _HI, out=k)
    k -= _LO
    return k.astype(np.intp)


def nearest_index(v: np.ndarray) -> np.ndarray:
    """Index of the grid value nearest to v (ties go to the larger value)."""
    return _INDEX[_slot(v)]


class IQ4_NL(BlockCodec, ggml_type=T.IQ4_NL):
    TRIALS = 7  # start scales (GRID[0] + t)/max for t in -7..7, besides the first

    @classmethod
    def quantize_blocks(cls, blocks, importance=None):
        # Position-major layout: sums over a block run in ggml's order (see search.py).
        xt = columns(blocks)
        if importance is None:
            wt = xt * xt
        else:
            sigma2 = colsum(xt * xt) * F32(2 / cls.block_size)
            wt = columns(importance) * np.sqrt(sigma2 + xt * xt)
        mx = first_absmax(xt)
        live = np.abs(mx) >= GROUP_MAX_EPS
        mx = np.where(live, mx, F32(1))

        def fit(iscale):
            q = _VALUE[_slot(iscale * xt)]
            wq = wt * q
            return colsum(wq * xt), colsum(wq * q)

        sumqx, sumq2 = fit(F32(1) / (-mx / F32(GRID[0])))
        d = safe_div(sumqx, sumq2, sumq2 > 0)
        best = d * sumqx
        for t in range(-cls.TRIALS, cls.TRIALS + 1):
            sqx, sq2 = fit((F32(t) + F32(GRID[0])) / mx)
            better = (sq2 > 0) & (sqx * sqx > best * sq2)
            d = np.where(better, safe_div(sqx, sq2, better), d)
            best = np.where(better, d * sqx, best)
        d = np.where(live, d, F32(0)).astype(F32)
        dh = to_fp16(d, cls.name)
        # Re-assign with the float32 d (not its fp16 rounding), as llama.cpp does. A dead
        # block gets 1/d = 0, so every weight takes the index of the grid value nearest 0.
        inv = reciprocal(d)
        idx = nearest_index(inv * xt).T
        return np.concatenate([fp16_bytes(dh), pack_nibbles(idx[:, :16], idx[:, 16:])], axis=1)

    @classmethod
    def dequantize_blocks(cls, raw):
        d = fp16_from_bytes(raw[:, :2])
        qs = raw[:, 2:]
        idx = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
        return d * GRID[idx].astype(F32)
