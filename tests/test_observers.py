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
    hist, width = obs.histogram()
    levels = 2 ** (GRID.bits - 1)
    lo, hi = obs.range()
    chosen = round(hi / width)
    assert chosen < obs.bins
    assert threshold_kl(hist, chosen, levels) < threshold_kl(hist, obs.bins, levels)
    # (it clips the outliers hard, so in squared error it is worse than min-max here:
    # each observer wins only in its own measure)


def test_observers_are_deterministic():
    x = outlier_tensor()
    for name in ("minmax", "percentile", "mse", "kl"):
        a = fed(make_observer(name, GRID, seed=3), x).range()
        b = fed(make_observer(name, GRID, seed=3), x).range()
        assert a == b, name


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
