"""Format names as the command line and WeightSpec.format spell them.

    int                  the affine grid of WeightSpec's bits / symmetric / restricted fields
    nf4, fp4             bitsandbytes' 4-bit tables, absmax per block of group_size (64)
    nf4-dq, fp4-dq       the same with double quantization of the absmax constants
    bcq1 .. bcq4         binary codes, k scales per (row, group); bcqK-offset adds a shift
    ternary, ternary-tq1 alpha·{-1, 0, 1}, 2-bit or 1.6-bit (TQ1_0-style) packing
    codebook1 .. codebook8  2^k learned float16 centroids per (row, group)
    codebook1-col .. codebook8-col  2^k centroids per input column, shared by all rows (CLAQ)
    bitnet, bitnet158    BitNet's 1-bit sign(W - mean W)·mean|W| and BitNet b1.58's absmean ternary, one
                         scale per matrix as the papers define them (the group size is ignored)
    claq2 .. claq4[-or]  CLAQ: per-column k-means codebooks, fractional widths by outlier count
                         (claq2.1: 5% of columns at 4 bits, the rest 2; claq3.1), -or: float16 outliers
    billm, billm-int8    BiLLM's binarization per block of group_size columns (salient columns with two
                         binary bases, the rest split at a break point); -int8: its scales as int8
    mixed123             per-group widths 1/2/3 bits by salience (SliM-LLM), the digits the choices;
                         mixed123@2.1: the codes' average set to 2.1 bits (default the middle choice)
    Q4_0 .. Q8_0, Q2_K .. Q6_K   a GGML block type (formats.ggml); the width must be a multiple of its block
    Q4_K_M, Q6_K, Q2_K, ...  a llama.cpp file type (what llama-quantize accepts): a GGML type per
                         tensor, chosen for the model by llama.cpp's rules, fallbacks for widths
                         included (lowbit.formats.plan); every Linear gets its own override.
                         Q3_K, Q4_K, Q5_K (no file type of that name) are strict single types
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
    (r"codebook([1-8])-col", lambda m, gs, sd: make_format("codebook-col", bits=int(m[1]), group_size=1, scale_dtype=sd)),
    (r"bitnet(158)?", lambda m, gs, sd: make_format("bitnet", ternary=bool(m[1]))),
    (r"claq([234](?:\.\d+)?)(-or)?", lambda m, gs, sd: _claq(m)),
    (r"billm(-int8)?", lambda m, gs, sd: make_format("billm", group_size=gs, scale_dtype="int8" if m[1] else sd)),
    (r"mixed([1-8]{2,3})(?:@(\d+(?:\.\d+)?))?", lambda m, gs, sd: make_format(
        "mixed", choices=tuple(sorted({int(c) for c in m[1]})), group_size=gs, target=float(m[2]) if m[2] else None)),
)
_GGML = r"(Q4_0|Q4_1|Q5_0|Q5_1|Q8_0|Q2_K|Q3_K|Q4_K|Q5_K|Q6_K)"
NAMES = "int, Q4_0..Q8_0 / Q2_K..Q6_K (GGML types), Q4_K_M etc. (llama.cpp mixtures), nf4, nf4-dq, fp4, fp4-dq, bcq1..bcq4[-offset], ternary, ternary-tq1, codebook1..codebook8[-col], billm[-int8], claq2.1 etc. [-or], bitnet, bitnet158, mixed123[@2.1] (per-group widths)"


def _claq(m) -> WeightFormat:
    from .claq import claq_setting

    bits, high, share = claq_setting(float(m[1]))
    return make_format("claq", bits=bits, high=high, share_high=share, reserve=bool(m[2]))


def canonical(name: str) -> str:
    """GGML type and mixture names are case-insensitive (q4_k_m = Q4_K_M); others as given."""
    if isinstance(name, str) and (re.fullmatch(_GGML, name.upper()) or is_mixture(name.upper())):
        return name.upper()
    return name


def is_mixture(name: str) -> bool:
    """A llama.cpp file type that quantizes weights (Q4_K_M, Q6_K, Q8_0, Q2_K, ...): a
    per-tensor plan, resolved for a model by ``lowbit.quantize`` with llama.cpp's rules,
    fallbacks for widths a block does not divide included. As a layer's own format (the
    plan's overrides) a name such as Q6_K is the GGML type itself."""
    from ..export.gguf_presets import PRESETS

    return isinstance(name, str) and name in PRESETS and name not in ("F32", "F16", "BF16", "IQ4_NL", "TQ1_0", "TQ2_0")


def is_ggml(name: str) -> bool:
    return isinstance(name, str) and re.fullmatch(_GGML, name) is not None


def check_format_name(name: str) -> None:
    if is_ggml(name) or is_mixture(name):
        return
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
    if is_ggml(spec.format):  # a layer's own type (a mixture's plan gives every layer one)
        from .ggml import GGMLType

        return GGMLType(spec.format)
    if is_mixture(spec.format):
        raise LowbitError(f"format {spec.format} is a per-tensor plan: lowbit.quantize resolves it for a model's layers")
    for pattern, build in _PATTERNS:
        m = re.fullmatch(pattern, spec.format)
        if m:
            return build(m, spec.group_size, spec.scale_dtype)
    check_format_name(spec.format)
    raise AssertionError("unreachable")


def round_to_nearest(w, spec, name: str = "weight"):
    """Round-to-nearest of w under ``spec`` in its own format: the affine grid
    (formats.weights) or any format of the family (formats.base.quantize_matrix)."""
    if spec.in_family:
        from .base import quantize_matrix

        return quantize_matrix(format_of(spec), w, name=name)
    from .weights import quantize_weight

    return quantize_weight(w, spec, name=name)
