"""GPTQ on every format of the family: lower output error than RTN on a seeded problem,
and arithmetic-identical with gptq_quantize on the affine integer format."""

import pytest
import torch

from lowbit.algorithms.gptq import gptq_quantize, output_error
from lowbit.algorithms.gptq_format import gptq_format
from lowbit.config import WeightSpec
from lowbit.formats.affine import AffineInt
from lowbit.formats.base import make_format, quantize_matrix


def problem(rows=48, cols=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, cols, generator=g) @ (0.3 * torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5)  # correlated inputs
    X = X * (torch.rand(cols, generator=g) * 2 + 0.2)  # columns of unequal importance
    H = 2 * X.t() @ X / X.shape[0]
    W = torch.randn(rows, cols, generator=g) * 0.05
    return W, H


@pytest.mark.parametrize(
    "kind,kw",
    [("int", {"bits": 3, "symmetric": False}), ("nf4", {}), ("nf4", {"double_quant": True}), ("fp4", {}),
     ("bcq", {"bits": 3}), ("bcq", {"bits": 2, "offset": True}), ("ternary", {}), ("codebook", {"bits": 3}), ("codebook-col", {"bits": 3}), ("mixed", {})],
)
@pytest.mark.parametrize("static_groups", [False, True])
def test_gptq_beats_rtn_on_every_format(kind, kw, static_groups):
    W, H = problem()
    fmt = make_format(kind, **kw)
    rtn = quantize_matrix(fmt, W).dequantize()
    res = gptq_format(W, H, fmt, static_groups=static_groups)
    gptq = res.enc.dequantize()
    assert torch.isfinite(gptq).all()
    e_rtn, e_gptq = output_error(W, rtn, H), output_error(W, gptq, H)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    # the stored form decodes to what the solve used
    back = fmt.unpack(fmt.pack(res.enc), *W.shape, res.enc.g_idx)
    assert torch.equal(back.dequantize(), gptq)


@pytest.mark.parametrize("static_groups", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_on_affine_format_equals_gptq_quantize(static_groups, symmetric):
    W, H = problem(rows=16, cols=160)  # 160: the last group of 64 is narrower
    spec = WeightSpec(bits=4, group_size=64, symmetric=symmetric)
    ref = gptq_quantize(W, H, spec, act_order=True, static_groups=static_groups)
    res = gptq_format(W, H, AffineInt.from_spec(spec), act_order=True, static_groups=static_groups)
    assert torch.equal(res.enc.codes, ref.qweight.codes)
    assert torch.equal(res.enc.g_idx, ref.qweight.g_idx)
    assert torch.equal(res.enc.params["scale"], ref.qweight.scale)
    assert torch.equal(res.enc.dequantize(), ref.qweight.dequantize())


@pytest.mark.parametrize("fmt", ["nf4", "bcq3", "codebook3", "ternary"])
def test_awq_scale_search_fake_quantizes_in_the_format(fmt):
    from lowbit.algorithms.awq import rtn_dequant, search_scale
    from lowbit.formats.names import format_of

    W, H = problem(rows=32, cols=128, seed=5)
    spec = WeightSpec(group_size=64, format=fmt)
    assert torch.equal(rtn_dequant(W, spec), quantize_matrix(format_of(spec), W).dequantize())
    s = torch.linspace(0.5, 2.0, 128)
    assert torch.equal(rtn_dequant(W, spec, s), quantize_matrix(format_of(spec), W * s).dequantize() / s)
    mean_abs = torch.diagonal(H).sqrt()  # channels of larger input matter more: scaling them helps
    res = search_scale([W], [spec], H, mean_abs)
    assert res.rtn_error == pytest.approx(float(((W - rtn_dequant(W, spec)) @ H * (W - rtn_dequant(W, spec))).sum()), rel=1e-5)
    assert min(res.errors) <= res.rtn_error


@pytest.mark.parametrize("kind,kw", [("nf4", {}), ("bcq", {"bits": 2}), ("int", {"bits": 3, "symmetric": False})])
def test_gptq_with_outliers(kind, kw):
    from lowbit.algorithms.gptq_format import _outlier_mask
    from lowbit.formats.outliers import WithOutliers

    W, H = problem()
    W[3, 17] = 2.0  # a weight far outside its group's range
    fmt = make_format(kind, **kw)
    plain = gptq_format(W, H, fmt)
    res = gptq_format(W, H, fmt, outliers=0.01)
    ow = res.enc
    mask = _outlier_mask(W, torch.diagonal(H), 0.01)
    assert ow.rows.numel() == int(mask.sum()) == round(0.01 * W.numel()) and mask[3, 17]
    assert torch.equal(mask[ow.rows, ow.cols], torch.ones(ow.rows.numel(), dtype=torch.bool))
    deq = ow.dequantize()
    assert torch.equal(deq[ow.rows, ow.cols], ow.values.float())
    e_plain, e_out = output_error(W, plain.enc.dequantize(), H), output_error(W, deq, H)
    e_rtn_out = output_error(W, quantize_matrix(WithOutliers(fmt, 0.01), W, importance=torch.diagonal(H)).dequantize(), H)
    assert e_out < e_plain and e_out < e_rtn_out, (e_out, e_plain, e_rtn_out)
    back = ow.fmt.unpack(ow.fmt.pack(ow), *W.shape, ow.g_idx)
    assert torch.equal(back.dequantize(), deq)


def test_slim_llm_is_gptq_on_mixed_widths(tiny_dir):
    import lowbit
    from lowbit.algorithms.base import method_config
    from lowbit.nn.qlinear import QuantLinear
    from tests.test_runner import calib

    model, tok, _ = lowbit.load(str(tiny_dir))
    report = lowbit.quantize(model, method_config("slim-llm", weight={"group_size": 32}, calib_precision="fp32"), calib(len(tok)), progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.fmt.kind == "mixed" for m in layers)
    rows = [r for r in report.layers if "output_rel_error" in r]
    assert sum(r["output_rel_error"] < r["rtn_output_rel_error"] for r in rows) >= 0.8 * len(rows)
    assert report.storage["bits_per_weight"] < 2 + 16 / 32 + 8 / 32 + 0.1  # 2-bit codes on average, scales, zeros
