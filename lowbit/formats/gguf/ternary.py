"""llama.cpp's ternary types TQ1_0 and TQ2_0 (super-blocks of 256), made for BitNet b1.58.

Both store trits t = round(x / d) + 1 in {0, 1, 2} with one float16 scale d = max |x| of
the block (ggml's ``d ? 1/d : 0`` reciprocal, C roundf), placed after the codes:

    TQ2_0, 66 bytes:  qs[64] | d
        byte j + m of the 32-byte half j (j = 0, 32) holds the trits of weights
        4j + m + 32n in bits 2n..2n+1, n = 0..3
    TQ1_0, 54 bytes:  qs[48] | qh[4] | d
        qs[0:32]:  byte m holds weights m + 32n, n = 0..4 (160 weights)
        qs[32:48]: byte m holds weights 160 + m + 16n, n = 0..4 (80 weights)
        qh[0:4]:   byte j holds weights 240 + j + 4n, n = 0..3 (16 weights)
        five trits per byte as the base-3 number v = sum t_n 3^(4-n) (four in qh, then
        times 3), stored as ceil(v · 256 / 243); trit n of byte b is ((b · 3^n mod 256) · 3) >> 8

A BitNet b1.58 block, whose weights are gamma·{-1, 0, 1}, has d = gamma and is stored
exactly (up to gamma in float16). Widths that 256 does not divide fall back to Q4_0 in
llama.cpp (table.FALLBACK).
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as T

from .common import F32, fp16_bytes, fp16_from_bytes, reciprocal, round_half_away, to_fp16
from .table import BlockCodec

_POW3 = np.array([1, 3, 9, 27, 81, 243], dtype=np.uint16)


def _trits(blocks: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    d = np.abs(blocks).max(axis=1)
    t = (round_half_away(blocks * reciprocal(d)[:, None]) + F32(1)).astype(np.uint16)
    return to_fp16(d, name), t


def _pack5(t: np.ndarray, width: int, n: int) -> np.ndarray:
    """t [blocks, n·width] -> [blocks, width] bytes: byte m holds t[m + width·k], k < n."""
    v = np.zeros((t.shape[0], width), dtype=np.uint16)
    for k in range(n):
        v = v * 3 + t[:, k * width : (k + 1) * width]
    if n == 4:
        v = v * 3  # qh: the first trit goes to the most significant place
    return ((v * 256 + 242) // 243).astype(np.uint8)


def _unpack5(b: np.ndarray, n: int) -> np.ndarray:
    """[blocks, width] bytes -> [blocks, n·width] trits (inverse of _pack5)."""
    x = b.astype(np.uint16)
    return np.concatenate([((((x * _POW3[k]) & 0xFF) * 3) >> 8) for k in range(n)], axis=1)


class TQ1_0(BlockCodec, ggml_type=T.TQ1_0):
    @classmethod
    def quantize_blocks(cls, blocks, importance=None):
        dh, t = _trits(np.asarray(blocks, dtype=F32), cls.name)
        qs = np.concatenate([_pack5(t[:, :160], 32, 5), _pack5(t[:, 160:240], 16, 5), _pack5(t[:, 240:], 4, 4)], axis=1)
        return np.concatenate([qs, fp16_bytes(dh)], axis=1)

    @classmethod
    def dequantize_blocks(cls, raw):
        d = fp16_from_bytes(raw[:, 52:54])
        t = np.concatenate([_unpack5(raw[:, :32], 5), _unpack5(raw[:, 32:48], 5), _unpack5(raw[:, 48:52], 4)], axis=1)
        return d * (t.astype(F32) - F32(1))


class TQ2_0(BlockCodec, ggml_type=T.TQ2_0):
    @classmethod
    def quantize_blocks(cls, blocks, importance=None):
        dh, t = _trits(np.asarray(blocks, dtype=F32), cls.name)
        halves = []
        for j in (0, 128):
            q = np.zeros((t.shape[0], 32), dtype=np.uint16)
            for n in range(4):
                q |= t[:, j + 32 * n : j + 32 * (n + 1)] << (2 * n)
            halves.append(q.astype(np.uint8))
        return np.concatenate([*halves, fp16_bytes(dh)], axis=1)

    @classmethod
    def dequantize_blocks(cls, raw):
        d = fp16_from_bytes(raw[:, 64:66])
        parts = [(raw[:, h : h + 32] >> np.uint8(2 * n)) & np.uint8(3) for h in (0, 32) for n in range(4)]
        return d * (np.concatenate(parts, axis=1).astype(F32) - F32(1))
