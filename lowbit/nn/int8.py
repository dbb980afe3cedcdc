"""The real int8 compute path: int8 x int8 -> int32 matrix products on the CPU.

The reference path (QuantLinear.forward) dequantizes both operands and multiplies floats.
This path multiplies the integer codes themselves with ``torch._int_mm`` (oneDNN's VNNI
kernels: ~2.5x faster than float32 on SmolLM2's shapes here) and applies the scales to
the int32 result once. With activation codes a (zero point za, scale sx: one per token
when dynamic, one per tensor when static) and weight codes q (zero point z, scale s per
output row and group), the output of row r is

    y[t, r] = sx[t] * sum_g s[r, g] * sum_{j in g} (a[t, j] - za[t]) * (q[r, j] - z[r, g])

and the inner integer sum expands into one int8 product plus corrections:

    sum a q  -  za * sum_j q[r, j]  -  z[r, g] * sum_j a[t, j]  +  n_g * za * z[r, g]

The weight row sums are computed once per weight; the activation sums once per input;
a term vanishes when its zero point is 0 (symmetric grids). Codes are stored unsigned
(lowbit's convention); both operands are shifted by 2**(bits-1) into int8 first, which
changes no difference (a - za) or (q - z).

The integer sums are exact (int32 products, corrections in int32 where the bound allows,
else int64); the only rounding is the final conversion to float and the scale products,
so this path agrees with the reference to float rounding. Group-wise weights take one
int8 product per group (contiguous groups only). LLM.int8()'s outlier columns
(``ActSpec.outlier_threshold``) are zeroed in the int8 operand and multiplied in float32
against their dequantized weight columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ActSpec
from ..errors import LowbitError
from ..formats.activations import act_grid, dynamic_qparams, outlier_columns
from ..formats.weights import QuantizedWeight, default_g_idx

# int32 products of int8 operands are exact while 128 * 128 * n < 2**31
MAX_INT_MM_COLUMNS = 2**31 // (128 * 128) - 1
# the four correction terms together stay below 2**31 while 4 * 128 * 128 * n < 2**31
_INT32_CORRECTION_COLUMNS = 2**31 // (4 * 128 * 128) - 1


@dataclass
class Int8Weight:
    """A QuantizedWeight in the form the int8 product reads it."""

    codes: torch.Tensor  # [out, in] int8: q - 2**(bits-1)
    zero: torch.Tensor | None  # [out, G] int32: z - 2**(bits-1); None when 0 (symmetric)
    scale: torch.Tensor  # [out, G] float32
    row_sum: torch.Tensor  # [out, G] int32: sum of the shifted codes over each group
    bounds: list[tuple[int, int]]  # [start, end) of each group's columns

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]


def group_bounds(in_features: int, group_size: int | None) -> list[tuple[int, int]]:
    gs = group_size or in_features
    return [(i, min(i + gs, in_features)) for i in range(0, in_features, gs)]


def unsupported_reason(qweight: QuantizedWeight | None, aspec: ActSpec | None) -> str | None:
    """Why a layer cannot run on the int8 path (None: it can)."""
    if qweight is None:
        return "its weights are float (only activations are quantized)"
    if aspec is None:
        return "its activations are not quantized"
    if aspec.group_size is not None:
        return "its activations have per-token groups"
    if not qweight.has_trivial_g_idx():
        return "its weight groups are permuted (act-order g_idx)"
    gs = qweight.group_size or qweight.shape[1]
    if gs > MAX_INT_MM_COLUMNS:
        return f"its groups are wider than {MAX_INT_MM_COLUMNS} columns (int32 accumulation could overflow)"
    return None


def prepare_weight(qweight: QuantizedWeight) -> Int8Weight:
    half = 2 ** (qweight.grid.bits - 1)
    codes = (qweight.codes.to(torch.int16) - half).to(torch.int8)
    bounds = group_bounds(qweight.shape[1], qweight.group_size)
    if not torch.equal(qweight.g_idx, default_g_idx(qweight.shape[1], qweight.group_size)):
        raise LowbitError("the int8 path needs contiguous weight groups (no act-order g_idx)")
    row_sum = torch.stack([codes[:, a:b].sum(1, dtype=torch.int32) for a, b in bounds], 1)
    zero = None if qweight.zero is None else qweight.zero.to(torch.int32) - half
    if zero is not None and not bool(zero.any()):
        zero = None
    return Int8Weight(codes.contiguous(), zero, qweight.scale.float(), row_sum, bounds)


def quantize_act_int8(
    x: torch.Tensor, spec: ActSpec, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Int8 codes of x [tokens, in] (the same codes the reference path's fake quantizer
    makes, shifted by 2**(bits-1)), their shifted zero points (int32, [tokens, 1] or [])
    and scales (float32). Static (scale, zero) when given, else dynamic per token/tensor."""
    if scale is None:
        scale, zero = dynamic_qparams(x, spec)
    grid = act_grid(spec)
    half = 2 ** (spec.bits - 1)
    s = scale.float()
    z = zero.float() - half
    q = torch.clamp(torch.round(x.float() / s) + z, grid.qmin - half, grid.qmax - half).to(torch.int8)
    return q, z.to(torch.int32), s


def _ceil8(n: int) -> int:
    return n + (-n) % 8


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [m, k] int8 times b [k, n] int8 -> int32 [m, n], exact. ``torch._int_mm`` takes
    only m > 16 and k, n multiples of 8; other shapes (a few tokens, a ragged last group,
    odd widths) are zero-padded to ones it takes: zero codes add nothing to the sums."""
    m, k = a.shape
    n = b.shape[1]
    if m > 16 and m % 8 == 0 and k % 8 == 0 and n % 8 == 0:
        return torch._int_mm(a, b)
    pm, pk, pn = max(24, _ceil8(m)), _ceil8(k), _ceil8(n)
    ap = torch.zeros(pm, pk, dtype=torch.int8)
    ap[:m, :k] = a
    if (pk, pn) == (k, n):
        bp = b  # only the row count needed padding: the weight is used as it is, not copied
    else:
        bp = torch.zeros(pk, pn, dtype=torch.int8)
        bp[:k, :n] = b
    return torch._int_mm(ap, bp)[:m, :n]


def int_accumulate(a: torch.Tensor, a_zero: torch.Tensor, w: Int8Weight) -> list[torch.Tensor]:
    """Per weight group g, the exact integer sum_{j in g} (a - za)(q - z) as [tokens, out]
    (int32, or int64 where int32 could overflow), from one int8 product per group."""
    za = a_zero.reshape(-1, 1) if a_zero.dim() else a_zero
    has_za = bool(a_zero.any())
    out = []
    for g, (lo, hi) in enumerate(w.bounds):
        ag = a if len(w.bounds) == 1 else a[:, lo:hi]
        acc = int_mm(ag, w.codes[:, lo:hi].t())
        if hi - lo > _INT32_CORRECTION_COLUMNS:
            acc = acc.long()
        if has_za:
            acc -= za * w.row_sum[:, g].to(acc.dtype)
        if w.zero is not None:
            zg = w.zero[:, g].to(acc.dtype)
            a_sum = ag.sum(1, keepdim=True, dtype=acc.dtype)
            acc -= a_sum * zg
            if has_za:
                acc += (hi - lo) * za.to(acc.dtype) * zg
        out.append(acc)
    return out


def int8_matmul(
    x: torch.Tensor,
    w: Int8Weight,
    aspec: ActSpec,
    act_scale: torch.Tensor | None = None,
    act_zero: torch.Tensor | None = None,
    dequant_columns=None,
) -> torch.Tensor:
    """x [..., in] (float) times the int8 weight, through int8 products; float32 result
    [..., out]. ``dequant_columns(mask)`` returns the float weight columns LLM.int8()'s
    outlier columns are multiplied with (needed only when aspec has a threshold)."""
    shape = x.shape
    xf = x.reshape(-1, shape[-1]).float()
    cols = None
    if aspec.outlier_threshold is not None and act_scale is None:
        cols = outlier_columns(xf, aspec.outlier_threshold)
        if bool(cols.any()):
            xf_reg = xf.masked_fill(cols, 0.0)  # zeros quantize to exactly 0: no int8 contribution
        else:
            cols, xf_reg = None, xf
    else:
        xf_reg = xf
    a, za, sx = quantize_act_int8(xf_reg, aspec, act_scale, act_zero)
    accs = int_accumulate(a, za, w)
    if len(accs) == 1:
        y = accs[0].float() * w.scale[:, 0]
    else:
        y = torch.zeros(xf.shape[0], w.codes.shape[0])
        for g, acc in enumerate(accs):
            y.addcmul_(acc.float(), w.scale[:, g])
    y = y * sx  # per token [tokens, 1] or per tensor []
    if cols is not None:
        y.addmm_(xf[:, cols], dequant_columns(cols).t())
    return y.reshape(*shape[:-1], -1)
