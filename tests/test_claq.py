"""CLAQ: the column plan as the reference code makes it, kept outliers, exact storage, the
GPTQ-style solve against round-to-nearest, and the method through the runner."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.algorithms.base import method_config
from lowbit.algorithms.claq import claq_quantize
from lowbit.algorithms.gptq import output_errors
from lowbit.errors import LowbitError
from lowbit.formats.base import make_format, quantize_matrix
from lowbit.formats.claq import claq_setting, column_plan, outlier_counts, reserved
from lowbit.formats.names import format_of
from lowbit.config import WeightSpec
from tests.test_runner import calib


def matrix(rows=64, cols=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[:5, 3] = 0.9  # columns with outliers (>= 13 · mean|W|)
    w[:2, 17] = -0.8
    return w


def test_settings_and_plan():
    assert claq_setting(2.1) == (2, 4, pytest.approx(0.05)) and claq_setting(3.1) == (3, 4, pytest.approx(0.1))
    with pytest.raises(LowbitError, match="2 to 4"):
        claq_setting(1.5)
    w = matrix()
    counts = outlier_counts(w)
    assert counts[3] == 5 and counts[17] == 2 and int(counts.sum()) == 7
    widths, keep = column_plan(w, 2, 4, 0.05, True)
    assert widths.tolist().count(4) == 2 and widths[3] == 4 and widths[17] == 4  # round(40 · 0.05) = 2 columns
    assert keep[3] == keep[17] == 0.014 and (keep == 0.004).sum() == 36
    fmt = format_of(WeightSpec(format="claq2.1"))
    assert (fmt.bits, fmt.high, fmt.share_high, fmt.reserve) == (2, 4, pytest.approx(0.05), False)
    assert format_of(WeightSpec(format="claq3.1-or")).reserve


def test_reserved_values_are_both_tails():
    col = torch.arange(1000, dtype=torch.float32)
    k = reserved(col, 0.014)
    # sorted down, the cuts are the 14th value (985) and the 986th (13): 985..999 and 0..13 kept
    assert int(k.sum()) == 15 + 14 and bool(k[0]) and bool(k[999]) and not bool(k[500])


def test_kept_values_are_exact_and_storage_counts_them():
    fmt = make_format("claq", bits=2, high=4, share_high=0.05, reserve=True)
    w = matrix()
    enc = quantize_matrix(fmt, w)
    d = enc.dequantize()
    r, c = enc.extra["kept_rows"].long(), enc.extra["kept_cols"].long()
    assert r.numel() > 0 and torch.equal(d[r, c], w[r, c].half().float())
    back = fmt.unpack(fmt.pack(enc), *w.shape, enc.g_idx)
    assert torch.equal(back.dequantize(), d) and torch.equal(back.codes, enc.codes)
    t = fmt.pack(enc)
    n4 = int((enc.params["col_bits"] == 4).sum())
    want = 64 * (-(-(40 - n4) * 2 // 8)) + 64 * (-(-n4 * 4 // 8)) + 40 + (40 - n4) * 4 * 2 + n4 * 16 * 2 + r.numel() * (2 + 2) + 40 * 2
    assert fmt.nbytes(enc) == want == sum(v.numel() * v.element_size() for v in t.values())


def problem(rows=48, cols=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1200, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols**0.5)
    return torch.randn(rows, cols, generator=g) * 0.02, 2 * X.t() @ X / X.shape[0]


@pytest.mark.parametrize("reserve", [False, True])
def test_solve_beats_round_to_nearest(reserve):
    W, H = problem()
    fmt = make_format("claq", bits=2, high=4, share_high=0.05, reserve=reserve)
    enc = claq_quantize(W, H, fmt)
    err, rtn_err = output_errors(W, [enc.dequantize(), quantize_matrix(fmt, W).dequantize()], H)
    assert err < 0.97 * rtn_err
    back = fmt.unpack(fmt.pack(enc), *W.shape, enc.g_idx)
    assert torch.equal(back.dequantize(), enc.dequantize())


def test_method_through_the_runner(tiny_dir, tmp_path):
    model, tok, info = lowbit.load(str(tiny_dir))
    report = lowbit.quantize(model, method_config("claq", weight={"format": "claq2.1-or"}, calib_precision="fp32"), calib(len(tok)), progress=False)
    rows = [r for r in report.layers if "kept_values" in r]
    assert rows and sum(r["output_rel_error"] < r["rtn_output_rel_error"] for r in rows) >= 0.8 * len(rows)
    again, _, _ = lowbit.load(str(lowbit.save(model, tok, tmp_path / "ckpt", report, source=info["source"])))
    ids = torch.arange(16).reshape(1, -1) % len(tok)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    with pytest.raises(LowbitError, match="use its own method \\(--method claq\\)"):
        lowbit.quantize(lowbit.load(str(tiny_dir))[0], method_config("gptq", weight={"format": "claq2.1"}), calib(len(tok)), progress=False)


def test_column_kmeans_equals_the_batched_codebook_fit():
    """fit_column's one-column Lloyd (sorted runs, prefix sums) against the batched
    codebook fit it replaces: the same centroids (float16) on varied columns, equal
    centroids and constant columns included; nearest_code against argmin."""
    from lowbit.formats.base import nearest_level_reference

    fmt = make_format("claq", bits=2, high=4, share_high=0.05)
    g = torch.Generator().manual_seed(3)
    cols = [torch.randn(577, generator=g) * 0.02 for _ in range(20)]
    cols += [torch.distributions.StudentT(3.0).sample((300,)) * 0.01 for _ in range(10)]
    cols += [torch.zeros(64), torch.full((50,), 0.25), torch.tensor([0.0, 1.0] * 20), torch.tensor([0.0] * 30 + [1.0, 2.0])]
    for i, col in enumerate(cols):
        for b in (2, 3, 4):
            fast, ref = fmt.fit_column(col, b), fmt.fit_column_reference(col, b)
            assert fast.dtype == torch.float16 and fast.numel() == 16
            assert torch.equal(fast, torch.sort(fast).values)
            if i < 30:  # distinct values: the same fixed point
                torch.testing.assert_close(fast.float(), torch.sort(ref.float()).values, rtol=0, atol=2e-3 * float(col.abs().max()))
            err = lambda c: float((col - c.float()[nearest_level_reference(col.reshape(1, 1, -1), c.float().reshape(1, 1, -1)).long()]).pow(2).sum())
            assert err(fast) <= err(ref) * 1.001 + 1e-12, (i, b)
            codes = fmt.nearest_code(col, fast)
            want = nearest_level_reference(col.reshape(1, 1, -1), fast.float().reshape(1, 1, -1)).reshape(-1)
            assert torch.equal(codes, want), (i, b)
