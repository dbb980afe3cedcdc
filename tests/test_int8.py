"""The real int8 path (exact integer sums, agreement with the reference path, kernel
switching) and LLM.int8() (outlier decomposition, runner, checkpoint)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lowbit
from lowbit.config import ActSpec, QuantConfig, WeightSpec
from lowbit.errors import LowbitError
from lowbit.export.checkpoint import quant_layers
from lowbit.formats.activations import fake_quantize_act, outlier_columns
from lowbit.formats.weights import quantize_weight
from lowbit.nn import QuantLinear, set_kernel, use_kernel
from lowbit.nn.int8 import int_accumulate, prepare_weight, quantize_act_int8
from tests.test_runner import calib

SPECS = {
    "w8-channel-sym/a8-token-asym": (WeightSpec(bits=8, group_size=None), ActSpec()),
    "w8-channel-asym/a8-token-sym": (WeightSpec(bits=8, group_size=None, symmetric=False), ActSpec(symmetric=True)),
    "w8-restricted/a8-tensor": (WeightSpec(bits=8, group_size=None, restricted=True), ActSpec(granularity="tensor")),
    "w4-g32-ragged-asym/a8-token-asym": (WeightSpec(bits=4, group_size=32, symmetric=False), ActSpec()),
    "w8-asym/a8-static": (WeightSpec(bits=8, group_size=None, symmetric=False), ActSpec(dynamic=False, granularity="tensor")),
    "w8-sym/a6-token-asym": (WeightSpec(bits=8, group_size=None), ActSpec(bits=6)),
}


def layer(wspec: WeightSpec, aspec: ActSpec, n_in: int = 150, n_out: int = 70, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out)
    static = None if aspec is None or aspec.dynamic else (torch.tensor(0.04), torch.tensor(117.0))
    return QuantLinear.from_linear(lin, quantize_weight(lin.weight, wspec), wspec, aspec, static)


def inputs(n_in: int = 150, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 33, n_in, generator=g)
    x[..., 7] *= 25  # an outlier channel, one-sided in some tokens
    x[0, 3] += 4
    return x


@pytest.mark.parametrize("name", sorted(SPECS))
def test_integer_sums_equal_the_int64_reference(name):
    wspec, aspec = SPECS[name]
    m = layer(wspec, aspec)
    x = inputs().reshape(-1, 150)
    static = not aspec.dynamic
    a, za, sx = quantize_act_int8(x, aspec, m.act_scale if static else None, m.act_zero if static else None)
    w = prepare_weight(m.quantized_weight())
    got = int_accumulate(a, za, w)
    # the exact sums, in int64, from the unsigned codes and zero points as stored
    qw = m.quantized_weight()
    codes_a = a.long() + 2 ** (aspec.bits - 1)
    zero_a = (za.long() + 2 ** (aspec.bits - 1)).reshape(-1, 1) if za.dim() else za.long() + 2 ** (aspec.bits - 1)
    q, z = qw.codes.long(), qw.zero_points().long()
    gs = wspec.group_size or 150
    assert len(got) == math.ceil(150 / gs)
    for g, acc in enumerate(got):
        lo, hi = g * gs, min((g + 1) * gs, 150)
        ref = (codes_a[:, lo:hi] - zero_a) @ (q[:, lo:hi] - z[:, g : g + 1]).T
        assert torch.equal(acc.long(), ref), (name, g)
    # the activation codes are the reference path's codes
    fq = fake_quantize_act(x, aspec, m.act_scale, m.act_zero) if static else fake_quantize_act(x, aspec)
    assert torch.equal((a.float() - za.float()) * sx, fq)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_int8_kernel_agrees_with_the_reference_path(name):
    m = layer(*SPECS[name])
    x = inputs()
    ref = m(x)
    with use_kernel(m, "int8") as switched:
        assert switched == [""]
        got = m(x)
    assert m.kernel == "reference"
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_set_kernel_leaves_unsupported_layers_on_the_reference_path():
    model = torch.nn.Sequential(layer(WeightSpec(bits=8, group_size=None), ActSpec()), layer(WeightSpec(bits=4, group_size=32), None, n_in=70))
    assert set_kernel(model, "int8") == ["0"]
    assert model[1].kernel == "reference" and "not quantized" in model[1].int8_unsupported()
    with pytest.raises(LowbitError, match="unknown kernel"):
        set_kernel(model, "cuda")
    with pytest.raises(LowbitError, match="no layer can use the int8 kernel"):
        set_kernel(model[1:], "int8")
    set_kernel(model, "reference")
    assert model[0].kernel == "reference" and model[0]._int8 is None


def test_outlier_threshold_is_validated():
    with pytest.raises(LowbitError, match="outlier threshold"):
        ActSpec(outlier_threshold=-1.0)
    with pytest.raises(LowbitError, match="dynamic per-token"):
        ActSpec(dynamic=False, granularity="tensor", outlier_threshold=6.0)
    with pytest.raises(LowbitError, match="dynamic per token"):
        lowbit.make_algorithm(QuantConfig(method="llm-int8", weight=WeightSpec(bits=8, group_size=None), act=ActSpec(dynamic=False, granularity="tensor")))
    with pytest.raises(LowbitError, match="per output row"):
        lowbit.make_algorithm(QuantConfig(method="llm-int8", weight=WeightSpec(bits=8, group_size=64)))


def test_llm_int8_decomposition_beats_plain_vector_wise_int8():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(512, 256, generator=g)
    hot = torch.tensor([11, 90, 200])
    X[:, hot] *= torch.tensor([30.0, -45.0, 60.0])  # systematic outlier features, as in the paper
    W = torch.randn(128, 256, generator=g) * 0.05
    wspec = WeightSpec(bits=8, group_size=None, restricted=True)
    Wq = quantize_weight(W, wspec).dequantize()
    exact = X @ W.T
    plain = fake_quantize_act(X, ActSpec(symmetric=True)) @ Wq.T
    mixed = fake_quantize_act(X, ActSpec(symmetric=True, outlier_threshold=6.0)) @ Wq.T
    err = lambda y: float((y - exact).norm() / exact.norm())  # noqa: E731
    assert err(mixed) < 0.25 * err(plain)
    assert torch.equal(outlier_columns(X, 6.0).nonzero().flatten(), hot)
    # decided per input: an input without outliers takes nothing out
    assert not outlier_columns(X[:, :10], 6.0).any()
    # the int8 path computes the same decomposition
    lin = torch.nn.Linear(256, 128, bias=False)
    lin.weight.data.copy_(W)
    m = QuantLinear.from_linear(lin, quantize_weight(W, wspec), wspec, ActSpec(symmetric=True, outlier_threshold=6.0))
    ref = m(X)
    assert torch.allclose(ref, mixed, rtol=1e-5, atol=1e-5)
    set_kernel(m, "int8")
    assert torch.allclose(m(X), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def _tiny_with_outliers(tiny_dir):
    model, tok, info = lowbit.load(str(tiny_dir))
    with torch.no_grad():  # outlier features the random tiny model lacks: two big norm channels
        for block in model.model.layers:
            block.post_attention_layernorm.weight[[3, 50]] *= 40
    return model, tok, info


def test_llm_int8_in_the_runner_and_checkpoint(tiny_dir, tmp_path):
    model, tok, info = _tiny_with_outliers(tiny_dir)
    ids = calib(len(tok), n=2, length=40)
    with torch.no_grad():
        fp = model(input_ids=ids).logits
    cfg = QuantConfig(method="llm-int8", weight=WeightSpec(bits=8, group_size=None, restricted=True))
    report = lowbit.quantize(model, cfg, progress=False)  # nothing to calibrate
    layers = quant_layers(model)
    assert len(layers) == 14 and all(m.aspec.outlier_threshold == 6.0 for m in layers.values())
    assert report.config["act"]["outlier_threshold"] == 6.0
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with use_kernel(model, "int8") as switched:
            fast = model(input_ids=ids).logits
    assert len(switched) == 14
    # layer by layer the paths agree to float rounding (above); through a whole model a
    # rounding difference moves an activation code by one here and there in later layers
    # (scaling this model's embeddings by 1 + 1e-7 moves its logits by ~0.3%)
    assert float((fast - ref).norm() / ref.norm()) < 1e-2
    # the same model without the decomposition (plain vector-wise int8) is further off
    plain, _, _ = _tiny_with_outliers(tiny_dir)
    lowbit.quantize(plain, QuantConfig(method="llm-int8", weight=cfg.weight, options={"threshold": None}), progress=False)
    with torch.no_grad():
        plain_logits = plain(input_ids=ids).logits
    err = lambda y: float((y - fp).norm() / fp.norm())  # noqa: E731
    assert err(ref) < 0.75 * err(plain_logits)
    out = lowbit.save(model, tok, tmp_path / "ckpt", report, source=info["source"])
    again, _, info2 = lowbit.load(str(out))
    assert info2["checkpoint"]["quantization"]["method"] == "llm-int8"
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, ref)
    # loaded packed for generation: the layers keep the codes their outlier columns need
    packed, _, _ = lowbit.load(str(out), kernel="auto")
    assert all(m.kernel == "int8" and not m.packed_only for m in quant_layers(packed).values())
    with torch.no_grad():
        assert torch.equal(packed(input_ids=ids).logits, fast)


def test_eval_cli_runs_a_checkpoint_on_the_int8_kernel(tiny_dir, tmp_path, cache):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from tests.conftest import EXCERPT

    model, tok, info = lowbit.load(str(tiny_dir))
    cfg = QuantConfig(weight=WeightSpec(bits=8, group_size=None), act=ActSpec())
    report = lowbit.quantize(model, cfg, progress=False)
    ckpt = lowbit.save(model, tok, tmp_path / "ckpt", report, source=info["source"])
    args = ["eval", str(ckpt), "--data", str(EXCERPT), "--windows", "2", "--seq-len", "64", "--no-reference", "-q"]
    ppl = {}
    for kernel in ("reference", "int8"):
        r = CliRunner().invoke(app, [*args, "--kernel", kernel, "--json", str(tmp_path / f"{kernel}.json")])
        assert r.exit_code == 0, r.output
        res = json.loads((tmp_path / f"{kernel}.json").read_text())
        assert res["kernel"] == kernel
        ppl[kernel] = res["result"]["ppl"]
    assert ppl["int8"] == pytest.approx(ppl["reference"], rel=1e-3)
    r = CliRunner().invoke(app, [*args, "--kernel", "fp8"])
    assert r.exit_code == 2 and "unknown kernel" in r.stderr


@pytest.mark.parametrize("m,k,n", [(1, 576, 64), (5, 22, 70), (17, 8, 8), (64, 150, 96)])
def test_int_mm_is_exact_for_any_shape(m, k, n):
    from lowbit.nn.int8 import int_mm

    g = torch.Generator().manual_seed(m + k + n)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8).t()  # a transposed view, as the kernel passes it
    got = int_mm(a, b)
    assert got.dtype == torch.int32 and torch.equal(got.long(), a.long() @ b.long())


def test_one_token_runs_on_the_int8_kernel():
    m = layer(WeightSpec(bits=8, group_size=None), ActSpec())
    x = inputs()[:1, :1]  # [1, 1, in]: what generation feeds a layer
    ref = m(x)
    with use_kernel(m, "int8"):
        got = m(x)
    assert got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
