"""Floating-point formats: layout, range and precision, and conversion between them.

Range and precision come from torch.finfo of the real dtype, not from a table typed in by
hand, so they are the numbers the hardware format actually has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError


@dataclass(frozen=True)
class FloatFormat:
    name: str
    dtype: torch.dtype
    exponent_bits: int
    mantissa_bits: int

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def max(self) -> float:
        return float(torch.finfo(self.dtype).max)

    @property
    def smallest_normal(self) -> float:
        return float(torch.finfo(self.dtype).smallest_normal)

    @property
    def eps(self) -> float:
        """Gap between 1 and the next representable number: the relative precision."""
        return float(torch.finfo(self.dtype).eps)

    @property
    def decimal_digits(self) -> float:
        return float(-torch.log10(torch.tensor(self.eps / 2)))


FLOAT_FORMATS = {
    "fp32": FloatFormat("fp32", torch.float32, exponent_bits=8, mantissa_bits=23),
    "fp16": FloatFormat("fp16", torch.float16, exponent_bits=5, mantissa_bits=10),
    "bf16": FloatFormat("bf16", torch.bfloat16, exponent_bits=8, mantissa_bits=7),
}


def float_format(name: str) -> FloatFormat:
    try:
        return FLOAT_FORMATS[name.lower()]
    except KeyError:
        raise LowbitError(f"unknown float format {name!r}; expected one of {', '.join(FLOAT_FORMATS)}") from None


def convert(x: torch.Tensor, fmt: FloatFormat | str) -> torch.Tensor:
    """Round x to ``fmt`` (round to nearest even, overflow to inf) and return it as float32."""
    f = float_format(fmt) if isinstance(fmt, str) else fmt
    return x.to(f.dtype).to(torch.float32)
