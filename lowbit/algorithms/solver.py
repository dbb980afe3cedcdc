"""The weight solver of methods that transform a block first and then quantize it with
RTN or GPTQ (qllm, rotate): one mixin, so each method only says which one it runs."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..config import WeightSpec
from ..formats.names import round_to_nearest
from ..formats.weights import QuantizedWeight


class RTNOrGPTQ:
    """Mixin for an Algorithm: call ``use_solver(name)`` in __init__; new_stats / solve /
    solve_many then follow it, and ``solver_record`` adds GPTQ's per-layer errors."""

    _gptq = None

    def use_solver(self, solver: str) -> None:
        self._gptq = None
        if solver == "gptq":
            from .gptq import GPTQ

            self._gptq = GPTQ(dataclasses.replace(self.config, method="gptq", options={}))

    def new_stats(self, name: str, module: nn.Module) -> Any:
        return self._gptq.new_stats(name, module) if self._gptq is not None else None

    def solve(self, name: str, module: nn.Module, spec: WeightSpec, stats: Any) -> QuantizedWeight:
        return self.solve_many([name], [module], [spec], stats)[0]

    def solve_many(self, names, modules, specs, stats) -> list[QuantizedWeight]:
        if self._gptq is not None:
            return self._gptq.solve_many(names, modules, specs, stats)
        return [round_to_nearest(m.weight, sp, name=n) for n, m, sp in zip(names, modules, specs)]

    def solver_record(self, row: dict, name: str, module: nn.Module, qweight: QuantizedWeight, stats: Any) -> dict:
        if self._gptq is not None:
            row.update(self._gptq.layer_record(name, module, qweight, stats))
        return row
