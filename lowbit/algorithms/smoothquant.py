"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", 2023).

Activation outliers sit in a few fixed channels, so one activation scale per tensor or per
token wastes most of its range; weights are easy to quantize. SmoothQuant migrates the
difficulty from activations to weights with a per-input-channel scale

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(max|X_j| over the calibration tokens, max|W_j| over the rows of every Linear reading
that input), divides the activation channel by s_j (folded into the preceding norm, so
it costs nothing at run time) and multiplies the weight column by s_j. alpha is the
migration strength (``--option alpha=0.5``; the paper uses 0.5 for most models, up to
0.8-0.9 where outliers are larger). The block then gets the W8A8 the config asks for:
weights round-to-nearest (int8 per channel), activations static per tensor or dynamic
per token as its ActSpec says.

Smoothed inputs are those of q/k/v (from input_layernorm) and gate/up (from
post_attention_layernorm), as in the paper; ``fold_linear=true`` also smooths the inputs
of down_proj (into up_proj) and o_proj (into v_proj, where shapes allow), which the paper
does not do; on SmolLM2, whose largest activations are down_proj's inputs, it is what makes
static per-tensor W8A8 work (BENCHMARKS.md). max|X_j| is taken over ``stat_windows``
calibration windows spread over the set (8: 4096 tokens of 512-token windows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import WeightSpec
from ..errors import LowbitError
from ..formats.names import round_to_nearest
from ..formats.weights import QuantizedWeight
from ..models.arch import is_linear, scaling_pairs
from ..runner import BlockContext, run_blocks
from .base import Algorithm, option, register
from .smoothing import capture, checked_folding, fold_scales, spread_windows


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (pure function). A channel whose
    activations or weights are all zero gets s_j = 1: there is nothing to migrate, and
    the formula would divide by zero or send the scale to zero."""
    a = act_absmax.detach().float()
    w = weight_absmax.detach().float()
    ok = (a > 0) & (w > 0)
    s = a.clamp_min(1e-30).pow(alpha) / w.clamp_min(1e-30).pow(1 - alpha)
    s = torch.where(ok & torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return s


def weight_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """max |W_j| per input column j over all rows of all the given weights."""
    return torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)


@dataclass(frozen=True)
class SmoothQuantOptions:
    alpha: float = option(0.5, "migration strength in [0, 1]: s = max|x|^alpha / max|w|^(1-alpha)")
    fold_linear: bool = option(False, "also smooth o_proj and down_proj inputs, folding s into v_proj and up_proj (not in the paper; helps static per-tensor activations); true/false")
    stat_windows: int = option(8, "calibration windows (spread over the set) max|x| is taken over (0: all)")

    def __post_init__(self) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            raise LowbitError(f"alpha (migration strength) must be in [0, 1], got {a!r}")
        v = self.stat_windows
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise LowbitError(f"stat_windows must be a non-negative integer, got {v!r}")


@register
class SmoothQuant(Algorithm):
    name = "smoothquant"
    summary = "SmoothQuant: migrate activation outliers into weights (s = max|X|^a / max|W|^(1-a), folded into norms), then W8A8"
    Options = SmoothQuantOptions
    default_weight = {"bits": 8, "group_size": None, "symmetric": True}
    default_act = {"bits": 8, "dynamic": True, "granularity": "token"}
    defaults_source = "W8 per output channel, symmetric; A8 dynamic per token; alpha 0.5: the paper's reference fake-quant setting (activations asymmetric, measured better here)"
    needs_weights = False

    def __init__(self, config):
        super().__init__(config)
        if config.act is None:
            raise LowbitError("smoothquant smooths activations for their quantization: give an activation format (e.g. --act-bits 8)")
        self._records: dict[str, dict] = {}

    def uses_calibration(self) -> bool:
        return True

    def transform_block(self, ctx: BlockContext) -> None:
        o = self.options
        self._records.update(smooth_block(ctx, o.alpha, o.fold_linear, o.stat_windows))

    def solve(self, name: str, module: nn.Module, spec: WeightSpec, stats: Any) -> QuantizedWeight:
        return round_to_nearest(module.weight, spec, name=name)

    def layer_record(self, name: str, module: nn.Module, qweight: QuantizedWeight, stats: Any) -> dict:
        return self._records.pop(name, {})


def smooth_block(ctx: BlockContext, alpha: float, fold_linear: bool, stat_windows: int) -> dict[str, dict]:
    """SmoothQuant's migration for one block, in place: max|X_j| of each smoothed input
    over ``stat_windows`` spread calibration windows, s = smoothing_scales(...), folded
    into the previous operation and the Linears. Returns {full Linear name: record}."""
    pairs = [(p, ls) for p, ls in scaling_pairs(ctx.block) if fold_linear or not is_linear(ctx.block.get_submodule(p))]
    if not pairs:
        return {}
    act_max: dict[str, torch.Tensor] = {}
    # max|X_j| from a spread subset of the windows: a full extra pass per block would cost
    # as much as the runner's own (which still calibrates the static scales on all of them)
    windows = spread_windows(ctx.inputs.hidden.shape[0], stat_windows)
    capture(ctx, [ls[0] for _, ls in pairs], lambda name, x: act_max.__setitem__(name, x.abs().amax(0).float()), windows)
    linears = ctx.linears()
    records = {}
    with checked_folding(ctx, "SmoothQuant smoothing"):
        for prev, names in pairs:
            a = act_max[names[0]]
            s = smoothing_scales(a, weight_absmax([linears[n].weight for n in names]), alpha)
            fold_scales(ctx.block, prev, names, s, ctx.prefix + ".")
            for n in names:
                records[ctx.full_name(n)] = {"act_absmax_ratio_before": _outlier_ratio(a), "act_absmax_ratio_after": _outlier_ratio(a / s)}
    return records


def smooth_model(model: nn.Module, windows: torch.Tensor, alpha: float, fold_linear: bool = True, stat_windows: int = 8,
                 progress=None) -> dict[str, dict]:
    """Apply SmoothQuant's migration to a float model, block by block, and nothing else:
    the model computes the same function (up to float rounding), with activation outliers
    moved into the weights. For files whose runtime rounds activations itself, as
    llama.cpp's CPU kernels do (8-bit blocks of 32 or 256, see evaluation.llamacpp)."""
    SmoothQuantOptions(alpha=alpha, fold_linear=fold_linear, stat_windows=stat_windows)  # validates
    if windows is None or windows.numel() == 0:
        raise LowbitError("smoothing needs calibration windows")
    records: dict[str, dict] = {}

    def one_block(ctx: BlockContext) -> torch.Tensor:
        records.update(smooth_block(ctx, alpha, fold_linear, stat_windows))
        return ctx.forward()

    with torch.no_grad():
        run_blocks(model, one_block, windows, progress=progress)
    return records


def _outlier_ratio(channel_absmax: torch.Tensor) -> float:
    """max over channels of max|X_j| / their median: how far the largest channel is from
    a typical one (what a per-tensor scale pays for)."""
    med = float(channel_absmax.median())
    return float(channel_absmax.max()) / med if med > 0 else float("inf")
