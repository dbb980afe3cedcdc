"""Range calibration: each observer beats min-max in the measure it optimizes, on a
tensor with outliers; all are deterministic and reject bad input."""

import pytest
import torch

from lowbit.calibration.observers import (
    KLObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
    squared_error,
    threshold_kl,
)
from lowbit.errors import LowbitError
from lowbit.formats.integer import IntGrid, fake_quantize, qparams_from_range


def outlier_tensor(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200_000, generator=g)
    x[torch.randint(0, x.numel(), (20,), generator=g)] *= 60  # a few huge outliers
    return x


def fed(observer, x, chunks=4):
    for part in x.chunk(chunks):
        observer.update(part)
    return observer


GRID = IntGrid(8, symmetric=True)


def test_minmax_covers_everything():
    x = outlier_tensor()
    lo, hi = fed(MinMaxObserver(GRID), x).range()
    assert hi == pytest.approx(float(x.abs().max()))
    assert lo == -hi
    lo, hi = fed(MinMaxObserver(IntGrid(8, symmetric=False)), x).range()
    assert (lo, hi) == (float(x.min()), float(x.max()))


def test_mse_observer_beats_minmax_on_squared_error():
    x = outlier_tensor()
    mm = fed(MinMaxObserver(GRID), x).range()
    ms = fed(MSEObserver(GRID), x).range()
    assert ms[1] < mm[1]
    assert squared_error(x, *ms, GRID) < 0.8 * squared_error(x, *mm, GRID)


def test_percentile_observer_beats_minmax_on_the_values_it_keeps():
    x = outlier_tensor()
    obs = fed(PercentileObserver(GRID, percentile=99.9), x)
    lo, hi = obs.range()
    kept = x[x.abs() <= hi]
    assert kept.numel() >= 0.998 * x.numel()
    mm = fed(MinMaxObserver(GRID), x).range()
    assert squared_error(kept, lo, hi, GRID) < 0.1 * squared_error(kept, *mm, GRID)


def test_kl_observer_beats_minmax_on_kl_divergence():
    x = outlier_tensor()
    obs = fed(KLObserver(GRID), x)
    hist, width = obs.kl_histogram()
    levels = 2 ** (GRID.bits - 1)
    lo, hi = obs.range()
    chosen = round(hi / width)
    assert chosen < obs.KL_BINS
    assert float(threshold_kl(hist, chosen, levels)) < float(threshold_kl(hist, obs.KL_BINS, levels))


def test_vectorized_kl_equals_one_threshold_at_a_time():
    """The all-candidates KL equals a plain loop over thresholds written from the paper."""
    g = torch.Generator().manual_seed(5)
    hist = torch.histc(torch.randn(50_000, generator=g).abs(), 256, 0, 4).double()
    hist[200:] = 0
    hist[250] = 3  # an isolated outlier bin
    levels = 16
    fast = threshold_kl(hist, torch.arange(levels, 257), levels)
    for i in (16, 17, 40, 128, 201, 256):
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()
        q = torch.zeros(i, dtype=torch.float64)
        for k in range(levels):
            members = [j for j in range(i) if j * levels // i == k]
            nz = [j for j in members if hist[j] > 0]
            for j in nz:
                q[j] = sum(float(hist[m]) for m in members) / len(nz)
        p, q = p / p.sum(), q / q.sum()
        slow = sum(float(p[j] * (p[j] / q[j]).log()) if p[j] > 0 else 0.0 for j in range(i))
        assert float(fast[i - levels]) == pytest.approx(slow, rel=1e-9, abs=1e-12), i
    # (it clips the outliers hard, so in squared error it is worse than min-max here:
    # each observer wins only in its own measure)


def test_observers_are_deterministic():
    x = outlier_tensor()
    for name in ("minmax", "percentile", "mse", "kl"):
        a = fed(make_observer(name, GRID), x).range()
        b = fed(make_observer(name, GRID), x).range()
        assert a == b, name
    # one update or several: the same histogram up to re-binning, so nearly the same range
    one = fed(MSEObserver(GRID), x, chunks=1).range()
    four = fed(MSEObserver(GRID), x, chunks=4).range()
    assert one[1] == pytest.approx(four[1], rel=0.02)


def test_observer_errors():
    with pytest.raises(LowbitError, match="empty"):
        MinMaxObserver(GRID).range()
    with pytest.raises(LowbitError, match="NaN"):
        MinMaxObserver(GRID).update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(LowbitError, match="symmetric"):
        KLObserver(IntGrid(8, symmetric=False))
    with pytest.raises(LowbitError, match="unknown observer"):
        make_observer("median", GRID)


def test_observer_qparams_quantize_the_observed_range():
    x = outlier_tensor()
    s, z = fed(MinMaxObserver(IntGrid(8, symmetric=False)), x).qparams()
    ref_s, ref_z = qparams_from_range(x.min(), x.max(), IntGrid(8, symmetric=False))
    assert float(s) == pytest.approx(float(ref_s)) and float(z) == float(ref_z)
    y = fake_quantize(x, s, z, IntGrid(8, symmetric=False))
    assert float((y - x).abs().max()) <= 0.5 * float(s) + 1e-5
