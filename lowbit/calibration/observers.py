"""Range calibration: observers that watch a stream of activations and choose [lo, hi].

Every observer keeps the exact minimum and maximum and a fine histogram of everything it
saw (of |x| for symmetric grids, of x for asymmetric ones), so memory is fixed whatever
the calibration set, nothing is sampled, and the searches are vectorized over candidate
ranges. Each observer optimizes one measure:

- minmax:      covers every value (no clipping error at all).
- percentile:  covers the central p% of values, so the bulk gets a finer grid; it is
               better on the error of the values it keeps.
- mse:         the clipping range with the least squared quantization error.
- kl:          TensorRT's entropy calibration: the threshold whose quantized histogram is
               closest in KL divergence to the original histogram (symmetric grids).

A histogram is built per ``update`` over that update's own range and merged into the final
range at the end (bin centers re-binned), so a single update (the runner's case: the whole
calibration set at once) is exact up to the bin width.
"""

from __future__ import annotations

import torch

from ..errors import LowbitError
from ..formats.integer import IntGrid, fake_quantize, qparams_from_range

BINS = 8192


class Observer:
    """Base: exact min/max and a histogram of the values seen."""

    def __init__(self, grid: IntGrid, bins: int = BINS):
        self.grid = grid
        self.bins = bins
        self.lo = float("inf")
        self.hi = float("-inf")
        self._parts: list[tuple[torch.Tensor, float, float]] = []

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        if not torch.isfinite(flat).all():
            raise LowbitError("observer received NaN/inf activations")
        lo, hi = float(flat.min()), float(flat.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if self.grid.symmetric:
            flat, lo, hi = flat.abs(), 0.0, max(abs(lo), abs(hi))
        if hi <= lo:
            hi = lo + 1e-12
        self._parts.append((torch.histc(flat, self.bins, lo, hi).double(), lo, hi))

    def _full(self) -> tuple[float, float]:
        if self.lo > self.hi:
            raise LowbitError("observer saw no data: the calibration set is empty")
        if self.grid.symmetric:
            a = max(abs(self.lo), abs(self.hi))
            return -a, a
        return self.lo, self.hi

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts, bin centers) over [0, absmax] (symmetric) or [min, max], all updates merged."""
        lo, hi = self._full()
        if self.grid.symmetric:
            lo = 0.0
        hi = hi if hi > lo else lo + 1e-12
        width = (hi - lo) / self.bins
        counts = torch.zeros(self.bins, dtype=torch.float64)
        for h, a, b in self._parts:
            centers = a + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * (b - a) / self.bins
            idx = ((centers - lo) / width).floor().clamp(0, self.bins - 1).long()
            counts.index_add_(0, idx, h)
        centers = lo + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * width
        return counts, centers

    def range(self) -> tuple[float, float]:
        raise NotImplementedError

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.range()
        return qparams_from_range(torch.tensor(lo), torch.tensor(hi), self.grid, torch.float32)


class MinMaxObserver(Observer):
    def range(self) -> tuple[float, float]:
        return self._full()


class PercentileObserver(Observer):
    def __init__(self, grid: IntGrid, percentile: float = 99.99, **kw):
        super().__init__(grid, **kw)
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        counts, centers = self.histogram()
        q = self.percentile / 100.0
        if self.grid.symmetric:
            a = _quantile(counts, centers, q)
            return -a, a
        return _quantile(counts, centers, 1.0 - q), _quantile(counts, centers, q)


def _quantile(counts: torch.Tensor, centers: torch.Tensor, q: float) -> float:
    """The value below which a fraction q of the histogram's mass lies (upper bin edge)."""
    cdf = counts.cumsum(0) / counts.sum()
    k = int(torch.searchsorted(cdf, torch.tensor([q], dtype=cdf.dtype)).clamp(max=len(cdf) - 1))
    half = float(centers[1] - centers[0]) / 2 if len(centers) > 1 else 0.0
    return float(centers[k]) + half


class MSEObserver(Observer):
    """Shrinks the min-max range by p on a grid (1 down to 0.05) and keeps the p with the
    least squared error over the histogram; p = 1 is a candidate, so it never loses to
    min-max by this measure."""

    def __init__(self, grid: IntGrid, steps: int = 100, min_shrink: float = 0.05, **kw):
        super().__init__(grid, **kw)
        self.steps = steps
        self.min_shrink = min_shrink

    def range(self) -> tuple[float, float]:
        counts, centers = self.histogram()
        lo, hi = self._full()
        p = torch.linspace(1.0, self.min_shrink, self.steps, dtype=torch.float64)
        err = histogram_squared_error(counts, centers, lo * p, hi * p, self.grid)
        best = float(p[int(torch.argmin(err))])
        return lo * best, hi * best


def histogram_squared_error(counts, centers, lo: torch.Tensor, hi: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """Squared error of fake-quantizing every bin center with each candidate range
    [lo[c], hi[c]], weighted by the bin counts: one value per candidate."""
    scale, zero = qparams_from_range(lo[:, None].float(), hi[:, None].float(), grid, torch.float32)
    x = centers[None, :].float()
    return ((fake_quantize(x, scale, zero, grid) - x).double().pow(2) * counts[None, :]).sum(1)


def squared_error(x: torch.Tensor, lo: float, hi: float, grid: IntGrid) -> float:
    """Sum of squared errors of fake-quantizing x with the range [lo, hi]."""
    scale, zero = qparams_from_range(torch.tensor(lo), torch.tensor(hi), grid, torch.float32)
    return float((fake_quantize(x, scale, zero, grid) - x).double().pow(2).sum())


class KLObserver(Observer):
    """Entropy calibration (Migacz, "8-bit Inference with TensorRT", 2017).

    Histogram |x| into 2048 bins. For each candidate threshold bin i (from the number of
    quantization levels up to all bins): P is the histogram cut at i with the clipped tail
    added to its last bin; Q merges those i bins into 2**(b-1) levels (bin j goes to level
    floor(j * levels / i)) and spreads each level's mass evenly over its non-empty bins.
    Keep the i with the least KL(P || Q). All candidates are evaluated at once.
    """

    KL_BINS = 2048

    def __init__(self, grid: IntGrid, **kw):
        super().__init__(grid, **kw)
        if not grid.symmetric:
            raise LowbitError("the kl observer needs a symmetric activation grid")
        if self.bins % self.KL_BINS:
            raise LowbitError(f"kl observer needs a multiple of {self.KL_BINS} histogram bins")

    def kl_histogram(self) -> tuple[torch.Tensor, float]:
        counts, _ = self.histogram()
        _, amax = self._full()
        return counts.view(self.KL_BINS, -1).sum(1), max(amax, 1e-12) / self.KL_BINS

    def range(self) -> tuple[float, float]:
        hist, width = self.kl_histogram()
        levels = 2 ** (self.grid.bits - 1)
        cand = torch.arange(levels, self.KL_BINS + 1)
        kl = threshold_kl(hist, cand, levels)
        t = float(cand[int(torch.argmin(kl))]) * width
        return -t, t


def threshold_kl(hist: torch.Tensor, thresholds: torch.Tensor | int, levels: int) -> torch.Tensor:
    """KL(P || Q) of the entropy search for each threshold bin count in ``thresholds``."""
    i = torch.as_tensor(thresholds).reshape(-1, 1)  # [C, 1]
    nb = hist.numel()
    j = torch.arange(nb).reshape(1, -1)  # [1, B]
    inside = j < i
    h = hist.reshape(1, -1).double()
    ref = torch.where(inside, h, torch.zeros(()))
    tail = (h * (~inside)).sum(1, keepdim=True)
    p = ref.clone()
    p.scatter_add_(1, i - 1, tail)  # the clipped mass joins the last kept bin
    level = torch.where(inside, j * levels // i, torch.zeros((), dtype=torch.long))  # [C, B]
    used = (ref > 0).double()
    flat = (torch.arange(i.shape[0]).reshape(-1, 1) * levels + level).reshape(-1)
    mass = torch.zeros(i.shape[0] * levels, dtype=torch.float64).index_add_(0, flat, ref.reshape(-1))
    count = torch.zeros(i.shape[0] * levels, dtype=torch.float64).index_add_(0, flat, used.reshape(-1))
    q = used * (mass[flat] / count[flat].clamp_min(1)).reshape(ref.shape)
    p = p / p.sum(1, keepdim=True).clamp_min(1e-300)
    q = q / q.sum(1, keepdim=True).clamp_min(1e-300)
    terms = torch.where(p > 0, p * (p / q).log(), torch.zeros(()))  # q = 0 where p > 0: inf
    return terms.sum(1)


OBSERVERS = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": KLObserver,
}


def make_observer(name: str, grid: IntGrid, percentile: float = 99.99) -> Observer:
    if name not in OBSERVERS:
        raise LowbitError(f"unknown observer {name!r}; expected one of {', '.join(OBSERVERS)}")
    if name == "percentile":
        return PercentileObserver(grid, percentile=percentile)
    return OBSERVERS[name](grid)
