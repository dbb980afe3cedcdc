"""Range calibration: observers that watch a stream of activations and choose [lo, hi].

Every observer keeps the exact minimum and maximum and, for the searches, a seeded uniform
subsample of the values (at most ``per_update`` from each update), so memory stays bounded
whatever the calibration set and the result is deterministic. Each observer optimizes one
measure:

- minmax:      covers every value (no clipping error at all).
- percentile:  covers the central p% of values, so the bulk gets a finer grid; it is
               better on the error of the values it keeps.
- mse:         the clipping threshold with the least squared quantization error.
- kl:          TensorRT's entropy calibration: the threshold whose quantized histogram is
               closest in KL divergence to the original histogram (symmetric grids).
"""

from __future__ import annotations

import torch

from ..errors import LowbitError
from ..formats.integer import IntGrid, fake_quantize, qparams_from_range


class Observer:
    """Base: tracks exact min/max and a bounded seeded subsample of the values seen."""

    def __init__(self, grid: IntGrid, per_update: int = 1 << 18, seed: int = 0):
        self.grid = grid
        self.per_update = per_update
        self.lo = float("inf")
        self.hi = float("-inf")
        self.samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        if not torch.isfinite(flat).all():
            raise LowbitError("observer received NaN/inf activations")
        self.lo = min(self.lo, float(flat.min()))
        self.hi = max(self.hi, float(flat.max()))
        if flat.numel() > self.per_update:
            idx = torch.randint(flat.numel(), (self.per_update,), generator=self._gen)
            flat = flat[idx]
        self.samples.append(flat.clone())

    def sample(self) -> torch.Tensor:
        if not self.samples:
            raise LowbitError("observer saw no data: the calibration set is empty")
        return torch.cat(self.samples)

    def range(self) -> tuple[float, float]:
        raise NotImplementedError

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.range()
        return qparams_from_range(torch.tensor(lo), torch.tensor(hi), self.grid, torch.float32)

    def _full(self) -> tuple[float, float]:
        if self.lo > self.hi:
            raise LowbitError("observer saw no data: the calibration set is empty")
        if self.grid.symmetric:
            a = max(abs(self.lo), abs(self.hi))
            return -a, a
        return self.lo, self.hi


class MinMaxObserver(Observer):
    def range(self) -> tuple[float, float]:
        return self._full()


class PercentileObserver(Observer):
    def __init__(self, grid: IntGrid, percentile: float = 99.99, **kw):
        super().__init__(grid, **kw)
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        x = self.sample()
        q = self.percentile / 100.0
        if self.grid.symmetric:
            a = float(_quantile(x.abs(), q))
            return -a, a
        return float(_quantile(x, 1.0 - q)), float(_quantile(x, q))


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    # torch.quantile refuses very large inputs; kthvalue has no such limit.
    k = min(max(int(round(q * (x.numel() - 1))) + 1, 1), x.numel())
    return x.kthvalue(k).values


class MSEObserver(Observer):
    """Shrinks the min-max range by p on a grid (1 down to 0.05) and keeps the p with the
    least squared error on the sample; p = 1 is a candidate, so it never loses to min-max."""

    def __init__(self, grid: IntGrid, steps: int = 100, min_shrink: float = 0.05, **kw):
        super().__init__(grid, **kw)
        self.steps = steps
        self.min_shrink = min_shrink

    def range(self) -> tuple[float, float]:
        x = self.sample()
        lo, hi = self._full()
        best, best_err = (lo, hi), float("inf")
        for i in range(self.steps):
            p = 1.0 - (1.0 - self.min_shrink) * i / (self.steps - 1)
            err = squared_error(x, lo * p, hi * p, self.grid)
            if err < best_err:
                best, best_err = (lo * p, hi * p), err
        return best


def squared_error(x: torch.Tensor, lo: float, hi: float, grid: IntGrid) -> float:
    """Sum of squared errors of fake-quantizing x with the range [lo, hi]."""
    scale, zero = qparams_from_range(torch.tensor(lo), torch.tensor(hi), grid, torch.float32)
    return float((fake_quantize(x, scale, zero, grid) - x).double().pow(2).sum())


class KLObserver(Observer):
    """Entropy calibration (Migacz, "8-bit Inference with TensorRT", 2017).

    Histogram |x| into ``bins`` bins. For each candidate threshold bin i (from the number of
    quantization levels up to all bins): P is the histogram cut at i with the clipped tail
    added to its last bin; Q merges those i bins into 2**(b-1) levels and spreads each
    level's mass evenly back over its non-empty bins. Keep the i with the least KL(P || Q).
    """

    def __init__(self, grid: IntGrid, bins: int = 2048, **kw):
        super().__init__(grid, **kw)
        if not grid.symmetric:
            raise LowbitError("the kl observer needs a symmetric activation grid")
        self.bins = bins

    def histogram(self) -> tuple[torch.Tensor, float]:
        _, amax = self._full()
        a = self.sample().abs().double()
        hist = torch.histc(a, bins=self.bins, min=0.0, max=amax if amax > 0 else 1.0)
        return hist, (amax if amax > 0 else 1.0) / self.bins

    def range(self) -> tuple[float, float]:
        hist, width = self.histogram()
        levels = 2 ** (self.grid.bits - 1)
        best_i, best_kl = self.bins, float("inf")
        for i in range(levels, self.bins + 1):
            kl = threshold_kl(hist, i, levels)
            if kl < best_kl:
                best_i, best_kl = i, kl
        t = best_i * width
        return -t, t


def threshold_kl(hist: torch.Tensor, i: int, levels: int) -> float:
    """KL(P || Q) of the TensorRT entropy search for threshold bin i (see KLObserver)."""
    p = hist[:i].clone()
    p[-1] += hist[i:].sum()
    ref = hist[:i]
    edges = torch.linspace(0, i, levels + 1).round().long()
    level = torch.bucketize(torch.arange(i), edges[1:], right=True)  # level of each bin
    used = (ref > 0).to(hist.dtype)
    mass = torch.zeros(levels, dtype=hist.dtype).index_add_(0, level, ref)
    count = torch.zeros(levels, dtype=hist.dtype).index_add_(0, level, used)
    q = used * mass[level] / count[level].clamp_min(1)
    total_p, total_q = p.sum(), q.sum()
    if total_p <= 0 or total_q <= 0:
        return float("inf")
    p = p / total_p
    q = q / total_q
    mask = p > 0
    if bool((q[mask] <= 0).any()):
        return float("inf")
    return float((p[mask] * (p[mask] / q[mask]).log()).sum())


OBSERVERS = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": KLObserver,
}


def make_observer(name: str, grid: IntGrid, percentile: float = 99.99, seed: int = 0) -> Observer:
    if name not in OBSERVERS:
        raise LowbitError(f"unknown observer {name!r}; expected one of {', '.join(OBSERVERS)}")
    if name == "percentile":
        return PercentileObserver(grid, percentile=percentile, seed=seed)
    return OBSERVERS[name](grid, seed=seed)
