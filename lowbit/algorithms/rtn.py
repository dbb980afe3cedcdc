"""Round-to-nearest (RTN): each weight goes to the nearest point of its group's grid.

The baseline every other method is measured against. It needs no calibration data for
weights; with static activation quantization the runner still feeds calibration inputs
to the activation observers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import WeightSpec
from ..formats.base import quantize_matrix
from ..formats.names import format_of
from ..formats.weights import QuantizedWeight, quantize_weight
from .base import Algorithm, register


@register
class RTN(Algorithm):
    name = "rtn"
    summary = "round-to-nearest weights (any bits/group size), optional W8A8 activation fake-quant"
    needs_weights = False
    defaults_source = "W4 g64 asymmetric: the zero-point RTN baseline of the GPTQ and AWQ papers (30.09 on SmolLM2 against 32.41 symmetric)"

    def solve(self, name: str, module: nn.Module, spec: WeightSpec, stats: Any) -> QuantizedWeight:
        if spec.in_family:  # a format of the family: fit each group, nearest value
            return quantize_matrix(format_of(spec), module.weight, name=name)
        return quantize_weight(module.weight, spec, name=name)
