"""The grid a quantized GGUF tensor's codes live on, once its scales are chosen.

Every GGML type lowbit writes decodes each weight as an affine function of its integer
code, with a scale and offset that depend only on the block's stored scale fields:

    weight = scale * (code - zero) + offset,   code in qmin..qmax

(Q4_0: scale d, zero 8; Q4_K: scale d*sc[j], offset -dmin*m[j]; Q6_K: scale d*sc[j],
zero 32; Q8_0: scale d, codes -127..127; and so on.) ``grid_of`` reads that grid out of
already-quantized bytes, and ``with_codes`` writes new codes into the same bytes, leaving
the scale fields as they are. Together they let an algorithm such as GPTQ choose the
codes itself on the grid of scales the codec's own search picked (see
lowbit.algorithms.gptq_grid).

The float32 arithmetic in ``AffineGrid.decode`` is the decoder's, operation for
operation, so decoding ``with_codes(raw, codes)`` gives exactly ``grid.decode(codes)``
(tests check this against gguf-py's dequantizer for every type).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import LowbitError
from .common import F32, fp16_from_bytes, pack_bit_planes, unpack_bit_planes
from .kquants import _pack_2bit, _pack_4bit_pairs, _unpack_2bit, _unpack_4bit_pairs, _unpack_scale_min_6bit
from .legacy import _pack_fifth_bits, _pack_low_nibbles, _unpack_fifth_bits, _unpack_low_nibbles
from .table import QK_K, codec_for

TypeLike = str | int


@dataclass
class AffineGrid:
    """Per weight (arrays of the tensor's shape [rows, cols]): decoded = scale * (code -
    zero) + offset, for an integer code in qmin..qmax (the same range for every weight)."""

    scale: np.ndarray  # float32
    offset: np.ndarray  # float32
    zero: int
    qmin: int
    qmax: int

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return (self.scale * (codes - self.zero).astype(F32) + self.offset).astype(F32)

    def nearest(self, w: np.ndarray) -> np.ndarray:
        """Round-to-nearest codes of w on this grid (where a scale is 0, any code decodes
        the same; code ``zero`` is taken)."""
        live = self.scale != 0
        step = np.where(live, self.scale, F32(1))
        q = np.rint((np.asarray(w, F32) - self.offset) / step) + self.zero
        return np.where(live, np.clip(q, self.qmin, self.qmax), self.zero).astype(np.int32)


def _per_weight(v: np.ndarray, n: int, sub: int) -> np.ndarray:
    """(n, k) values, one per sub-block of ``sub`` weights -> (n, k * sub)."""
    return np.repeat(v.astype(F32), sub, axis=1).reshape(n, -1)


# Each entry: (grid from raw blocks -> (scale, offset) per weight, zero, qmin, qmax,
#              function writing codes (n_blocks, block_size) into a copy of raw blocks,
#              function reading them back out of raw blocks).


def _legacy_sym(raw, _n):
    d = fp16_from_bytes(raw[:, :2])
    return np.broadcast_to(d, (len(raw), 32)), np.zeros((len(raw), 32), F32)


def _legacy_offset(raw, _n):
    d, m = fp16_from_bytes(raw[:, 0:2]), fp16_from_bytes(raw[:, 2:4])
    return np.broadcast_to(d, (len(raw), 32)), np.broadcast_to(m, (len(raw), 32))


def _set_q4_0(raw, c):
    raw[:, 2:] = _pack_low_nibbles(c)


def _get_q4_0(raw):
    return _unpack_low_nibbles(raw[:, 2:])


def _set_q4_1(raw, c):
    raw[:, 4:] = _pack_low_nibbles(c)


def _get_q4_1(raw):
    return _unpack_low_nibbles(raw[:, 4:])


def _set_q5_0(raw, c):
    raw[:, 2:6], raw[:, 6:] = _pack_fifth_bits(c), _pack_low_nibbles(c)


def _get_q5_0(raw):
    return _unpack_low_nibbles(raw[:, 6:]) | _unpack_fifth_bits(raw[:, 2:6])


def _set_q5_1(raw, c):
    raw[:, 4:8], raw[:, 8:] = _pack_fifth_bits(c), _pack_low_nibbles(c)


def _get_q5_1(raw):
    return _unpack_low_nibbles(raw[:, 8:]) | _unpack_fifth_bits(raw[:, 4:8])


def _set_q8_0(raw, c):
    raw[:, 2:] = c.astype(np.int8).view(np.uint8)


def _get_q8_0(raw):
    return np.ascontiguousarray(raw[:, 2:]).view(np.int8)


def _q2_k(raw, n):
    scales = raw[:, 0:16]
    d, dmin = fp16_from_bytes(raw[:, 80:82]), fp16_from_bytes(raw[:, 82:84])
    return _per_weight(d * (scales & 0x0F).astype(F32), n, 16), _per_weight(-(dmin * (scales >> 4).astype(F32)), n, 16)


def _set_q2_k(raw, c):
    raw[:, 16:80] = _pack_2bit(c)


def _get_q2_k(raw):
    return _unpack_2bit(raw[:, 16:80])


def _q3_k(raw, n):
    sb = raw[:, 96:108]
    low = np.concatenate([sb[:, 0:8] & 0x0F, sb[:, 0:8] >> 4], axis=1)
    high = unpack_bit_planes(sb[:, 8:12], 2, 4).reshape(n, 16)
    s = (low | (high << 4)).astype(np.int8) - np.int8(32)
    d = fp16_from_bytes(raw[:, 108:110])
    return _per_weight(d * s.astype(F32), n, 16), np.zeros((n, QK_K), F32)


def _set_q3_k(raw, c):
    raw[:, 0:32] = pack_bit_planes((c >> 2).reshape(len(c), 8, 32), 1)
    raw[:, 32:96] = _pack_2bit(c & 3)


def _get_q3_k(raw):
    return _unpack_2bit(raw[:, 32:96]) | (unpack_bit_planes(raw[:, 0:32], 1, 8).reshape(len(raw), QK_K) << 2)


def _q45_k(raw, n):
    d, dmin = fp16_from_bytes(raw[:, 0:2]), fp16_from_bytes(raw[:, 2:4])
    sc, m = _unpack_scale_min_6bit(raw[:, 4:16])
    return _per_weight(d * sc.astype(F32), n, 32), _per_weight(-(dmin * m.astype(F32)), n, 32)


def _set_q4_k(raw, c):
    raw[:, 16:144] = _pack_4bit_pairs(c)


def _get_q4_k(raw):
    return _unpack_4bit_pairs(raw[:, 16:144])


def _set_q5_k(raw, c):
    raw[:, 16:48] = pack_bit_planes((c >> 4).reshape(len(c), 8, 32), 1)
    raw[:, 48:176] = _pack_4bit_pairs(c & 0x0F)


def _get_q5_k(raw):
    return _unpack_4bit_pairs(raw[:, 48:176]) | (unpack_bit_planes(raw[:, 16:48], 1, 8).reshape(len(raw), QK_K) << 4)


def _q6_k(raw, n):
    sc = np.ascontiguousarray(raw[:, 192:208]).view(np.int8).astype(F32)
    d = fp16_from_bytes(raw[:, 208:210])
    return _per_weight(d * sc, n, 16), np.zeros((n, QK_K), F32)


def _set_q6_k(raw, c):
    n = len(c)
    quarters = c.reshape(n, 2, 4, 32)
    lo = quarters & 0x0F
    raw[:, 0:128] = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2).reshape(n, 128)
    raw[:, 128:192] = pack_bit_planes(quarters >> 4, 2).reshape(n, 64)


def _get_q6_k(raw):
    n = len(raw)
    ql, qh = raw[:, 0:128].reshape(n, 2, 64), raw[:, 128:192].reshape(n, 2, 32)
    low = np.stack([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
    return (low | (unpack_bit_planes(qh, 2, 4) << 4)).reshape(n, QK_K)


_TYPES = {
    "Q4_0": (_legacy_sym, 8, 0, 15, _set_q4_0, _get_q4_0),
    "Q4_1": (_legacy_offset, 0, 0, 15, _set_q4_1, _get_q4_1),
    "Q5_0": (_legacy_sym, 16, 0, 31, _set_q5_0, _get_q5_0),
    "Q5_1": (_legacy_offset, 0, 0, 31, _set_q5_1, _get_q5_1),
    # -128 decodes too, but ggml's quantizer never writes it and SIMD dot products that
    # take |q| (sign tricks) would overflow on it.
    "Q8_0": (_legacy_sym, 0, -127, 127, _set_q8_0, _get_q8_0),
    "Q2_K": (_q2_k, 0, 0, 3, _set_q2_k, _get_q2_k),
    "Q3_K": (_q3_k, 4, 0, 7, _set_q3_k, _get_q3_k),
    "Q4_K": (_q45_k, 0, 0, 15, _set_q4_k, _get_q4_k),
    "Q5_K": (_q45_k, 0, 0, 31, _set_q5_k, _get_q5_k),
    "Q6_K": (_q6_k, 32, 0, 63, _set_q6_k, _get_q6_k),
}


def grid_types() -> list[str]:
    return list(_TYPES)


def _entry(qtype):
    codec = codec_for(qtype)
    if codec.name not in _TYPES:
        raise LowbitError(f"{codec.name}: no affine code grid (types with one: {', '.join(_TYPES)})")
    return codec, _TYPES[codec.name]


def _blocks(raw: np.ndarray, codec, shape) -> np.ndarray:
    rows, cols = shape
    if cols % codec.block_size or raw.shape != (rows, cols // codec.block_size * codec.type_size):
        raise LowbitError(f"{codec.name}: bytes of shape {raw.shape} do not hold a [{rows}, {cols}] tensor")
    return np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, codec.type_size)


def grid_of(raw: np.ndarray, qtype: TypeLike, shape: tuple[int, int]) -> AffineGrid:
    """The code grid of a [rows, cols] tensor quantized to ``qtype`` (``quantize_tensor``'s
    output, uint8 [rows, row_bytes])."""
    codec, (fn, zero, qmin, qmax, _, _) = _entry(qtype)
    blocks = _blocks(raw, codec, shape)
    scale, offset = fn(blocks, len(blocks))
    return AffineGrid(
        np.ascontiguousarray(scale, F32).reshape(shape), np.ascontiguousarray(offset, F32).reshape(shape), zero, qmin, qmax
    )


def with_codes(raw: np.ndarray, qtype: TypeLike, codes: np.ndarray) -> np.ndarray:
    """A copy of ``raw`` with every weight's code replaced by ``codes`` (ints, the
    tensor's shape, within the grid's qmin..qmax); scale fields are kept."""
    codec, (_, zero, qmin, qmax, setter, _) = _entry(qtype)
    codes = np.asarray(codes)
    blocks = _blocks(raw, codec, codes.shape).copy()
    if codes.size and (codes.min() < qmin or codes.max() > qmax):
        raise LowbitError(f"{codec.name}: codes must lie in {qmin}..{qmax}")
    c = codes.reshape(-1, codec.block_size)
    setter(blocks, c if codec.name == "Q8_0" else c.astype(np.uint8))
    return blocks.reshape(raw.shape)


def codes_of(raw: np.ndarray, qtype: TypeLike, shape: tuple[int, int]) -> np.ndarray:
    """Every weight's integer code (int32, ``shape``, in the grid's qmin..qmax) as stored
    in ``raw``: the inverse of ``with_codes`` on the same scale fields."""
    codec, (_, _, _, _, _, getter) = _entry(qtype)
    blocks = _blocks(raw, codec, shape)
    return np.ascontiguousarray(getter(blocks), dtype=np.int32).reshape(shape)
