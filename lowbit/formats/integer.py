"""k-bit integer grids and the affine map between real numbers and integer codes.

Codes are always stored unsigned, in [qmin, qmax] with qmax = 2**bits - 1, and a value is
recovered as ``x = (q - z) * s``. Symmetric grids fix the zero point at z = 2**(bits-1),
so a signed code is simply ``q - z``; this is the convention the GPTQ and AWQ layouts use,
which keeps export a repacking job. Asymmetric grids carry an integer zero point per group.

The "textbook" functions at the bottom (``absmax_quantize``, ``zeropoint_quantize``) use
the visual guide's notation (signed INT8 codes, s multiplies x) and are built on the same
math; they exist so its worked examples can be checked as written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise LowbitError(f"unknown dtype {name!r}; expected one of {', '.join(_DTYPES)}") from None


def smallest_positive(dtype: torch.dtype) -> float:
    """Smallest positive number of ``dtype``, subnormals included (2**-24 for float16)."""
    finfo = torch.finfo(dtype)
    return float(finfo.smallest_normal) * float(finfo.eps)


@dataclass(frozen=True)
class IntGrid:
    """The set of integer codes of a k-bit format and where zero sits among them."""

    bits: int
    symmetric: bool = True
    restricted: bool = False

    @property
    def qmin(self) -> int:
        return 1 if (self.symmetric and self.restricted) else 0

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def sym_zero(self) -> int:
        return 2 ** (self.bits - 1)

    @property
    def half_levels(self) -> float:
        """absmax / scale for a symmetric grid: 2**(b-1) - 1 restricted, (2**b - 1)/2 full."""
        return float(2 ** (self.bits - 1) - 1) if self.restricted else (2**self.bits - 1) / 2


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, grid: IntGrid, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map [lo, hi] onto the grid (elementwise over any shape).

    The scale is rounded to ``scale_dtype`` first and the zero point computed from the
    rounded scale, so codes made with these parameters are exactly what a file storing
    scales in that dtype reproduces. A zero range (an all-zero group) gets scale 1, never 0.
    Returns (scale in scale_dtype, zero as float32 holding an integer).
    """
    lo = lo.float()
    hi = hi.float()
    if grid.symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        scale = absmax / grid.half_levels
    else:
        lo = torch.clamp(lo, max=0.0)  # the range always holds 0, so zero is exact
        hi = torch.clamp(hi, min=0.0)
        scale = (hi - lo) / grid.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp_min(smallest_positive(scale_dtype)).to(scale_dtype)
    if not torch.isfinite(scale).all():
        raise LowbitError(f"range too large for {str(scale_dtype).removeprefix('torch.')} scales")
    if grid.symmetric:
        zero = torch.full_like(lo, float(grid.sym_zero))
    else:
        zero = torch.clamp(torch.round(-lo / scale.float()), 0, grid.qmax)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """Codes round(x / s) + z, clamped to the grid; returned as uint8 (bits <= 8)."""
    q = torch.round(x.float() / scale.float()) + zero
    return torch.clamp(q, grid.qmin, grid.qmax).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x = (q - z) * s in float32."""
    return (q.float() - zero) * scale.float()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """Quantize then dequantize: the value the quantized model computes with."""
    return dequantize(quantize(x, scale, zero, grid), scale, zero).to(x.dtype)


def error_metrics(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """Quantization error of x_hat against x: MSE, max abs, relative Frobenius error, SQNR."""
    x = x.double()
    d = x_hat.double() - x
    signal = float(x.pow(2).sum())
    noise = float(d.pow(2).sum())
    return {
        "mse": noise / max(x.numel(), 1),
        "max_abs": float(d.abs().max()) if d.numel() else 0.0,
        "rel_fro": (noise / signal) ** 0.5 if signal > 0 else float(noise > 0),
        "sqnr_db": float(10 * torch.log10(torch.tensor(signal / noise))) if noise > 0 else float("inf"),
    }


# --- textbook notation ------------------------------------------------------------------


def absmax_quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, float]:
    """Symmetric absmax quantization as in the guide: s = (2**(b-1) - 1) / max|x|,
    x_q = round(s * x) in the restricted range [-127, 127] for 8 bits. Returns (x_q, s)."""
    grid = IntGrid(bits, symmetric=True, restricted=True)
    amax = x.abs().max()
    scale, zero = qparams_from_range(-amax, amax, grid)
    q = quantize(x, scale, zero, grid).to(torch.int16) - grid.sym_zero
    return q, float(1.0 / scale)


def zeropoint_quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, float, int]:
    """Asymmetric zero-point quantization as in the guide, with signed codes in
    [-2**(b-1), 2**(b-1) - 1]: s = (2**b - 1) / (max - min), z = round(-s * min) - 2**(b-1),
    x_q = round(s * x + z). Returns (x_q, s, z). The range is widened to hold 0 first,
    which changes nothing when min <= 0 <= max (the guide's [-7.59, 10.8] example)."""
    grid = IntGrid(bits, symmetric=False)
    scale, zero = qparams_from_range(x.min(), x.max(), grid)
    q = quantize(x, scale, zero, grid).to(torch.int16) - grid.sym_zero
    return q, float(1.0 / scale), int(zero) - grid.sym_zero


def zeropoint_dequantize(q: torch.Tensor, s: float, z: int) -> torch.Tensor:
    return (q.float() - z) / s
