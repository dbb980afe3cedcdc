"""The legacy 32-weight block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Without importance these reproduce ggml's reference quantizers (quantize_row_*_ref)
byte for byte, which is also what gguf-py's numpy quantizers produce:

* symmetric types (Q4_0, Q5_0): d = m / -2^(b-1), where m is the signed element of
  largest magnitude, so that element lands on code 0 (the most negative level) and the
  other side keeps one level less; code = min(2^b - 1, trunc(x/d + 2^(b-1) + 0.5)).
* offset types (Q4_1, Q5_1): d = (max - min) / (2^b - 1), m = min,
  code = min(2^b - 1, trunc((x - min)/d + 0.5)).
* Q8_0: d = amax / 127, code = roundf(x/d) (ties away from zero).

The "/d" above is a multiplication by the float32 reciprocal, as in ggml; trunc(v + 0.5)
rather than round() is part of the bit-exact contract.

With importance they follow llama.cpp's quantize_row_*_impl: weights
qw * sqrt(sigma2 + x^2), with sigma2 the mean of x^2 over the whole row, feed the
symmetric search (Q4_0, Q5_0) or the offset search (Q4_1, Q5_1). Q8_0 has no search and
ignores importance, like llama.cpp.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as T

from .common import F32, fp16_bytes, fp16_from_bytes, pack_nibbles, reciprocal, round_half_away, signed_absmax, to_fp16
from .search import asymmetric_search, symmetric_search
from .table import BlockCodec


def _importance_weights(blocks, importance, row_sigma2):
    if row_sigma2 is None:  # called without a row: use the block's own mean square
        row_sigma2 = (blocks * blocks).mean(axis=1)
    sigma2 = np.asarray(row_sigma2, dtype=F32).reshape(-1, 1)
    return (importance * np.sqrt(sigma2 + blocks * blocks)).astype(F32)


def _pack_low_nibbles(codes: np.ndarray) -> np.ndarray:
    # Element j (< 16) goes to the low nibble of byte j, element j + 16 to its high nibble.
    codes = codes.astype(np.uint8)
    return pack_nibbles(codes[:, :16], codes[:, 16:])


def _unpack_low_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _pack_fifth_bits(codes: np.ndarray) -> np.ndarray:
    # Bit 4 of element j goes to bit j of a little-endian uint32.
    bits = (codes.astype(np.uint8) >> 4) & 1
    return np.packbits(bits, axis=1, bitorder="little")


def _unpack_fifth_bits(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=1, bitorder="little")[:, :32] << 4


# The two helpers below pick extremes exactly as ggml's loops do, down to the sign of a
# zero: a block of zeros has extreme +0.0 (the loop's starting value), and among equal
# values the first wins. (gguf-py differs only there: for an all-zero block that starts
# with -0.0 it stores d = +0.0 where ggml stores -0.0; both decode to zeros.)


def _extreme(blocks: np.ndarray) -> np.ndarray:
    """The first element of largest magnitude, with its sign; +0.0 for an all-zero block."""
    m = signed_absmax(blocks)
    return np.where(m == 0, F32(0), m)


def _first_min_max(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = np.take_along_axis(blocks, np.argmin(blocks, axis=1)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(blocks, np.argmax(blocks, axis=1)[:, None], axis=1)[:, 0]
    return lo, hi


class _Legacy(BlockCodec):
    needs_row_sigma2 = True


# Q4_0, 18 bytes per 32 weights:
#
#   byte  0       2                                   18
#         +-------+-----------------------------------+
#         |   d   |              qs[16]               |
#         +-------+-----------------------------------+
#          fp16     qs[j] bits 0-3: code of weight j
#                         bits 4-7: code of weight j+16
#
#   weight = d * (code - 8),  code in 0..15
class Q4_0(_Legacy, ggml_type=T.Q4_0):
    @classmethod
    def quantize_blocks(cls, blocks, importance=None, *, row_sigma2=None):
        blocks = np.asarray(blocks, dtype=F32)
        if importance is None:
            d = _extreme(blocks) / F32(-8)
            inv = reciprocal(d)
            codes = np.minimum(np.trunc(blocks * inv[:, None] + F32(8.5)), F32(15))
        else:
            w = _importance_weights(blocks, importance, row_sigma2)
            d, codes = symmetric_search(blocks, w, 8)
        dh = to_fp16(d, cls.name)
        return np.concatenate([fp16_bytes(dh), _pack_low_nibbles(codes)], axis=1)

    @classmethod
    def dequantize_blocks(cls, raw):
        d = fp16_from_bytes(raw[:, :2])
        codes = _unpack_low_nibbles(raw[:, 2:]).astype(np.int8) - np.int8(8)
        return d * codes.astype(F32)


# Q4_1, 20 bytes per 32 weights:
#
#   byte  0       2       4                           20
#         +-------+-------+---------------------------+
#         |   d   |   m   |          qs[16]           |
#         +-------+-------+---------------------------+
#          fp16    fp16     nibbles as in Q4_0
#
#   weight = d * code + m,  code in 0..15
class Q4_1(_Legacy, ggml_type=T.Q4_1):
    @classmethod
    def quantize_blocks(cls, blocks, importance=None, *, row_sigma2=None):
        blocks = np.asarray(blocks, dtype=F32)
        if importance is None:
            lo, hi = _first_min_max(blocks)
            d = (hi - lo) / F32(15)
            inv = reciprocal(d)
            codes = np.minimum(np.trunc((blocks - lo[:, None]) * inv[:, None] + F32(0.5)), F32(15))
            m = lo
        else:
            w = _importance_weights(blocks, importance, row_sigma2)
            d, neg_min, codes = asymmetric_search(blocks, w, 15, -0.9, 0.05, 36, want_codes=True)
            m = -neg_min
        dh, mh = to_fp16(d, cls.name), to_fp16(m, cls.name, "min")
        return np.concatenate([fp16_bytes(dh), fp16_bytes(mh), _pack_low_nibbles(codes)], axis=1)

    @classmethod
    def dequantize_blocks(cls, raw):
        d, m = fp16_from_bytes(raw[:, 0:2]), fp16_from_bytes(raw[:, 2:4])
        return d * _unpack_low_nibbles(raw[:, 4:]).astype(F32) + m


# Q5_0, 22 bytes per 32 weights:
#
#   byte  0       2               6                           22
#         +-------+---------------+---------------------------+
#         |   d   |     qh[4]     |          qs[16]           |
#         +-------+---------------+---------------------------+
#          fp16    uint32 (LE):     low 4 bits of the codes,
#                  bit j = bit 4    nibbles as in Q4_0
#                  of weight j's code
#
#   weight = d * (code - 16),  code in 0..31
class Q5_0(_Legacy, ggml_type=T.Q5_0):
    @classmethod
    def quantize_blocks(cls, blocks, importance=None, *, row_sigma2=None):
        blocks = np.asarray(blocks, dtype=F32)
        if importance is None:
            d = _extreme(blocks) / F32(-16)
            inv = reciprocal(d)
            codes = np.minimum(np.trunc(blocks * inv[:, None] + F32(16.5)), F32(31))
        else:
            w = _importance_weights(blocks, importance, row_sigma2)
            d, codes = symmetric_search(blocks, w, 16)
        dh = to_fp16(d, cls.name)
        return np.concatenate([fp16_bytes(dh), _pack_fifth_bits(codes), _pack_low_nibbles(codes)], axis=1)

    @classmethod
    def dequantize_blocks(cls, raw):
        d = fp16_from_bytes(raw[:, :2])
        codes = _unpack_low_nibbles(raw[:, 6:]) | _unpack_fifth_bits(raw[:, 2:6])
        return d * (codes.astype(np.int8) - np.int8(16)).astype(F32)


# Q5_1, 24 bytes per 32 weights:
#
#   byte  0       2       4               8                           24
#         +-------+-------+---------------+---------------------------+
#         |   d   |   m   |     qh[4]     |          qs[16]           |
#         +-------+-------+---------------+---------------------------+
#          fp16    fp16    fifth bits       low nibbles, as in Q5_0
#
#   weight = d * code + m,  code in 0..31
class Q5_1(_Legacy, ggml_type=T.Q5_1):
    @classmethod
    def quantize_blocks(cls, blocks, importance=None, *, row_sigma2=None):
        blocks = np.asarray(blocks, dtype=F32)
        if importance is None:
            lo, hi = _first_min_max(blocks)
            d = (hi - lo) / F32(31)
            inv = reciprocal(d)
            codes = np.minimum(np.trunc((blocks - lo[:, None]) * inv[:, None] + F32(0.5)), F32(31))
            m = lo
        else:
            w = _importance_weights(blocks, importance, row_sigma2)
            d, neg_min, codes = asymmetric_search(blocks, w, 31, -0.9, 0.05, 36, want_codes=True)
            m = -neg_min
        dh, mh = to_fp16(d, cls.name), to_fp16(m, cls.name, "min")
        return np.concatenate([fp16_bytes(dh), fp16_bytes(mh), _pack_fifth_bits(codes), _pack_low_nibbles(codes)], axis=1)

    @classmethod
    def dequantize_blocks(cls, raw):
        d, m = fp16_from_bytes(raw[:, 0:2]), fp16_from_bytes(raw[:, 2:4])
        codes = _unpack_low_nibbles(raw[:, 8:]) | _unpack_fifth_bits(raw[:, 4:8])
        return d * codes.astype(F32) + m


# Q8_0, 34 bytes per 32 weights:
#
#   byte  0       2                                           34
#         +-------+-------------------------------------------+
#         |   d   |                 qs[32]                    |
#         +-------+-------------------------------------------+
#          fp16     int8, one per weight, in order
#
#   weight = d * q,  q in -127..127
class Q8_0(_Legacy, ggml_type=T.Q8_0):
    needs_row_sigma2 = False

    @classmethod
    def quantize_blocks(cls, blocks, importance=None, *, row_sigma2=None):
        del importance, row_sigma2  # nothing to search: 8 bits leave no choice worth making
        blocks = np.asarray(blocks, dtype=F32)
        d = np.abs(blocks).max(axis=1) / F32(127)
        inv = reciprocal(d)
        q = round_half_away(blocks * inv[:, None]).astype(np.int8)
        dh = to_fp16(d, cls.name)
        return np.concatenate([fp16_bytes(dh), q.view(np.uint8)], axis=1)

    @classmethod
    def dequantize_blocks(cls, raw):
        d = fp16_from_bytes(raw[:, :2])
        return d * np.ascontiguousarray(raw[:, 2:]).view(np.int8).astype(F32)
