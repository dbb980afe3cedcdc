"""The k-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, on super-blocks of 256 weights.

A super-block holds 8 or 16 sub-blocks, each with its own small integer scale (and, for
Q2_K/Q4_K/Q5_K, a min), quantized against one float16 ``d`` (and ``dmin``). Quantizing
is three steps, the same for every type:

1. per sub-block, search a float scale (and min) -- see search.py;
2. quantize those sub-block scales and mins to 4, 6 or 8 bits against d and dmin;
3. re-quantize every weight against the scale it will actually be decoded with,
   d(fp16) * sub-scale code, so rounding in steps 1-2 does not leave codes stale.

Without importance, step 1 uses llama.cpp's default weighting and step 2 maps the
largest sub-scale to the top code (quantize_row_*_ref). With importance, step 1 weights
each weight by qw * sqrt(sigma2 + x^2) (qw alone for Q6_K) and step 2 is itself a
weighted search over the sub-scales (quantize_row_*_impl).
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as T

from .common import (
    F32,
    GROUP_MAX_EPS,
    fp16_bytes,
    fp16_from_bytes,
    pack_bit_planes,
    pack_nibbles,
    round_half_even,
    safe_div,
    signed_absmax,
    to_fp16,
    unpack_bit_planes,
)
from .search import asymmetric_search, positive_scale_search, seq_rowsum, symmetric_refine, symmetric_search
from .table import QK_K, BlockCodec


class _KQuant(BlockCodec):
    pass


# ---------------------------------------------------------------- shared steps


def _sub_blocks(blocks: np.ndarray, size: int) -> np.ndarray:
    """(n, 256) -> (n * 256/size, size): one row per sub-block, for the searches."""
    return blocks.reshape(-1, size)


def _super_sigma2(blocks: np.ndarray, factor: float) -> np.ndarray:
    """factor * mean(x^2) over each super-block, broadcastable to (n, 256)."""
    return (F32(factor) * seq_rowsum(blocks * blocks) / F32(QK_K)).astype(F32)[:, None]


def _quantize_by_max(values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes round(values * top/max) in 0..top and the float step max/top (0 if max <= 0)."""
    vmax = np.maximum(values.max(axis=1), F32(0))
    live = vmax > 0
    inv = safe_div(np.full_like(vmax, top), vmax, live)
    codes = np.clip(round_half_even(inv[:, None] * values), F32(0), F32(top))
    step = np.where(live, vmax / F32(top), F32(0)).astype(F32)
    return step, codes


# Where a sub-block's stored scale decodes to 0 its codes do not affect the decoded
# values; like ggml we then keep the codes the search found (so bytes match ggml's).


def _requantize_offset(x, d_sub, m_sub, nmax, search_codes):
    """Codes of x = d_sub * q - m_sub, q in 0..nmax."""
    ok = d_sub != 0
    q = round_half_even((x + m_sub[..., None]) / np.where(ok, d_sub, F32(1))[..., None])
    return np.where(ok[..., None], np.clip(q, F32(0), F32(nmax)), search_codes).astype(np.uint8)


def _requantize_symmetric(x, d_sub, nmax, search_codes):
    """Codes q + nmax of x = d_sub * q, q in -nmax..nmax-1."""
    ok = d_sub != 0
    q = round_half_even(x / np.where(ok, d_sub, F32(1))[..., None])
    q = np.clip(q, F32(-nmax), F32(nmax - 1)) + F32(nmax)
    return np.where(ok[..., None], q, search_codes).astype(np.uint8)


def _pack_2bit(codes: np.ndarray) -> np.ndarray:
    # (n, 256) codes < 4 -> (n, 64): byte 32h + l holds weight 128h + 32k + l at bits 2k.
    planes = codes.reshape(-1, 2, 4, 32)
    return pack_bit_planes(planes, 2).reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    return unpack_bit_planes(qs.reshape(-1, 2, 32), 2, 4).reshape(-1, QK_K)


def _pack_4bit_pairs(codes: np.ndarray) -> np.ndarray:
    # (n, 256) codes < 16 -> (n, 128): byte 32c + l = weight 64c + l | weight 64c + 32 + l << 4.
    pairs = codes.reshape(-1, 4, 2, 32)
    return pack_nibbles(pairs[:, :, 0], pairs[:, :, 1]).reshape(-1, 128)


def _unpack_4bit_pairs(qs: np.ndarray) -> np.ndarray:
    return unpack_bit_planes(qs.reshape(-1, 4, 32), 4, 2).reshape(-1, QK_K)


# The 12-byte scales field of Q4_K and Q5_K: eight 6-bit sub-block scales sc[0..7] and
# eight 6-bit mins m[0..7]. For j = 0..3 (x:5-4 = bits 5-4 of x):
#
#   bit          7     6     5     4     3     2     1     0
#             +-----------+-----------------------------------+
#   byte j    | sc[j+4]:5-4 |            sc[j]:5-0            |
#             +-----------+-----------------------------------+
#   byte j+4  | m[j+4]:5-4  |             m[j]:5-0            |
#             +-----------------------+-----------------------+
#   byte j+8  |      m[j+4]:3-0       |      sc[j+4]:3-0      |
#             +-----------------------+-----------------------+
def _pack_scale_min_6bit(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    return np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            m[:, :4] | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4),
        ],
        axis=1,
    )


def _unpack_scale_min_6bit(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo_sc, lo_m, hi = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([lo_sc & 0x3F, (hi & 0x0F) | ((lo_sc >> 6) << 4)], axis=1)
    m = np.concatenate([lo_m & 0x3F, (hi >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return sc, m


def _asymmetric_superblock(cls, blocks, importance, *, sub, nmax, code_bits, ref_search, sigma2_factor):
    """Steps 1 and 2 for the offset k-quants (Q2_K, Q4_K, Q5_K).

    ``ref_search`` = (rmin, rdelta, nstep, use_mad, weighting) of the search without
    importance; ``sigma2_factor`` scales the super-block mean square in the importance
    weights (1 for Q2_K, 2 for Q4_K/Q5_K, as in llama.cpp). Returns fp16 d, fp16 dmin,
    the (n, n_sub) scale and min codes and the search's (n, n_sub, sub) weight codes.
    """
    xs = _sub_blocks(blocks, sub)
    top = (1 << code_bits) - 1
    if importance is None:
        rmin, rdelta, nstep, use_mad, weighting = ref_search
        if weighting == "abs":  # Q2_K: 16 weights, fit by weighted absolute error
            w = np.abs(xs)
        else:  # Q4_K/Q5_K: sub-block rms plus |x| keeps small weights from being ignored
            w = np.sqrt(seq_rowsum(xs * xs) / F32(sub))[:, None] + np.abs(xs)
        scale, the_min, codes = asymmetric_search(xs, w.astype(F32), nmax, rmin, rdelta, nstep, use_mad, True)
        scale, the_min = scale.reshape(len(blocks), -1), the_min.reshape(len(blocks), -1)
        d, sc = _quantize_by_max(scale, top)
        dmin, mc = _quantize_by_max(the_min, top)
    else:
        sigma2 = _super_sigma2(blocks, sigma2_factor)
        w = (importance * np.sqrt(sigma2 + blocks * blocks)).astype(F32)
        ws = _sub_blocks(w, sub)
        scale, the_min, codes = asymmetric_search(xs, ws, nmax, -0.9, 0.05, 36, want_codes=True)
        scale, the_min = scale.reshape(len(blocks), -1), the_min.reshape(len(blocks), -1)
        sw = seq_rowsum(ws).reshape(len(blocks), -1)
        d, sc = positive_scale_search(scale, sw, top)
        dmin, mc = positive_scale_search(the_min, sw, top)
    codes = codes.reshape(len(blocks), -1, sub)
    return to_fp16(d, cls.name), to_fp16(dmin, cls.name, "min"), sc, mc, codes


def _offset_codes(blocks, dh, dminh, sc, mc, sub, nmax, search_codes):
    """Step 3 for the offset k-quants: (n, 256) codes against the stored scales."""
    d_sub = dh.astype(F32)[:, None] * sc.astype(F32)
    m_sub = dminh.astype(F32)[:, None] * mc.astype(F32)
    x = blocks.reshape(len(blocks), -1, sub)
    return _requantize_offset(x, d_sub, m_sub, nmax, search_codes).reshape(-1, QK_K)


def _offset_decode(d, dmin, sc, mc, codes, sub):
    dl = (d * sc.astype(F32))[:, :, None]
    ml = (dmin * mc.astype(F32))[:, :, None]
    return (dl * codes.reshape(len(codes), -1, sub).astype(F32) - ml).reshape(-1, QK_K)


# ---------------------------------------------------------------- Q2_K


# Q2_K, 84 bytes per 256 weights = 16 sub-blocks of 16:
#
#   byte  0              16                               80      82      84
#         +--------------+--------------------------------+-------+-------+
#         |  scales[16]  |             qs[64]             |   d   | dmin  |
#         +--------------+--------------------------------+-------+-------+
#   scales[j]: bits 0-3 scale code sc[j], bits 4-7 min code m[j] of sub-block j
#   qs:        byte 32h + l, bits 2k..2k+1 = code of weight 128h + 32k + l
#              (h = 0..1, k = 0..3, l = 0..31)
#
#   weight = d * sc[j] * q - dmin * m[j],  q in 0..3
class Q2_K(_KQuant, ggml_type=T.Q2_K):
    @classmethod
    def quantize_blocks(cls, blocks, importance=None):
        blocks = np.asarray(blocks, dtype=F32)
        dh, dminh, sc, mc, search_codes = _asymmetric_superblock(
            cls, blocks, importance, sub=16, nmax=3, code_bits=4, ref_search=(-0.5, 0.1, 15, True, "abs"), sigma2_factor=1.0
        )
        codes = _offset_codes(blocks, dh, dminh, sc, mc, 16, 3, search_codes)
        scales = (sc.astype(np.uint8) & 0x0F) | (mc.astype(np.uint8) << 4)
        return np.concatenate([scales, _pack_2bit(codes), fp16_bytes(dh), fp16_bytes(dminh)], axis=1)

    @classmethod
    def dequantize_blocks(cls, raw):
        scales = raw[:, 0:16]
        d, dmin = fp16_from_bytes(raw[:, 80:82]), fp16_from_bytes(raw[:, 82:84])
        return _offset_decode(d, dmin, scales & 0x0F, scales >> 4, _unpack_2bit(raw[:, 16:80]), 16)


# ---------------------------------------------------------------- Q3_K


# Q3_K, 110 bytes per 256 weights = 16 sub-blocks of 16:
#
#   byte  0              32                  96              108     110
#         +--------------+-------------------+---------------+-------+
#         |  hmask[32]   |      qs[64]       |  scales[12]   |   d   |
#         +--------------+-------------------+---------------+-------+
#   code q = 4 * hbit + lo, q in 0..7, weight = d * (s[j] - 32) * (q - 4)
#   hmask: byte l, bit b = hbit of weight 32b + l
#   qs:    lo (2 bits) of each weight, arranged as in Q2_K
#   scales: sixteen 6-bit s[j] (signed scale + 32)
#     byte j (0..7):  bits 0-3 = s[j] bits 0-3,  bits 4-7 = s[j+8] bits 0-3
#     byte 8+i (0..3): bits 2g..2g+1 = s[4g+i] bits 4-5  (g = 0..3)
class Q3_K(_KQuant, ggml_type=T.Q3_K):
    @classmethod
    def quantize_blocks(cls, blocks, importance=None):
        blocks = np.asarray(blocks, dtype=F32)
        n = len(blocks)
        xs = _sub_blocks(blocks, 16)
        if importance is None:
            # llama.cpp's reference: weights x^2 and a coordinate-descent refinement, then
            # the sub-scale of largest magnitude sets d so that it maps to -32.
            scale, search_codes = symmetric_refine(xs, 4)
            scale = scale.reshape(n, 16)
            smax = signed_absmax(scale)
            live = smax != 0
            inv = safe_div(np.full_like(smax, -32), smax, live)
            s = np.clip(round_half_even(inv[:, None] * scale), F32(-32), F32(31)) + F32(32)
            s = np.where(live[:, None], s, F32(0))
            d = safe_div(np.ones_like(inv), inv, live)
        else:
            sigma2 = _super_sigma2(blocks, 2.0)
            w = _sub_blocks((importance * np.sqrt(sigma2 + blocks * blocks)).astype(F32), 16)
            scale, search_codes = symmetric_search(xs, w, 4)
            sw = seq_rowsum(w).reshape(n, 16)
            d, s = symmetric_search(scale.reshape(n, 16), sw, 32)  # s already offset by 32
        dh = to_fp16(d, cls.name)
        d_sub = dh.astype(F32)[:, None] * (s - F32(32))
        search_codes = search_codes.reshape(n, 16, 16)
        codes = _requantize_symmetric(blocks.reshape(n, 16, 16), d_sub, 4, search_codes).reshape(n, QK_K)
        s = s.astype(np.uint8)
        scales = np.concatenate([pack_nibbles(s[:, 0:8], s[:, 8:16]), pack_bit_planes((s >> 4).reshape(n, 4, 4), 2)], axis=1)
        hmask = pack_bit_planes((codes >> 2).reshape(n, 8, 32), 1)
        return np.concatenate([hmask, _pack_2bit(codes & 3), scales, fp16_bytes(dh)], axis=1)

    @classmethod
    def dequantize_blocks(cls, raw):
        n = len(raw)
        hmask, qs, sb = raw[:, 0:32], raw[:, 32:96], raw[:, 96:108]
        d = fp16_from_bytes(raw[:, 108:110])
        low = np.concatenate([sb[:, 0:8] & 0x0F, sb[:, 0:8] >> 4], axis=1)
        high = unpack_bit_planes(sb[:, 8:12], 2, 4).reshape(n, 16)
        s = (low | (high << 4)).astype(np.int8) - np.int8(32)
        hbit = unpack_bit_planes(hmask, 1, 8).reshape(n, QK_K)
        q = (_unpack_2bit(qs) | (hbit << 2)).astype(np.int8) - np.int8(4)
        dl = (d * s.astype(F32))[:, :, None]
        return (dl * q.reshape(n, 16, 16).astype(F32)).reshape(n, QK_K)


# ---------------------------------------------------------------- Q4_K


# Q4_K, 144 bytes per 256 weights = 8 sub-blocks of 32:
#
#   byte  0       2       4              16                                  144
#         +-------+-------+--------------+-----------------------------------+
#         |   d   | dmin  |  scales[12]  |              qs[128]              |
#         +-------+-------+--------------+-----------------------------------+
#   scales: 6-bit sc[j], m[j], packed as drawn above _pack_scale_min_6bit
#   qs:     byte 32c + l: bits 0-3 = code of weight 64c + l,
#                         bits 4-7 = code of weight 64c + 32 + l   (c = 0..3)
#
#   weight = d * sc[j] * q - dmin * m[j],  q in 0..15
class Q4_K(_KQuant, ggml_type=T.Q4_K):
    @classmethod
    def quantize_blocks(cls, blocks, importance=None):
        blocks = np.asarray(blocks, dtype=F32)
        dh, dminh, sc, mc, search_codes = _asymmetric_superblock(
            cls, blocks, importance, sub=32, nmax=15, code_bits=6, ref_search=(-1.0, 0.1, 20, False, "rms"), sigma2_factor=2.0
        )
        codes = _offset_codes(blocks, dh, dminh, sc, mc, 32, 15, search_codes)
        return np.concatenate([fp16_bytes(dh), fp16_bytes(dminh), _pack_scale_min_6bit(sc, mc), _pack_4bit_pairs(codes)], axis=1)

    @classmethod
    def dequantize_blocks(cls, raw):
        d, dmin = fp16_from_bytes(raw[:, 0:2]), fp16_from_bytes(raw[:, 2:4])
        sc, mc = _unpack_scale_min_6bit(raw[:, 4:16])
        return _offset_decode(d, dmin, sc, mc, _unpack_4bit_pairs(raw[:, 16:144]), 32)


# ---------------------------------------------------------------- Q5_K


# Q5_K, 176 bytes per 256 weights = 8 sub-blocks of 32:
#
#   byte  0       2       4              16             48                   176
#         +-------+-------+--------------+--------------+--------------------+
#         |   d   | dmin  |  scales[12]  |    qh[32]    |      qs[128]       |
#         +-------+-------+--------------+--------------+--------------------+
#   scales: as in Q4_K
#   qh:     byte l, bit k = bit 4 of the code of weight 32k + l   (k = 0..7)
#   qs:     bits 0-3 of the codes, arranged as in Q4_K
#
#   weight = d * sc[j] * q - dmin * m[j],  q in 0..31
class Q5_K(_KQuant, ggml_type=T.Q5_K):
    @classmethod
    def quantize_blocks(cls, blocks, importance=None):
        blocks = np.asarray(blocks, dtype=F32)
        dh, dminh, sc, mc, search_codes = _asymmetric_superblock(
            cls, blocks, importance, sub=32, nmax=31, code_bits=6, ref_search=(-0.5, 0.1, 15, False, "rms"), sigma2_factor=2.0
        )
        codes = _offset_codes(blocks, dh, dminh, sc, mc, 32, 31, search_codes)
        qh = pack_bit_planes((codes >> 4).reshape(-1, 8, 32), 1)
        return np.concatenate(
            [fp16_bytes(dh), fp16_bytes(dminh), _pack_scale_min_6bit(sc, mc), qh, _pack_4bit_pairs(codes & 0x0F)],
            axis=1,
        )

    @classmethod
    def dequantize_blocks(cls, raw):
        d, dmin = fp16_from_bytes(raw[:, 0:2]), fp16_from_bytes(raw[:, 2:4])
        sc, mc = _unpack_scale_min_6bit(raw[:, 4:16])
        high = unpack_bit_planes(raw[:, 16:48], 1, 8).reshape(-1, QK_K)
        codes = _unpack_4bit_pairs(raw[:, 48:176]) | (high << 4)
        return _offset_decode(d, dmin, sc, mc, codes, 32)


# ---------------------------------------------------------------- Q6_K


# Q6_K, 210 bytes per 256 weights = 16 sub-blocks of 16:
#
#   byte  0                      128            192             208     210
#         +----------------------+--------------+---------------+-------+
#         |        ql[128]       |    qh[64]    |  scales[16]   |   d   |
#         +----------------------+--------------+---------------+-------+
#   code q in 0..63; each half h = 0..1 covers weights 128h .. 128h+127, l = 0..31:
#     ql[64h + l]      bits 0-3: q[128h + l]        bits 4-7: q[128h + 64 + l]  (low 4 bits)
#     ql[64h + 32 + l] bits 0-3: q[128h + 32 + l]   bits 4-7: q[128h + 96 + l]
#     qh[32h + l]      bits 2k..2k+1: bits 4-5 of q[128h + 32k + l]  (k = 0..3)
#   scales: int8, one per sub-block of 16
#
#   weight = d * scales[j] * (q - 32)
class Q6_K(_KQuant, ggml_type=T.Q6_K):
    @classmethod
    def quantize_blocks(cls, blocks, importance=None):
        blocks = np.asarray(blocks, dtype=F32)
        n = len(blocks)
        xs = _sub_blocks(blocks, 16)
        # Default weights x^2; with importance llama.cpp passes the imatrix as the weights
        # directly (its sqrt(sigma2 + x^2) factor is commented out for this type).
        w = xs * xs if importance is None else _sub_blocks(np.asarray(importance, dtype=F32), 16)
        scale, search_codes = symmetric_search(xs, w, 32)
        scale = scale.reshape(n, 16)
        smax = signed_absmax(scale)
        live = np.abs(smax) >= GROUP_MAX_EPS
        inv = safe_div(np.full_like(smax, -128), smax, live)
        sc = np.where(live[:, None], np.clip(round_half_even(inv[:, None] * scale), F32(-128), F32(127)), F32(0))
        dh = to_fp16(safe_div(np.ones_like(inv), inv, live), cls.name)
        d_sub = dh.astype(F32)[:, None] * sc
        search_codes = search_codes.reshape(n, 16, 16)
        codes = _requantize_symmetric(blocks.reshape(n, 16, 16), d_sub, 32, search_codes).reshape(n, QK_K)
        codes = np.where(live[:, None], codes, np.uint8(0))  # a dead block is all zero bytes
        quarters = codes.reshape(n, 2, 4, 32)
        ql = np.concatenate(
            [pack_nibbles(quarters[:, :, 0], quarters[:, :, 2]), pack_nibbles(quarters[:, :, 1], quarters[:, :, 3])],
            axis=2,
        ).reshape(n, 128)
        qh = pack_bit_planes(quarters >> 4, 2).reshape(n, 64)
        return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), fp16_bytes(dh)], axis=1)

    @classmethod
    def dequantize_blocks(cls, raw):
        n = len(raw)
        ql, qh = raw[:, 0:128].reshape(n, 2, 64), raw[:, 128:192].reshape(n, 2, 32)
        sc = np.ascontiguousarray(raw[:, 192:208]).view(np.int8).astype(F32)
        d = fp16_from_bytes(raw[:, 208:210])
        low = np.stack([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
        high = unpack_bit_planes(qh, 2, 4)
        q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(n, 16, 16)
        return ((d * sc)[:, :, None] * q.astype(F32)).reshape(n, QK_K)
