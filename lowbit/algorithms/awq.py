"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", 2023).

A few input channels of a layer matter much more than the others: those that meet large
activations. Multiplying such a weight column by s > 1 (and its input by 1/s, folded into
the previous operation, see ``smoothing``) shrinks its relative rounding error while the
group's scale barely moves, so the layer's output error falls. Per scaling pair (previous
operation -> the Linears reading its output, ``arch.scaling_pairs``):

1. scale search: s = mean|x|^alpha per input channel (over all calibration tokens),
   normalized so that max(s) * min(s) = 1, for alpha on a grid of ``n_grid`` points in
   [0, 1); keep the alpha with the least output error of the pair's layers,
   sum ||X W^T - (X/s) Q(W s)^T||^2 under round-to-nearest Q; no scaling when no alpha
   beats plain RTN, so the search never does worse than RTN on this loss. Option
   ``duo=true``: s = mean|x|^alpha / w_mean^(1-alpha) instead, w_mean the mean of each
   input column's |w| relative to its group's max (``weight_group_mean``).
2. fold s into the previous operation and the layers (exact in float).
3. clipping search, per layer and per (row, group): the group's range shrunk by a ratio
   from a grid of ``clip_grid`` points in (1 - max_shrink, 1], keeping the ratio with the
   least error of the layer output's share from that group. Not for q_proj and k_proj:
   their error reaches the block through the q.k products, which a per-layer output
   error does not see (the AWQ authors skip them for that reason). The affine int grid
   shrinks [lo, hi] itself (``search_clip``); every other format of the family refits its
   parameters on weights clamped to the ratio times max |w| (``awq_clip``), except the
   mixed-width and float16-outlier formats (``awq_clip.clip_skip_reason``).
4. the runner's pass quantizes every layer round-to-nearest with those ranges (W4, W3...).

The statistics come from one extra forward of the block over ``stat_windows`` (8) of the
calibration windows, spread over the set: 4096 tokens for SmolLM2's 512-token windows,
as many as the Gram matrices sample anyway. The runner's own pass then quantizes on all
windows and hands the quantized block's output on.

Output errors come from the Gram matrix H = X^T X of a token sample (``max_tokens``):
||X D^T||^2 = tr(D H D^T), one [out, in] x [in, in] product per candidate whatever the
number of tokens; the clipping search needs only H's diagonal blocks, one per group.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import WeightSpec
from ..errors import LowbitError
from ..formats.integer import qparams_from_range, torch_dtype
from ..formats.base import quantize_matrix
from ..formats.names import format_of
from ..formats.weights import QuantizedWeight, default_g_idx, grid_of, group_range, quantize_weight
from ..models.arch import scaling_pairs
from ..runner import BlockContext
from .awq_clip import clip_skip_reason, search_clip_format
from .base import Algorithm, option, register
from .smoothing import capture, checked_folding, fold_scales, full_precision, spread_windows

log = logging.getLogger(__name__)

# channels whose mean |x| is below this fraction of the largest get it instead: an input
# that is (almost) always zero must not get a scale of 0 (its weight column would vanish
# and the previous operation's channel be divided by zero)
ZERO_FLOOR = 1e-5
NO_CLIP = ("q_proj", "k_proj")


def awq_scales(mean_abs: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """s = mean|x|^alpha (or, with ``w_mean``, mean|x|^alpha / w_mean^(1 - alpha): "duo"
    scaling, which also shrinks columns whose weights are large within their groups),
    normalized to max(s) * min(s) = 1. All ones when alpha = 0 without w_mean, or when the
    inputs are all zero."""
    m = mean_abs.detach().float()
    top = float(m.max()) if m.numel() else 0.0
    if not top > 0 or (alpha == 0 and w_mean is None):
        return torch.ones_like(m)
    s = m.clamp_min(top * ZERO_FLOOR).pow(alpha)
    if w_mean is not None:
        w = w_mean.detach().float()
        wtop = float(w.max())
        if not wtop > 0:
            return torch.ones_like(m)
        s = s / w.clamp_min(wtop * ZERO_FLOOR).pow(1 - alpha)
    return s / (s.max() * s.min()).sqrt()


def weight_group_mean(weights: list[torch.Tensor], specs: list[WeightSpec]) -> torch.Tensor:
    """Per input column, the mean over all rows of the layers of |w| / max |w| of its
    (row, group): where a column's weights sit within their groups' ranges."""
    rows = []
    for W, spec in zip(weights, specs):
        a = W.detach().float().abs()
        g_idx = default_g_idx(a.shape[1], spec.group_size).long()
        G = int(g_idx.max()) + 1
        gmax = torch.zeros(a.shape[0], G).scatter_reduce_(1, g_idx.expand_as(a), a, "amax")
        rows.append(a / gmax[:, g_idx].clamp_min(torch.finfo(torch.float32).tiny))
    return torch.cat(rows).mean(0)


def output_sq_error(D: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H D^T) = ||X D^T||^2 for H = X^T X: the squared output error of a weight error D."""
    return float(((D @ H) * D).sum())


def fake_quant_minmax(W: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """quantize_weight(W, spec).dequantize() for min-max ranges and groups that divide the
    width, computed on the [out, groups, group_size] view without building codes: the
    searches call it 20 times per layer, where the general path's index gathers dominate."""
    out, n = W.shape
    gs = spec.group_size or n
    g = W.float().reshape(out, n // gs, gs)
    grid = grid_of(spec)
    scale, zero = qparams_from_range(g.amin(-1), g.amax(-1), grid, torch_dtype(spec.scale_dtype))
    sc, z = scale.float().unsqueeze(-1), zero.unsqueeze(-1)
    return ((torch.clamp(torch.round(g / sc) + z, grid.qmin, grid.qmax) - z) * sc).reshape(out, n)


def rtn_dequant(W: torch.Tensor, spec: WeightSpec, s: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest of W (of W diag(s) when s is given, mapped back by 1/s)."""
    Ws = W if s is None else W * s
    if spec.in_family:  # any format of the family: its own round-to-nearest
        Q = quantize_matrix(format_of(spec), Ws).dequantize()
    elif spec.observer == "minmax" and (spec.group_size is None or W.shape[1] % spec.group_size == 0):
        Q = fake_quant_minmax(Ws, spec)
    else:
        Q = quantize_weight(Ws, spec).dequantize()
    return Q if s is None else Q / s


@dataclass
class ScaleSearch:
    s: torch.Tensor
    alpha: float | None  # None: no scaling (plain RTN) was best
    errors: list[float]  # squared output error for each alpha of the grid
    rtn_error: float


def search_scale(
    weights: list[torch.Tensor], specs: list[WeightSpec], H: torch.Tensor, mean_abs: torch.Tensor, n_grid: int = 20, duo: bool = False
) -> ScaleSearch:
    """AWQ's scale search for layers that read one input (pure function): the alpha in
    {0, 1/n_grid, ..., (n_grid-1)/n_grid} whose s = awq_scales(mean_abs, alpha[, w_mean])
    gives the least summed output error of the layers under RTN; no scaling at all when
    none beats plain RTN (without duo scaling alpha = 0 is plain RTN itself)."""
    Ws = [w.detach().float() for w in weights]
    w_mean = weight_group_mean(Ws, specs) if duo else None

    def error(s: torch.Tensor | None) -> float:
        D = torch.cat([W - rtn_dequant(W, sp, s) for W, sp in zip(Ws, specs)])
        return output_sq_error(D, H)

    rtn = error(None)
    # without duo scaling alpha = 0 is the identity: its error is RTN's
    errors = [rtn if i == 0 and not duo else error(awq_scales(mean_abs, i / n_grid, w_mean)) for i in range(n_grid)]
    best = min(range(n_grid), key=lambda i: (errors[i], i))
    if not errors[best] < rtn:
        return ScaleSearch(torch.ones_like(mean_abs, dtype=torch.float32), None, errors, rtn)
    return ScaleSearch(awq_scales(mean_abs, best / n_grid, w_mean), best / n_grid, errors, rtn)


def group_blocks(H: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """The diagonal blocks of H [in, in], one per contiguous group, zero-padded to
    [n_groups, gs, gs] (a narrower last group gets zero rows and columns)."""
    n = H.shape[0]
    gs = group_size or n
    G = math.ceil(n / gs)
    pad = G * gs - n
    Hp = torch.nn.functional.pad(H, (0, pad, 0, pad))
    idx = torch.arange(G)
    return Hp.reshape(G, gs, G, gs)[idx, :, idx, :]


@dataclass
class ClipSearch:
    scale: torch.Tensor  # [out, G] in the spec's scale dtype
    zero: torch.Tensor  # [out, G] float holding integers
    ratio: torch.Tensor  # [out, G] the chosen shrink ratio


def search_clip(W: torch.Tensor, H: torch.Tensor, spec: WeightSpec, n_grid: int = 20, max_shrink: float = 0.5) -> ClipSearch:
    """Per (row, group), the range [lo, hi] * p with p in {1, 1 - max_shrink/n_grid, ...}
    (for symmetric grids: the max |w| times p) whose RTN codes give the least squared
    error of the group's share of the layer output, d_g H_gg d_g^T (pure function). p = 1
    is min-max, so no group gets worse than RTN."""
    W = W.detach().float()
    out, n = W.shape
    g_idx = default_g_idx(n, spec.group_size)
    G = int(g_idx.max()) + 1
    gs = spec.group_size or n
    grid, sdt = grid_of(spec), torch_dtype(spec.scale_dtype)
    lo, hi = group_range(W, g_idx, G)
    Hb = group_blocks(H.float(), spec.group_size)
    g = g_idx.long()
    best_err = torch.full((out, G), float("inf"))
    best_scale = best_zero = best_ratio = None
    for i in range(n_grid):
        p = 1.0 - max_shrink * i / n_grid
        scale, zero = qparams_from_range(lo * p, hi * p, grid, sdt)
        s, z = scale.float()[:, g], zero[:, g]
        D = W - (torch.clamp(torch.round(W / s) + z, grid.qmin, grid.qmax) - z) * s
        Dg = torch.nn.functional.pad(D, (0, G * gs - n)).reshape(out, G, gs).transpose(0, 1)  # [G, out, gs]
        err = (torch.bmm(Dg, Hb) * Dg).sum(-1).t()  # [out, G]
        if best_scale is None:
            best_err, best_scale, best_zero, best_ratio = err, scale, zero, torch.ones(out, G)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_ratio = torch.where(better, torch.full_like(best_ratio, p), best_ratio)
    return ClipSearch(best_scale, best_zero, best_ratio)


def rel_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, den: float | None = None) -> float:
    """||X (W - W_hat)^T|| / ||X W^T|| (``den``: ||X W^T||^2 when already known)."""
    den = output_sq_error(W.float(), H) if den is None else den
    return math.sqrt(max(output_sq_error(W.float() - W_hat.float(), H), 0.0) / den) if den > 0 else 0.0


@dataclass(frozen=True)
class AWQOptions:
    n_grid: int = option(20, "scale exponents alpha searched: i / n_grid for i = 0 .. n_grid - 1 (a positive integer)")
    duo: bool = option(False, "scales mean|x|^a / mean|w|^(1-a) (AutoAWQ's duo_scaling) instead of the paper's mean|x|^a; true/false")
    clip: bool = option(True, "search a clipping ratio per weight group after scaling (the paper's weight clipping); true/false")
    clip_grid: int = option(20, "clipping ratios tried, from 1 down to 1 - max_shrink (a positive integer)")
    max_shrink: float = option(0.5, "largest fraction of a group's range the clipping search may cut, in [0, 1)")
    max_tokens: int = option(4096, "calibration tokens sampled for the Gram matrices the searches score with (0: all)")
    stat_windows: int = option(8, "calibration windows (spread over the set) the statistics pass runs on (0: all)")

    def __post_init__(self) -> None:
        for k in ("n_grid", "clip_grid"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LowbitError(f"{k} must be a positive integer, got {v!r}")
        if not 0 <= self.max_shrink < 1:
            raise LowbitError(f"max_shrink must be in [0, 1), got {self.max_shrink!r}")
        for k in ("max_tokens", "stat_windows"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise LowbitError(f"{k} must be a non-negative integer, got {v!r}")


def token_sample(n_tokens: int, max_tokens: int, seed: int) -> torch.Tensor | None:
    """Sorted indices of a seeded random sample of the tokens (None: take all)."""
    if max_tokens == 0 or n_tokens <= max_tokens:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_tokens, generator=g)[:max_tokens].sort().values


@register
class AWQ(Algorithm):
    name = "awq"
    summary = "AWQ: activation-aware per-channel scales (searched, folded into norms/linears) + clipping search, then RTN"
    Options = AWQOptions
    defaults_source = "W4 asymmetric (zero point), a grid of 20 alphas, then the clipping search: the authors' llm-awq/AutoAWQ settings (group 64 here: SmolLM2's widths)"

    def __init__(self, config):
        super().__init__(config)
        self._qparams: dict[str, tuple] = {}  # full name -> (spec, scale, zero) or (spec, params) from the clip search
        self._records: dict[str, dict] = {}

    def uses_calibration(self) -> bool:
        return True

    def transform_block(self, ctx: BlockContext) -> None:
        o = self.options
        linears = ctx.linears()
        specs = {n: self.config.weight_spec_for(ctx.full_name(n)) for n in linears}
        targets = [n for n in linears if specs[n] is not None]
        if not targets:
            return
        groups = ctx.groups()
        leader = {n: g[0] for g in groups for n in g}
        # the statistics (mean |x|, Gram matrices) come from a forward over a spread subset
        # of the windows: a second full pass per block would cost as much as the runner's
        windows = spread_windows(ctx.inputs.hidden.shape[0], o.stat_windows)
        n_tokens = ctx.inputs.n_tokens if windows is None else len(windows) * ctx.inputs.hidden.shape[1]
        sample = token_sample(n_tokens, o.max_tokens, self.config.seed + ctx.index)
        mean_abs: dict[str, torch.Tensor] = {}
        gram: dict[str, torch.Tensor] = {}

        def observe(name: str, x: torch.Tensor) -> None:
            mean_abs[name] = x.abs().float().mean(0)
            xs = (x if sample is None else x[sample]).float()
            with full_precision():
                gram[name] = (xs.t() @ xs) / xs.shape[0]

        capture(ctx, sorted({leader[n] for n in linears}), observe, windows)
        H = {n: gram[leader[n]] for n in linears}
        # the searches compare output errors that differ by a few percent between candidates:
        # float32 products throughout, whatever precision the calibration forwards use
        with full_precision():
            self._search(ctx, linears, specs, targets, leader, mean_abs, H)

    def _search(self, ctx: BlockContext, linears: dict, specs: dict, targets: list[str], leader: dict, mean_abs: dict, H: dict) -> None:
        o = self.options
        out_sq: dict[str, float] = {}
        for n in targets:
            W = linears[n].weight.detach().float()
            out_sq[n] = output_sq_error(W, H[n])  # unchanged by the scalings (they keep the function)
            self._records[ctx.full_name(n)] = {"rtn_output_rel_error": rel_output_error(W, rtn_dequant(W, specs[n]), H[n], out_sq[n])}

        col_scale: dict[str, torch.Tensor] = {}
        with checked_folding(ctx, "AWQ scaling") as check:
            for prev, names in scaling_pairs(ctx.block):
                if len({leader[n] for n in names}) != 1 or any(n in col_scale for n in names):
                    log.debug("%s: %s do not read one input here; no AWQ scale for them", ctx.prefix, ", ".join(names))
                    continue
                scored = [n for n in names if specs[n] is not None]
                if not scored:
                    continue
                res = search_scale([linears[n].weight for n in scored], [specs[n] for n in scored], H[names[0]], mean_abs[leader[names[0]]], o.n_grid, o.duo)
                for n in scored:
                    self._records[ctx.full_name(n)]["awq_alpha"] = res.alpha
                if res.alpha is None or bool((res.s == 1).all()):
                    continue
                fold_scales(ctx.block, prev, names, res.s, ctx.prefix + ".")
                for n in names:
                    col_scale[n] = res.s
        if not check.ok:
            col_scale.clear()

        for n in targets:
            W = linears[n].weight.detach().float()
            Hn = H[n]
            if n in col_scale:  # the layer now reads x / s: its Gram matrix is H / (s s^T)
                s = col_scale[n]
                Hn = Hn / s.unsqueeze(0) / s.unsqueeze(1)
            rec = self._records[ctx.full_name(n)]
            fmt = format_of(specs[n]) if specs[n].in_family else None
            if not o.clip or n.rsplit(".", 1)[-1] in NO_CLIP:
                W_hat = rtn_dequant(W, specs[n])
            elif fmt is None:  # the affine int grid: its own search over [lo, hi] * p
                res = search_clip(W, Hn, specs[n], o.clip_grid, o.max_shrink)
                self._qparams[ctx.full_name(n)] = (specs[n], res.scale, res.zero)
                W_hat = quantize_weight(W, specs[n], qparams=(res.scale, res.zero)).dequantize()
                rec["clip_ratio_mean"] = float(res.ratio.mean())
            elif clip_skip_reason(fmt):
                log.debug("%s: no clipping search on %s: %s", ctx.full_name(n), fmt.describe(), clip_skip_reason(fmt))
                W_hat = rtn_dequant(W, specs[n])
            else:  # any other format of the family: through its fit / encode / decode
                res = search_clip_format(fmt, W, Hn, o.clip_grid, o.max_shrink)
                self._qparams[ctx.full_name(n)] = (specs[n], res.params)
                W_hat = quantize_matrix(fmt, W, params=res.params).dequantize()
                rec["clip_ratio_mean"] = float(res.ratio.mean())
            # in the layer's own (scaled) input domain: for layers whose inputs alone were
            # scaled, the same number as in the original domain
            rec["output_rel_error"] = rel_output_error(W, W_hat, Hn, out_sq[n])

    def solve(self, name: str, module: nn.Module, spec: WeightSpec, stats: Any) -> QuantizedWeight:
        found = self._qparams.pop(name, None)
        if spec.in_family:
            params = found[1] if found is not None and found[0] == spec else None
            return quantize_matrix(format_of(spec), module.weight, name=name, params=params)
        if found is not None and found[0] == spec:
            return quantize_weight(module.weight, spec, name=name, qparams=(found[1], found[2]))
        return quantize_weight(module.weight, spec, name=name)

    def layer_record(self, name: str, module: nn.Module, qweight: QuantizedWeight, stats: Any) -> dict:
        return self._records.pop(name, {})
