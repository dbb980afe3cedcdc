"""The interface every quantization algorithm implements, and the registry of them.

An algorithm is one small module with two phases per layer:

- observe: ``new_stats(name, module)`` returns an accumulator whose ``update(x)`` the
  runner calls with every calibration input of that layer (x is [tokens, in_features]);
  layers that read the same tensor (q/k/v, gate/up) share one accumulator.
- solve: ``solve(name, module, spec, stats)`` returns the QuantizedWeight.

Block-level methods (AWQ, SmoothQuant) also override ``transform_block`` to rescale a
block before its layers are observed. ``sequential = True`` observes each input group
only after the groups before it are quantized (GPTQ's "true sequential"). The block loop
itself, the hooks and the module replacement live here and in the runner, once.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..calibration.observers import Observer, make_observer
from ..config import QuantConfig, WeightSpec
from ..errors import LowbitError
from ..formats.activations import act_grid
from ..formats.integer import error_metrics
from ..formats.weights import QuantizedWeight
from ..nn.qlinear import QuantLinear, set_submodule
from ..runner import BlockContext

log = logging.getLogger(__name__)

REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    if cls.name in REGISTRY:
        raise ValueError(f"algorithm {cls.name} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def make_algorithm(config: QuantConfig) -> Algorithm:
    from . import load_all

    load_all()
    if config.method not in REGISTRY:
        raise LowbitError(f"unknown method {config.method!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[config.method](config)


@dataclass(frozen=True)
class NoOptions:
    pass


class Algorithm:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    sequential: ClassVar[bool] = False
    needs_weights: ClassVar[bool] = True  # False: the method also quantizes activations only

    def __init__(self, config: QuantConfig):
        self.config = config
        valid = {f.name for f in dataclasses.fields(self.Options)}
        unknown = set(config.options) - valid
        if unknown:
            listed = ", ".join(sorted(valid)) or "none"
            raise LowbitError(f"method {self.name} has no option {', '.join(sorted(unknown))} (its options: {listed})")
        self.options = self.Options(**config.options)
        if config.weight is None and self.needs_weights:
            raise LowbitError(f"method {self.name} quantizes weights: give a weight format")

    # --- what subclasses provide ---------------------------------------------------------

    def uses_calibration(self) -> bool:
        """Whether this run needs calibration data (static activation scales always do)."""
        return self.config.act is not None and not self.config.act.dynamic

    def transform_block(self, ctx: BlockContext) -> None:
        """Rescale the block before observation (smoothing, scaling); default: nothing."""

    def new_stats(self, name: str, module: nn.Module) -> Any:
        """An accumulator with update(x) for the layer's inputs, or None."""
        return None

    def solve(self, name: str, module: nn.Module, spec: WeightSpec, stats: Any) -> QuantizedWeight:
        raise NotImplementedError

    def layer_record(self, name: str, module: nn.Module, qweight: QuantizedWeight, stats: Any) -> dict:
        """Extra per-layer report fields (GPTQ adds output errors)."""
        return {}

    # --- the shared block loop -------------------------------------------------------------

    def quantize_block(self, ctx: BlockContext) -> None:
        self.transform_block(ctx)
        linears = ctx.linears()
        targets = {n for n in linears if not self.config.is_ignored(ctx.full_name(n))}
        if not targets:
            return
        if ctx.inputs is None:
            for n in sorted(targets):
                self._replace(ctx, n, linears[n], stats=None, observer=None)
            return
        groups = [[n for n in g if n in targets] for g in ctx.groups()]
        groups = [g for g in groups if g]
        passes = groups if self.sequential else [groups]
        for p in passes:
            pass_groups = [p] if self.sequential else p
            self._observe_and_solve(ctx, pass_groups)

    def _observe_and_solve(self, ctx: BlockContext, groups: list[list[str]]) -> None:
        linears = ctx.linears()
        stats, observers = {}, {}
        for g in groups:
            lead = g[0]
            stats[lead] = self.new_stats(ctx.full_name(lead), linears[lead])
            observers[lead] = self._act_observer()

        def on_input(name: str, x: torch.Tensor) -> None:
            if stats[name] is not None:
                stats[name].update(x)
            if observers[name] is not None:
                observers[name].update(x)

        ctx.observe([g[0] for g in groups], on_input)
        for g in groups:
            for n in g:
                self._replace(ctx, n, linears[n], stats[g[0]], observers[g[0]])

    def _act_observer(self) -> Observer | None:
        a = self.config.act
        if a is None or a.dynamic:
            return None
        return make_observer(a.observer, act_grid(a), percentile=a.percentile, seed=self.config.seed)

    def _replace(self, ctx: BlockContext, local: str, module: nn.Module, stats: Any, observer: Observer | None) -> None:
        name = ctx.full_name(local)
        spec = self.config.weight_spec_for(name)
        qweight = None
        record: dict[str, Any] = {"layer": name, "shape": list(module.weight.shape)}
        if spec is not None:
            qweight = self.solve(name, module, spec, stats)
            w = module.weight.detach().float()
            record["format"] = spec.describe()
            record["weight_rel_error"] = error_metrics(w, qweight.dequantize())["rel_fro"]
            record.update(self.layer_record(name, module, qweight, stats))
        act_qparams = observer.qparams() if observer is not None else None
        if act_qparams is not None:
            record["act_scale"] = float(act_qparams[0])
        if self.config.act is not None:
            record["act_format"] = self.config.act.describe()
        q = QuantLinear.from_linear(module, qweight, spec, self.config.act, act_qparams)
        set_submodule(ctx.block, local, q)
        ctx.records[name] = record
