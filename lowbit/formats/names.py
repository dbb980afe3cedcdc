"""Format names as the command line and WeightSpec.format spell them.

    int                  the affine grid of WeightSpec's bits / symmetric / restricted fields
    nf4, fp4             bitsandbytes' 4-bit tables, absmax per block of group_size (64)
    nf4-dq, fp4-dq       the same with double quantization of the absmax constants
    bcq1 .. bcq4         binary codes, k scales per (row, group); bcqK-offset adds a shift
    ternary, ternary-tq1 alpha·{-1, 0, 1}, 2-bit or 1.6-bit (TQ1_0-style) packing
    codebook1 .. codebook8  2^k learned float16 centroids per (row, group)
    mixed123             per-group widths 1/2/3 bits by salience (SliM-LLM), the digits the choices
"""

from __future__ import annotations

import re

from ..errors import LowbitError
from .base import WeightFormat, make_format

_PATTERNS = (
    (r"(nf4|fp4)(-dq)?", lambda m, gs, sd: make_format(m[1], group_size=gs, double_quant=bool(m[2]))),
    (r"bcq([1-4])(-offset)?", lambda m, gs, sd: make_format("bcq", bits=int(m[1]), group_size=gs, offset=bool(m[2]), scale_dtype=sd)),
    (r"ternary(-tq1)?", lambda m, gs, sd: make_format("ternary", group_size=gs, packing="tq1" if m[1] else "2bit", scale_dtype=sd)),
    (r"codebook([1-8])", lambda m, gs, sd: make_format("codebook", bits=int(m[1]), group_size=gs, scale_dtype=sd)),
    (r"mixed([1-8]{2,3})", lambda m, gs, sd: make_format("mixed", choices=tuple(sorted({int(c) for c in m[1]})), group_size=gs)),
)
NAMES = "int, nf4, nf4-dq, fp4, fp4-dq, bcq1..bcq4[-offset], ternary, ternary-tq1, codebook1..codebook8, mixed123 (per-group widths)"


def check_format_name(name: str) -> None:
    if not isinstance(name, str) or not any(re.fullmatch(p, name) for p, _ in _PATTERNS):
        raise LowbitError(f"unknown weight format {name!r}; expected one of {NAMES}")


def format_of(spec):
    """The format object of a WeightSpec (wrapped with its float16 outliers, if any)."""
    base = _base_format(spec)
    if spec.outliers:
        from .outliers import WithOutliers

        return WithOutliers(base, float(spec.outliers))
    return base


def _base_format(spec) -> WeightFormat:
    if spec.format == "int":
        from .affine import AffineInt

        return AffineInt.from_spec(spec)
    for pattern, build in _PATTERNS:
        m = re.fullmatch(pattern, spec.format)
        if m:
            return build(m, spec.group_size, spec.scale_dtype)
    check_format_name(spec.format)
    raise AssertionError("unreachable")
