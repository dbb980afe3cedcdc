"""Small numeric pieces shared by the codecs: float16 fields, rounding, byte assembly.

Everything stays in float32, as in ggml's C reference, so that rounding happens at the
same places: a product or quotient of two float32 numbers rounds once, and a scale is
stored by rounding float32 to float16 (nearest, ties to even) exactly once.
"""

from __future__ import annotations

import numpy as np

from ...errors import LowbitError

F32 = np.float32
FP16_MAX = 65504.0

# Below this a group's largest magnitude counts as zero (ggml uses the same bound), so
# the searches never divide by a vanishing maximum.
GROUP_MAX_EPS = F32(1e-15)


def to_fp16(values: np.ndarray, type_name: str, what: str = "scale") -> np.ndarray:
    """Round float32 values to float16, refusing (rather than storing inf) on overflow.

    A block scale above 65504 means weights around 1e5-1e7 (depending on the type): far
    outside anything an LLM holds, and unrepresentable in these formats. ggml would
    silently write inf, which decodes to inf/NaN everywhere in the block.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        h = np.asarray(values, dtype=F32).astype(np.float16)
    bad = ~np.isfinite(h)
    if bad.any():
        worst = np.asarray(values, dtype=F32)[bad].ravel()[0]
        raise LowbitError(
            f"{type_name}: a block {what} of {float(worst):.4g} does not fit in float16 (max {FP16_MAX:g}); "
            f"the weights are too large for this type"
        )
    return h


def fp16_bytes(h: np.ndarray) -> np.ndarray:
    """(n,) float16 -> (n, 2) little-endian bytes."""
    return np.ascontiguousarray(h, dtype="<f2").view(np.uint8).reshape(-1, 2)


def fp16_from_bytes(raw: np.ndarray) -> np.ndarray:
    """(n, 2) bytes -> (n, 1) float32, ready to broadcast over a block."""
    return np.ascontiguousarray(raw).view("<f2").astype(F32).reshape(-1, 1)


def round_half_even(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: adding 1.5*2^23 makes the FPU round, which is ties-to-even."""
    return np.rint(v)


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C roundf, exactly: split off the integer part so no addition can round up early.

    (Adding 0.5 and truncating fails for 0.49999997, whose sum with 0.5 rounds to 1.0.)
    """
    a = np.abs(v)
    whole = np.floor(a)
    up = (a - whole) >= F32(0.5)  # a - floor(a) is exact in float32
    return np.copysign(whole + up.astype(F32), v)


def pack_nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Two uint8 code arrays (< 16) -> one byte each: lo in bits 0-3, hi in bits 4-7."""
    return (lo & 0x0F) | ((hi & 0x0F) << 4)


def pack_bit_planes(planes: np.ndarray, bits: int) -> np.ndarray:
    """OR together ``planes[..., k, :] << (bits*k)`` along axis -2 (k small: 2-8 planes)."""
    out = np.zeros(planes.shape[:-2] + planes.shape[-1:], dtype=np.uint8)
    for k in range(planes.shape[-2]):
        out |= (planes[..., k, :] & ((1 << bits) - 1)) << (bits * k)
    return out


def unpack_bit_planes(packed: np.ndarray, bits: int, n_planes: int) -> np.ndarray:
    """Inverse of pack_bit_planes: (..., n) bytes -> (..., n_planes, n) codes."""
    shifts = (np.arange(n_planes, dtype=np.uint8) * bits).reshape(n_planes, 1)
    return (packed[..., None, :] >> shifts) & np.uint8((1 << bits) - 1)


def signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per row, the first element of largest magnitude, with its sign: (n, m) -> (n,)."""
    idx = np.argmax(np.abs(x), axis=-1)[..., None]
    return np.take_along_axis(x, idx, axis=-1)[..., 0]


def safe_div(num: np.ndarray, den: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """num/den where ``ok``, 0 elsewhere; never divides by zero.

    A quotient that overflows (a subnormal denominator, i.e. weights ~1e-40 that are
    zeros for every practical purpose) also gives 0: its scale rounds to a float16 zero
    anyway, and 0 keeps every code derived from it defined.
    """
    ok = ok & (den != 0)
    with np.errstate(over="ignore"):
        q = np.asarray(num, dtype=F32) / np.where(ok, den, F32(1))
    return np.where(ok & np.isfinite(q), q, F32(0)).astype(F32, copy=False)


def reciprocal(d: np.ndarray) -> np.ndarray:
    """1/d, or 0 where d is 0 (ggml's ``d ? 1/d : 0``) or 1/d overflows."""
    return safe_div(np.ones_like(d, dtype=F32), d, d != 0)
