"""GPTQ: the fast solver against a slow column-by-column reference, error below RTN,
act-order and static groups, dead inputs and Hessians that are not positive definite."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import lowbit
from lowbit.algorithms.gptq import Hessian, gptq_quantize, inverse_hessian_cholesky, output_error
from lowbit.config import QuantConfig, WeightSpec
from lowbit.errors import LowbitError
from lowbit.export.checkpoint import quant_layers
from lowbit.formats.weights import quantize_weight
from tests.test_runner import calib


def problem(n=192, out=48, tokens=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / math.sqrt(n) + torch.eye(n)
    X = torch.randn(tokens, n, generator=g) @ mix  # correlated inputs, as real activations are
    W = torch.randn(out, n, generator=g) * 0.05
    h = Hessian(n)
    h.update(X[: tokens // 2])
    h.update(X[tokens // 2 :])  # two updates: the running mean must equal one big update
    return W, h.H, X


def gptq_reference(W, H, spec, damp_percent=0.01, order=None):
    """OBQ-style GPTQ, one column at a time: quantize column j with its group's parameters
    from the current weights, push its error onto the remaining columns through the full
    inverse Hessian, then eliminate j from the inverse. No blocks, no Cholesky, float64."""
    W = W.double().clone()
    H = H.double().clone()
    n = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    order = list(range(n)) if order is None else order
    W, H = W[:, order], H[order][:, order]
    H += damp_percent * torch.diagonal(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    gs = spec.group_size or n
    Q = torch.zeros_like(W)
    qmax = 2**spec.bits - 1
    for j in range(n):
        if j % gs == 0:
            cur = W[:, j : j + gs]
            if spec.symmetric:
                s = (cur.abs().amax(1) / (qmax / 2)).float().half().double()
                s[s == 0] = 1
                z = torch.full_like(s, 2 ** (spec.bits - 1))
            else:
                lo, hi = cur.amin(1).clamp(max=0), cur.amax(1).clamp(min=0)
                s = ((hi - lo) / qmax).float()
                s[s == 0] = 1
                s = s.half().double()
                z = torch.clamp(torch.round(-lo / s), 0, qmax)
        q = (torch.clamp(torch.round(W[:, j] / s) + z, 0, qmax) - z) * s
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    inv = torch.argsort(torch.tensor(order))
    return Q[:, inv].float()


@pytest.mark.parametrize("spec", [WeightSpec(bits=4, group_size=64, symmetric=False), WeightSpec(bits=3, group_size=None), WeightSpec(bits=2, group_size=32)])
def test_fast_gptq_equals_the_slow_reference(spec):
    W, H, _ = problem()
    fast = gptq_quantize(W, H, spec, block_size=64).qweight.dequantize()
    slow = gptq_reference(W, H, spec)
    mismatch = (fast - slow).abs() > 1e-4
    assert float(mismatch.float().mean()) < 0.002  # only rare rounding ties may differ
    assert output_error(W, fast, H) == pytest.approx(output_error(W, slow, H), rel=2e-3)


def test_gptq_beats_rtn_on_the_layer_output():
    W, H, X = problem(seed=1)
    for spec in (WeightSpec(bits=4, group_size=64), WeightSpec(bits=3, group_size=64, symmetric=False), WeightSpec(bits=2, group_size=64, symmetric=False)):
        g = gptq_quantize(W, H, spec).qweight.dequantize()
        r = quantize_weight(W, spec).dequantize()
        e_g, e_r = output_error(W, g, H), output_error(W, r, H)
        assert e_g < 0.85 * e_r, spec.describe()
        # the Hessian form equals the error measured on the inputs themselves
        direct = float((X @ (W - g).T).norm() / (X @ W.T).norm())
        assert e_g == pytest.approx(direct, rel=1e-3)


def test_act_order_and_static_groups():
    W, H, _ = problem(seed=2)
    spec = WeightSpec(bits=3, group_size=32)
    plain = gptq_quantize(W, H, spec)
    ordered = gptq_quantize(W, H, spec, act_order=True)
    static = gptq_quantize(W, H, spec, act_order=True, static_groups=True)
    assert plain.qweight.has_trivial_g_idx() and static.qweight.has_trivial_g_idx()
    assert not ordered.qweight.has_trivial_g_idx()
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True).tolist()
    slow = gptq_reference(W, H, spec, order=order)
    fast = ordered.qweight.dequantize()
    assert float(((fast - slow).abs() > 1e-4).float().mean()) < 0.002
    counts = torch.bincount(ordered.qweight.g_idx.long())
    assert counts.tolist() == [32] * 6  # groups follow the solve order: 32 columns each
    for res in (plain, ordered, static):
        assert output_error(W, res.qweight.dequantize(), H) < output_error(W, quantize_weight(W, spec).dequantize(), H)


def test_dead_input_channel_is_handled():
    W, H, X = problem(seed=3)
    X[:, 5] = 0
    h = Hessian(X.shape[1])
    h.update(X)
    res = gptq_quantize(W, h.H, WeightSpec(bits=4, group_size=64))
    d = res.qweight.dequantize()
    assert torch.isfinite(d).all() and torch.all(d[:, 5] == 0)


def test_indefinite_hessian_raises_damping_with_a_note(caplog):
    n = 64
    g = torch.Generator().manual_seed(4)
    X = torch.randn(16, n, generator=g)  # 16 tokens, 64 inputs: H has rank 16
    h = Hessian(n)
    h.update(X)
    H = h.H - 0.05 * torch.eye(n) * torch.diagonal(h.H).mean()  # pushed to indefinite
    with caplog.at_level(logging.INFO, logger="lowbit.algorithms.gptq"):
        U, damp = inverse_hessian_cholesky(H, 0.01, "blocks.0.q_proj")
    assert "not positive definite" in caplog.text and "blocks.0.q_proj" in caplog.text
    assert damp > 0.01 * float(torch.diagonal(H).mean()) and torch.isfinite(U).all()
    res = gptq_quantize(torch.randn(8, n), H, WeightSpec(bits=4, group_size=32))
    assert res.damp > 0 and torch.isfinite(res.qweight.dequantize()).all()
    with pytest.raises(LowbitError, match="NaN"):
        inverse_hessian_cholesky(torch.full((4, 4), float("nan")), 0.01)


def test_gptq_in_the_runner(tiny):
    model, tok = tiny
    report = lowbit.quantize(model, QuantConfig(method="gptq", weight=WeightSpec(bits=3, group_size=32, symmetric=False), options={"act_order": True}), calib(len(tok), n=8, length=48), progress=False)
    assert len(quant_layers(model)) == 14
    for r in report.layers:
        assert r["output_rel_error"] < r["rtn_output_rel_error"], r["layer"]
    with pytest.raises(LowbitError, match="damp_percent"):
        lowbit.make_algorithm(QuantConfig(method="gptq", options={"damp_percent": 2.0}))


def test_act_order_checkpoint_and_gptq_export(tiny_dir, tmp_path):
    """A permuted g_idx survives the lowbit checkpoint exactly and is written as desc_act."""
    import json

    from lowbit.export.gptq import export_gptq

    model, tok, info = lowbit.load(str(tiny_dir))
    windows = calib(len(tok), n=8, length=48)
    report = lowbit.quantize(model, QuantConfig(method="gptq", weight=WeightSpec(bits=4, group_size=32, symmetric=False)), windows, progress=False)
    layers = quant_layers(model)
    assert any(not m.quantized_weight().has_trivial_g_idx() for m in layers.values())
    out = lowbit.save(model, tok, tmp_path / "ckpt", report, source=info["source"])
    again, _, _ = lowbit.load(str(out))
    with torch.no_grad():
        assert torch.equal(model(input_ids=windows[:2]).logits, again(input_ids=windows[:2]).logits)
    g = export_gptq(again, tok, tmp_path / "gptq", "gptq_v2")
    assert json.loads((g / "config.json").read_text())["quantization_config"]["desc_act"] is True


def test_hessian_from_block_rows_is_the_full_product_and_exactly_symmetric():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(300, 193, generator=g)  # a width the four block rows do not divide
    h = Hessian(193)
    for part in (X[:100], X[100:101], X[101:]):
        h.update(part)
    ref = 2.0 / 300 * X.double().t() @ X.double()
    assert torch.equal(h.H, h.H.t())
    assert torch.allclose(h.H.double(), ref, rtol=1e-5, atol=1e-5)
    assert h.n == 300
