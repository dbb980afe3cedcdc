"""The interface every quantization algorithm implements, and the registry of them.

An algorithm is one small module with two phases per layer:

- observe: ``new_stats(name, module)`` returns an accumulator whose ``update(x)`` the
  runner calls with every calibration input of that layer (x is [tokens, in_features]);
  layers that read the same tensor (q/k/v, gate/up) share one accumulator.
- solve: ``solve(name, module, spec, stats)`` returns the QuantizedWeight.

Both run inside the runner's single forward pass over a block, when the pass reaches the
layer, so every layer is observed on the output of the already-quantized layers before it.
Block-level methods (AWQ, SmoothQuant) also override ``transform_block`` to rescale a
block before that pass. The block loop, the hooks and the module replacement live here
and in the runner, once.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..calibration.observers import Observer, make_observer
from ..config import ActSpec, QuantConfig, WeightSpec, parse_fields
from ..errors import LowbitError
from ..formats.activations import act_grid, fake_quantize_act
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


def algorithm_class(method: str) -> type[Algorithm]:
    from . import load_all

    load_all()
    if method not in REGISTRY:
        raise LowbitError(f"unknown method {method!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[method]


def make_algorithm(config: QuantConfig) -> Algorithm:
    return algorithm_class(config.method)(config)


def method_config(
    method: str,
    weight: dict | None = None,
    act: dict | bool | None = None,
    *,
    weights: bool = True,
    **fields: Any,
) -> QuantConfig:
    """A QuantConfig for ``method`` in which everything the caller leaves unsaid is the
    method's best-known setting (``Algorithm.default_weight`` / ``default_act``, as its
    authors and reference code run it).

    weight: WeightSpec fields given (others from the method's defaults); weights=False
    keeps weights in float. act: False for no activation quantization; a dict of ActSpec
    fields (with "bits": that format; without: the method's default activation format,
    if it has one, with these fields changed); None: the method's default. ``fields``
    go to QuantConfig (ignore, overrides, options, seed, calib_precision)."""
    cls = algorithm_class(method)
    wspec = None
    if weights:
        given = parse_fields(WeightSpec, dict(weight or {}), "weight format")
        wspec = WeightSpec(**{**cls.default_weight, **given})
    aspec = None
    if act is not False:
        act = dict(act or {})
        if "bits" in act or cls.default_act is not None:
            aspec = ActSpec(**{**(cls.default_act or {}), **parse_fields(ActSpec, act, "activation format")})
    return QuantConfig(method=method, weight=wspec, act=aspec, **fields)


@dataclass(frozen=True)
class NoOptions:
    pass


def option(default: Any, help: str) -> Any:
    """A field of a method's Options dataclass with the sentence `lowbit methods` shows:
    what it does and its valid range."""
    return field(default=default, metadata={"help": help})


def describe_options(options_cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, help) of every option of a method."""
    return [(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(options_cls)]


class Algorithm:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    needs_weights: ClassVar[bool] = True  # False: the method also quantizes activations only
    # The formats the method's authors run it with: what method_config (and so the CLI)
    # fills in where the user says nothing. default_act None: weights only.
    default_weight: ClassVar[dict] = {"bits": 4, "group_size": 64, "symmetric": False}
    default_act: ClassVar[dict | None] = None
    defaults_source: ClassVar[str] = ""  # where those defaults come from (`lowbit methods`)

    def __init__(self, config: QuantConfig):
        valid = {f.name for f in dataclasses.fields(self.Options)}
        unknown = set(config.options) - valid
        if unknown:
            listed = ", ".join(sorted(valid)) or "none"
            raise LowbitError(f"method {self.name} has no option {', '.join(sorted(unknown))} (its options: {listed})")
        # command-line values arrive as strings: parsed by each option's declared type
        typed = parse_fields(self.Options, dict(config.options), f"method {self.name} option")
        self.config = dataclasses.replace(config, options=typed)
        self.options = self.Options(**typed)
        if config.weight is None and self.needs_weights:
            raise LowbitError(f"method {self.name} quantizes weights: give a weight format")

    # --- what subclasses provide ---------------------------------------------------------

    def uses_calibration(self) -> bool:
        """Whether this run needs calibration data (static activation scales always do)."""
        return self.config.act is not None and not self.config.act.dynamic

    def fit_importance(self) -> bool:
        """Whether the formats' fits are weighted by calibration importance (GPTQ's Hessian
        diagonal, RTN's imatrix); two of llama.cpp's mixture rules depend on it."""
        return False

    def prepare_model(self, model: nn.Module) -> None:
        """Change the whole float model once before the block loop (a rotation folded into
        the embedding and the LM head); default: nothing."""

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

    def quantize_block(self, ctx: BlockContext) -> torch.Tensor | None:
        """Quantize every target Linear of the block during one forward pass over the
        calibration inputs (see runner); return the quantized block's output."""
        self.transform_block(ctx)
        linears = ctx.linears()
        targets = [n for n in linears if not self.config.is_ignored(ctx.full_name(n))]
        if not targets:
            return None
        done: dict[str, tuple] = {}
        if ctx.inputs is None:
            for n in targets:
                done.update(self._solve_group(ctx, [n], linears, None, None))
            self._install(ctx, linears, done)
            return None
        members: dict[str, list[str]] = {}  # group leader -> the targets reading the same input
        leader = {n: n for n in targets}
        for g in ctx.groups():
            group = [n for n in g if n in leader]
            for n in group:
                leader[n] = group[0]
        for n in targets:
            members.setdefault(leader[n], []).append(n)

        def make_hook(n: str):
            def hook(mod: nn.Module, args: tuple):
                x = args[0]
                lead = leader[n]
                if n not in done:  # first layer of its input group to run: observe, solve all
                    flat = x.detach().reshape(-1, x.shape[-1])
                    stats, observer = self.new_stats(ctx.full_name(lead), mod), self._act_observer()
                    for acc in (stats, observer):
                        if acc is not None:
                            acc.update(flat)
                    act_qparams = observer.qparams() if observer is not None else None
                    done.update(self._solve_group(ctx, members[lead], linears, stats, act_qparams))
                qweight, act_qparams, _ = done[n]
                if qweight is not None:  # the rest of this forward sees the quantized layer
                    mod.weight.data = qweight.dequantize().to(mod.weight.dtype)
                if self.config.act is not None:
                    scale, zero = act_qparams if act_qparams is not None else (None, None)
                    return (fake_quantize_act(x, self.config.act, scale, zero),)
                return None

            return hook

        out = ctx.forward_with_hooks({n: make_hook(n) for n in targets})
        for n in targets:
            if n not in done:  # never called on calibration data
                done.update(self._solve_group(ctx, [n], linears, None, None))
        self._install(ctx, linears, done)
        return out

    def block_specs(self, ctx: BlockContext) -> dict[str, tuple]:
        """(weight spec or None, activation spec or None) of each Linear of the block that
        is not ignored: what block-wise training (distillation, low-rank tuning) quantizes."""
        specs = {}
        for name in ctx.linears():
            full = ctx.full_name(name)
            if not self.config.is_ignored(full):
                specs[name] = (self.config.weight_spec_for(full), self.config.act)
        return specs

    def _act_observer(self) -> Observer | None:
        a = self.config.act
        if a is None or a.dynamic:
            return None
        return make_observer(a.observer, act_grid(a), percentile=a.percentile)

    def _solve_group(self, ctx: BlockContext, locals_: list[str], linears: dict, stats: Any, act_qparams) -> dict[str, tuple]:
        """{local name: (QuantizedWeight or None, activation qparams or None, report row)}
        for layers that read the same input and share ``stats``."""
        names = [ctx.full_name(n) for n in locals_]
        specs = [self.config.weight_spec_for(n) for n in names]
        with_w = [i for i, sp in enumerate(specs) if sp is not None]
        solved = self.solve_many([names[i] for i in with_w], [linears[locals_[i]] for i in with_w], [specs[i] for i in with_w], stats)
        qweights = dict(zip(with_w, solved))
        result = {}
        for i, local in enumerate(locals_):
            module, qweight = linears[local], qweights.get(i)
            record: dict[str, Any] = {"layer": names[i], "shape": list(module.weight.shape)}
            if qweight is not None:
                record["format"] = specs[i].describe()
                record["weight_rel_error"] = error_metrics(module.weight.detach().float(), qweight.dequantize())["rel_fro"]
                record.update(self.layer_record(names[i], module, qweight, stats))
            if self.config.act is not None:
                record["act_format"] = self.config.act.describe()
            if act_qparams is not None:
                record["act_scale"] = float(act_qparams[0])
                record["act_zero"] = float(act_qparams[1])
            result[local] = (qweight, act_qparams, record)
        return result

    def solve_many(self, names: list[str], modules: list[nn.Module], specs: list[WeightSpec], stats: Any) -> list[QuantizedWeight]:
        """Solve layers that read the same input (and share ``stats``); default: one by one."""
        return [self.solve(n, m, sp, stats) for n, m, sp in zip(names, modules, specs)]

    def _install(self, ctx: BlockContext, linears: dict[str, nn.Module], done: dict[str, tuple]) -> None:
        for local, (qweight, act_qparams, record) in done.items():
            spec = self.config.weight_spec_for(ctx.full_name(local))
            q = QuantLinear.from_linear(linears[local], qweight, spec, self.config.act, act_qparams)
            set_submodule(ctx.block, local, q)
            ctx.records[record["layer"]] = record
