"""AWQ's clipping search on the formats of the family (lowbit.algorithms.awq_clip): the fast
search equals the plain one-group-at-a-time reference, no (row, group) gets worse than the
format's own fit, the layer's output error falls, and AWQ uses it in the runner."""

from __future__ import annotations

import logging

import pytest
import torch

import lowbit
from lowbit.algorithms.awq import output_sq_error
from lowbit.algorithms.awq_clip import (
    clip_skip_reason,
    group_blocks_of,
    group_errors,
    search_clip_format,
    search_clip_format_reference,
)
from lowbit.config import QuantConfig, WeightSpec
from lowbit.formats.base import GroupLayout, default_g_idx, make_format, quantize_matrix
from lowbit.formats.names import format_of
from tests.test_runner import calib

# (kind, fields, whether clipping cuts the whole layer's output error by over 1% here)
FORMATS = [
    ("nf4", {}, True),
    ("fp4", {"double_quant": True}, True),
    ("ternary", {}, False),
    ("bcq", {"bits": 2}, False),
    ("bcq", {"bits": 3, "offset": True}, True),
    ("codebook", {"bits": 3}, True),
]
IDS = [k + "".join(f"-{a}{b}" for a, b in kw.items()) for k, kw, _ in FORMATS]


def heavy_layer(rows=6, cols=160, seed=1):
    """Heavy-tailed weights (a few large ones per group, where clipping pays) and inputs with
    one large channel; 160 = 64 + 64 + 32, so the last group of each row is narrower."""
    g = torch.Generator().manual_seed(seed)
    W = torch.distributions.StudentT(2.5).sample((rows, cols)) * 0.02
    X = torch.randn(512, cols, generator=g)
    X[:, 3] *= 8
    return W, X.T @ X / X.shape[0]


@pytest.mark.parametrize("kind,kw,helps", FORMATS, ids=IDS)
def test_fast_search_equals_the_reference_and_never_loses(kind, kw, helps):
    torch.manual_seed(0)  # StudentT draws from the global generator
    W, H = heavy_layer()
    fmt = make_format(kind, group_size=64, **kw)
    fast = search_clip_format(fmt, W, H, n_grid=8, max_shrink=0.5)
    ref = search_clip_format_reference(fmt, W, H, n_grid=8, max_shrink=0.5)
    assert torch.equal(fast.ratio, ref.ratio)
    assert fast.params.keys() == ref.params.keys()
    for k in fast.params:
        assert torch.equal(fast.params[k], ref.params[k]), k
    assert torch.allclose(fast.error, ref.error, rtol=1e-4, atol=1e-9)
    # ratio 1 is the format's own fit: its errors are plain round-to-nearest's
    layout = GroupLayout(default_g_idx(160, 64), 3)
    wg = layout.gather(W)
    own = group_errors(fmt, wg, layout.mask, fmt.fit(wg, layout.mask), group_blocks_of(H, layout))
    assert torch.equal(fast.plain_error, own)
    assert (fast.error <= fast.plain_error).all()
    assert float(fast.error.sum()) < float(fast.plain_error.sum())
    # the whole layer's output error, after finish: the search scores H's diagonal blocks
    # only, so where it gains little (ternary, BCQ without offset) the blocks between groups
    # can take back that little; elsewhere the gain carries over
    clipped = quantize_matrix(fmt, W, params=fast.params).dequantize()
    plain = quantize_matrix(fmt, W).dequantize()
    ratio = output_sq_error(W - clipped, H) / output_sq_error(W - plain, H)
    assert ratio < (0.99 if helps else 1.01)


def test_search_clips_the_tails_of_absmax_formats():
    torch.manual_seed(0)
    W, H = heavy_layer()
    fmt = make_format("nf4", group_size=64)
    res = search_clip_format(fmt, W, H, n_grid=8)
    assert (res.ratio < 1).any() and (res.ratio >= 0.5).all()
    layout = GroupLayout(default_g_idx(160, 64), 3)
    gmax = (layout.gather(W).abs() * layout.mask).amax(-1)
    assert torch.equal(res.params["absmax"], gmax * res.ratio)  # absmax of the clamped group
    assert float(res.error.sum()) < 0.95 * float(res.plain_error.sum())


def test_group_blocks_follow_the_layout():
    H = torch.arange(25.0).reshape(5, 5)
    layout = GroupLayout(default_g_idx(5, 3), 2)
    Hb = group_blocks_of(H, layout)
    assert torch.equal(Hb[0], H[:3, :3])
    assert torch.equal(Hb[1], torch.tensor([[18.0, 19.0, 0.0], [23.0, 24.0, 0.0], [0.0, 0.0, 0.0]]))


def test_wrappers_and_whole_matrix_formats_are_skipped():
    assert clip_skip_reason(make_format("nf4")) is None
    assert "whole matrix" in clip_skip_reason(format_of(WeightSpec(format="mixed123")))
    outl = format_of(WeightSpec(format="bcq2", outliers=0.01))
    assert "outliers" in clip_skip_reason(outl)
    with pytest.raises(ValueError):
        quantize_matrix(outl, torch.ones(4, 64), params={})


@pytest.mark.parametrize("fmt,searched", [("nf4", True), ("fp4-dq", True), ("mixed123", False)])
def test_awq_clips_family_formats_in_the_runner(tiny_dir, fmt, searched, caplog):
    spec = WeightSpec(group_size=64, format=fmt)  # 96 = 64 + 32: ragged groups
    reports = {}
    for clip in (True, False):
        model, tok, _ = lowbit.load(str(tiny_dir))
        cfg = QuantConfig(method="awq", weight=spec, calib_precision="fp32", options={"clip": clip, "n_grid": 4, "clip_grid": 8})
        with caplog.at_level(logging.DEBUG, logger="lowbit.algorithms.awq"):
            reports[clip] = lowbit.quantize(model, cfg, calib(len(tok), n=4, length=32), progress=False)
    for r in reports[True].layers:
        clipped = searched and not r["layer"].endswith(("q_proj", "k_proj"))
        assert ("clip_ratio_mean" in r) == clipped
    if searched:  # the first block sees the same inputs with and without clipping
        first = lambda rep: sum(r["output_rel_error"] for r in rep.layers if ".layers.0." in r["layer"])  # noqa: E731
        assert first(reports[True]) < first(reports[False])
    else:
        assert "no clipping search" in caplog.text
