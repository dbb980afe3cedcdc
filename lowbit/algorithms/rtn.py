"""Round-to-nearest (RTN): each weight goes to the nearest point of its group's grid.

The baseline every other method is measured against. It needs no calibration data for
weights; with static activation quantization the runner still feeds calibration inputs
to the activation observers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import WeightSpec
from ..errors import LowbitError
from ..formats.base import quantize_matrix
from ..formats.names import format_of, round_to_nearest
from ..formats.weights import QuantizedWeight
from .base import Algorithm, option, register


@dataclass(frozen=True)
class RTNOptions:
    imatrix: bool = option(
        False,
        "weigh each format's fit by an importance matrix (mean x^2 per input column, llama.cpp's imatrix) taken from the "
        "calibration inputs each layer sees in the block-wise runner (upstream blocks already quantized); formats whose "
        "fit has no weights (int, nf4, fp4, ternary) reject it; true/false",
    )


@register
class RTN(Algorithm):
    name = "rtn"
    summary = "round-to-nearest weights (any bits/group size, any format), optionally importance-weighted (imatrix); optional activation fake-quant"
    Options = RTNOptions
    needs_weights = False
    defaults_source = "W4 g64 asymmetric: the zero-point RTN baseline of the GPTQ and AWQ papers (30.09 on SmolLM2 against 32.41 symmetric)"

    def uses_calibration(self) -> bool:
        return self.options.imatrix or super().uses_calibration()

    def fit_importance(self) -> bool:
        return self.options.imatrix

    def new_stats(self, name: str, module: nn.Module) -> Any:
        if not self.options.imatrix:
            return None
        from ..calibration.imatrix import ColumnSquares

        return ColumnSquares()

    def solve(self, name: str, module: nn.Module, spec: WeightSpec, stats: Any) -> QuantizedWeight:
        if self.options.imatrix:
            if not spec.in_family or format_of(spec).kind not in WEIGHTED_KINDS:
                raise LowbitError(f"layer {name}: format {spec.describe()} does not weigh its fit; imatrix needs one of: GGML types, bcq, codebook")
            if stats is None or stats.n == 0:
                raise LowbitError(f"layer {name}: the imatrix needs calibration inputs, and this layer saw none")
            return quantize_matrix(format_of(spec), module.weight, name=name, importance=stats.mean())
        return round_to_nearest(module.weight, spec, name=name)


WEIGHTED_KINDS = ("ggml", "bcq", "codebook")
