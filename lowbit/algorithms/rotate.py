"""``--method rotate``: the QuaRot-style Hadamard rotation (``lowbit.algorithms.rotation``)
folded into the float model, then weights by round-to-nearest or GPTQ and activations as
the config says. A baseline for QLLM at 4 and 6 bits of activation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import LowbitError
from ..formats.weights import QuantizedWeight
from .base import Algorithm, option, register
from .rotation import rotate_model
from .solver import RTNOrGPTQ


@dataclass(frozen=True)
class RotateOptions:
    heads: bool = option(True, "also rotate o_proj's input per attention head (folded into v_proj/o_proj); true/false")
    solver: str = option("rtn", "weight quantizer after the rotation: rtn or gptq")
    seed: int = option(0, "seed of the random signs and of the orthogonal factor of non-power-of-two widths")

    def __post_init__(self) -> None:
        if self.solver not in ("rtn", "gptq"):
            raise LowbitError(f"solver must be rtn or gptq, got {self.solver!r}")


@register
class Rotate(RTNOrGPTQ, Algorithm):
    name = "rotate"
    summary = "Hadamard rotation of the residual stream and of o_proj's input per head (QuaRot-style, folded), then RTN or GPTQ"
    Options = RotateOptions
    default_weight = {"bits": 4, "group_size": None, "symmetric": False}
    default_act = {"bits": 4, "dynamic": True, "granularity": "token", "symmetric": False}
    defaults_source = "W4A4: weights per channel asymmetric, activations dynamic per token: QuaRot's round-to-nearest W4A4 setting (without its online down_proj Hadamard, see rotation.py)"
    needs_weights = False

    def __init__(self, config):
        super().__init__(config)
        self._summary: dict = {}
        self.use_solver(self.options.solver)

    def uses_calibration(self) -> bool:
        return self._gptq is not None or super().uses_calibration()

    def prepare_model(self, model: nn.Module) -> None:
        self._summary = rotate_model(model, self.options.seed, self.options.heads)

    def layer_record(self, name: str, module: nn.Module, qweight: QuantizedWeight, stats: Any) -> dict:
        return self.solver_record({"rotation": self._summary.get("rotation")}, name, module, qweight, stats)
