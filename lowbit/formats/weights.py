"""Group-wise integer weights: the storage form every weight-quantizing method produces.

A Linear weight W of shape [out, in] becomes codes Q [out, in] (uint8, one k-bit code per
weight), a scale per (row, group) and, for asymmetric grids, a zero point per (row, group).
``g_idx[j]`` names the group of input column j. With plain grouping it is ``j // group_size``
and the last group of a row is narrower when the group size does not divide ``in``; GPTQ's
act-order permutes it. Per-channel quantization is a single group per row.

All group statistics are segment reductions over g_idx (scatter_reduce / index_add), so the
same vectorized code serves contiguous, ragged and permuted groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import WeightSpec
from ..errors import LowbitError
from .integer import IntGrid, dequantize, qparams_from_range, quantize, torch_dtype


def grid_of(spec: WeightSpec) -> IntGrid:
    return IntGrid(spec.bits, symmetric=spec.symmetric, restricted=spec.restricted)


def default_g_idx(in_features: int, group_size: int | None) -> torch.Tensor:
    """Group index of each input column for contiguous groups (None: a single group)."""
    cols = torch.arange(in_features, dtype=torch.int32)
    return torch.zeros_like(cols) if group_size is None else cols // group_size


def check_group_size(name: str, in_features: int, spec: WeightSpec) -> None:
    gs = spec.group_size
    if gs is None:
        return
    if gs > in_features:
        raise LowbitError(f"group size {gs} is larger than the input width {in_features} of layer {name}")
    if spec.strict_groups and in_features % gs:
        raise LowbitError(
            f"group size {gs} does not divide the input width {in_features} of layer {name} "
            "(without strict groups the last group of each row would be narrower)"
        )


def group_range(w: torch.Tensor, g_idx: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) minimum and maximum of w [out, in]."""
    out = w.shape[0]
    idx = g_idx.long().unsqueeze(0).expand(out, -1)
    lo = torch.full((out, n_groups), float("inf"), dtype=w.dtype).scatter_reduce(1, idx, w, "amin")
    hi = torch.full((out, n_groups), float("-inf"), dtype=w.dtype).scatter_reduce(1, idx, w, "amax")
    return lo, hi


def group_sum(v: torch.Tensor, g_idx: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per-(row, group) sum of v [out, in]."""
    return torch.zeros(v.shape[0], n_groups, dtype=v.dtype).index_add_(1, g_idx.long(), v)


@dataclass
class QuantizedWeight:
    """Codes, scales and zero points of one weight matrix, plus what is needed to read them."""

    codes: torch.Tensor  # [out, in] uint8
    scale: torch.Tensor  # [out, n_groups], in the spec's scale dtype
    zero: torch.Tensor | None  # [out, n_groups] uint8; None for symmetric grids
    g_idx: torch.Tensor  # [in] int32
    grid: IntGrid
    group_size: int | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def zero_points(self) -> torch.Tensor:
        if self.zero is None:
            return torch.full(self.scale.shape, float(self.grid.sym_zero))
        return self.zero.float()

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return dequantize(self.codes, self.scale.float()[:, g], self.zero_points()[:, g])

    def has_trivial_g_idx(self) -> bool:
        return torch.equal(self.g_idx, default_g_idx(self.codes.shape[1], self.group_size))


def _check_finite(name: str, w: torch.Tensor) -> None:
    bad = ~torch.isfinite(w)
    if bad.any():
        raise LowbitError(f"layer {name} has {int(bad.sum())} NaN/inf weights; refusing to quantize it")


def qparams_for(
    w: torch.Tensor, spec: WeightSpec, g_idx: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per (row, group), from min-max or from an MSE search over clipping."""
    grid = grid_of(spec)
    lo, hi = group_range(w, g_idx, n_groups)
    sdt = torch_dtype(spec.scale_dtype)
    if spec.observer == "minmax":
        return qparams_from_range(lo, hi, grid, sdt)
    return mse_qparams(w, lo, hi, grid, sdt, g_idx, n_groups)


def _shrink_factors(shrink_steps: int, min_shrink: float) -> list[float]:
    return [1.0 - (1.0 - min_shrink) * i / max(shrink_steps - 1, 1) for i in range(shrink_steps)]


def _keep_better(err, scale, zero, best_err, best_scale, best_zero):
    """Per group, the candidate (scale, zero) where its error is strictly lower: ties keep
    the earlier (wider) range."""
    better = err < best_err
    return torch.where(better, err, best_err), torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)


def grouped_layout(w: torch.Tensor, g_idx: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w [out, in] as [out, n_groups, width]: each group's columns side by side, so group
    reductions are plain sums over the last dim. Ragged or permuted groups are gathered
    and zero-padded; the mask (None when no padding) marks the real entries."""
    out, n = w.shape
    g = g_idx.long()
    counts = torch.bincount(g, minlength=n_groups)
    width = int(counts.max()) if n else 0
    if n == n_groups * width and torch.equal(g, torch.arange(n) // width):
        return w.reshape(out, n_groups, width), None
    order = torch.argsort(g, stable=True)
    gs = g[order]
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(n) - start[gs]
    wg = torch.zeros(out, n_groups, width, dtype=w.dtype)
    wg[:, gs, pos] = w[:, order]
    mask = torch.zeros(n_groups, width, dtype=w.dtype)
    mask[gs, pos] = 1
    return wg, mask


def mse_qparams(
    w: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    grid: IntGrid,
    scale_dtype: torch.dtype,
    g_idx: torch.Tensor,
    n_groups: int,
    shrink_steps: int = 80,
    min_shrink: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip each group's range to p * [lo, hi], with p on a grid from 1 down to min_shrink,
    keeping per group the p with the least squared error (the search llm-compressor and
    GPTQ call 'mse'). p = 1 is a candidate, so the result is never worse than min-max.

    The groups are laid out side by side ([out, groups, width]) so each candidate costs a
    few in-place elementwise ops and one sum, with no gathers; ``mse_qparams_reference``
    is the plain form the tests hold it to."""
    wg, mask = grouped_layout(w.float(), g_idx, n_groups)
    best = (torch.full(lo.shape, float("inf")), *qparams_from_range(lo, hi, grid, scale_dtype))
    buf = torch.empty_like(wg)
    for p in _shrink_factors(shrink_steps, min_shrink):
        p = torch.tensor(p, dtype=torch.float32)
        scale, zero = qparams_from_range(lo * p, hi * p, grid, scale_dtype)
        s, z = scale.float().unsqueeze(-1), zero.unsqueeze(-1)
        # (dequantize(quantize(w)) - w)^2, as quantize()/dequantize() compute it
        torch.div(wg, s, out=buf).round_().add_(z).clamp_(grid.qmin, grid.qmax)
        buf.sub_(z).mul_(s).sub_(wg).pow_(2)
        if mask is not None:
            buf.mul_(mask)
        best = _keep_better(buf.sum(-1), scale, zero, *best)
    return best[1], best[2]


def mse_qparams_reference(
    w: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    grid: IntGrid,
    scale_dtype: torch.dtype,
    g_idx: torch.Tensor,
    n_groups: int,
    shrink_steps: int = 80,
    min_shrink: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same search, one candidate at a time: the plain form the tests hold mse_qparams to."""
    g = g_idx.long()
    best = (torch.full(lo.shape, float("inf")), *qparams_from_range(lo, hi, grid, scale_dtype))
    for p in _shrink_factors(shrink_steps, min_shrink):
        p = torch.tensor(p, dtype=torch.float32)
        scale, zero = qparams_from_range(lo * p, hi * p, grid, scale_dtype)
        s, z = scale.float()[:, g], zero[:, g]
        err = group_sum((dequantize(quantize(w, s, z, grid), s, z) - w).pow(2), g_idx, n_groups)
        best = _keep_better(err, scale, zero, *best)
    return best[1], best[2]


def quantize_weight(
    w: torch.Tensor,
    spec: WeightSpec,
    name: str = "weight",
    g_idx: torch.Tensor | None = None,
    qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> QuantizedWeight:
    """Round-to-nearest quantization of w [out, in] under ``spec``.

    g_idx overrides the column-to-group map; qparams = (scale, zero) of shape
    [out, n_groups] overrides the range search (GPTQ computes them as it goes).
    """
    if spec.in_family:
        raise LowbitError(f"layer {name}: format {spec.describe()} is not an affine grid; quantize it through its format (formats.names.round_to_nearest)")
    if w.dim() != 2:
        raise LowbitError(f"layer {name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().float()
    _check_finite(name, w)
    check_group_size(name, w.shape[1], spec)
    g_idx = default_g_idx(w.shape[1], spec.group_size) if g_idx is None else g_idx.to(torch.int32)
    n_groups = int(g_idx.max()) + 1 if g_idx.numel() else 1
    grid = grid_of(spec)
    scale, zero = qparams_for(w, spec, g_idx, n_groups) if qparams is None else qparams
    g = g_idx.long()
    codes = quantize(w, scale.float()[:, g], zero[:, g], grid)
    return QuantizedWeight(
        codes=codes,
        scale=scale,
        zero=None if spec.symmetric else zero.to(torch.uint8),
        g_idx=g_idx,
        grid=grid,
        group_size=spec.group_size,
    )
