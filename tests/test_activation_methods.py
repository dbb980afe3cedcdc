"""SmoothQuant (smoothing factors, static W8A8 beating unsmoothed static W8A8, its int8
path), ZeroQuant (layer-wise distillation beating no distillation) and the activation
report (outlier channels found, JSON and plot written, CLI), on tiny seeded models."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.algorithms.smoothquant import smoothing_scales, weight_absmax
from lowbit.config import ActSpec, QuantConfig, WeightSpec
from lowbit.errors import LowbitError
from lowbit.evaluation.activations import activation_report, save_activation_report
from lowbit.export.checkpoint import quant_layers
from lowbit.nn import use_kernel
from tests.conftest import EXCERPT
from tests.test_runner import calib

HOT = [3, 50]  # channels given outlier activations in every block


def with_outliers(tiny_dir):
    """The tiny model with outlier features (two input channels of every norm scaled up by
    40), which a random model lacks and trained LLMs have."""
    model, tok, info = lowbit.load(str(tiny_dir))
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[HOT] *= 40
            block.post_attention_layernorm.weight[HOT] *= 40
    return model, tok, info


def rel_err(y, ref) -> float:
    return float((y - ref).norm() / ref.norm())


# --- SmoothQuant ---------------------------------------------------------------------------


def test_smoothing_scales_balance_activation_and_weight_ranges():
    a = torch.tensor([40.0, 1.0, 0.0, 3.0, 2.0])
    W = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.3], [-0.2, 0.1, 0.1, 0.0, -0.6]])
    w = weight_absmax([W])
    assert torch.equal(w, torch.tensor([0.2, 0.5, 0.2, 0.0, 0.6]))
    s = smoothing_scales(a, w, 0.5)
    # alpha = 0.5: after smoothing, a channel's activation range equals its weight range
    ok = torch.tensor([True, True, False, False, True])
    assert torch.allclose((a / s)[ok], (w * s)[ok])
    assert s[2] == 1 and s[3] == 1  # all-zero activations / all-zero weights: nothing to migrate
    assert torch.allclose(smoothing_scales(a, w, 1.0)[ok], a[ok])  # alpha = 1: all onto the weights
    assert torch.isfinite(smoothing_scales(a, w, 0.0)).all()


def test_smoothquant_static_per_tensor_beats_unsmoothed(tiny_dir):
    vocab = len(lowbit.load(str(tiny_dir))[1])
    ids = calib(vocab, n=2, length=40, seed=5)
    windows = calib(vocab, n=4, length=40)
    cfg = dict(weight=WeightSpec(bits=8, group_size=None, symmetric=False), act=ActSpec(dynamic=False, granularity="tensor"), calib_precision="fp32")
    errs = {}
    for method in ("rtn", "smoothquant"):
        model, tok, _ = with_outliers(tiny_dir)
        with torch.no_grad():
            fp = model(input_ids=ids).logits
        report = lowbit.quantize(model, QuantConfig(method=method, **cfg), windows, progress=False)
        with torch.no_grad():
            q = model(input_ids=ids).logits
        errs[method] = rel_err(q, fp)
        if method == "smoothquant":
            rows = [r for r in report.layers if "act_absmax_ratio_before" in r]
            assert len(rows) == 10  # q/k/v and gate/up of both blocks
            assert all(r["act_absmax_ratio_after"] < 0.5 * r["act_absmax_ratio_before"] for r in rows)
            # the int8 path computes the same model (static per-tensor activation codes)
            with torch.no_grad(), use_kernel(model, "int8") as switched:
                fast = model(input_ids=ids).logits
            assert len(switched) == 14 and rel_err(fast, q) < 1e-2
    assert errs["smoothquant"] < 0.5 * errs["rtn"], errs


def test_smooth_model_keeps_the_function_and_helps_8bit_activation_blocks(tiny_dir):
    """smooth_model (used by `lowbit export gguf --smooth`): float outputs unchanged, the
    outlier channels moved into the weights, and rounding every Linear's input to 8-bit
    blocks of 32 (llama.cpp's Q8_0 activations) costs less after smoothing."""
    from lowbit.algorithms.smoothquant import smooth_model
    from lowbit.evaluation.llamacpp import round_q8_0

    vocab = len(lowbit.load(str(tiny_dir))[1])
    ids = calib(vocab, n=2, length=40, seed=5)
    windows = calib(vocab, n=4, length=40)

    def q8_inputs(model):
        hooks = [m.register_forward_pre_hook(lambda _m, a: (round_q8_0(a[0]),)) for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n]
        with torch.no_grad():
            out = model(input_ids=ids).logits
        for h in hooks:
            h.remove()
        return out

    plain, _, _ = with_outliers(tiny_dir)
    smoothed, _, _ = with_outliers(tiny_dir)
    with torch.no_grad():
        fp = plain(input_ids=ids).logits
    records = smooth_model(smoothed, windows, alpha=0.7)
    assert len(records) == 12  # q/k/v, gate/up and down (through up_proj) of both blocks
    assert all(r["act_absmax_ratio_after"] < r["act_absmax_ratio_before"] for r in records.values())
    with torch.no_grad():
        torch.testing.assert_close(smoothed(input_ids=ids).logits, fp, rtol=1e-4, atol=1e-4)
    hot = [float(m.model.layers[0].input_layernorm.weight.detach()[HOT].abs().max()) for m in (smoothed, plain)]
    assert hot[0] < hot[1] / 4
    assert rel_err(q8_inputs(smoothed), fp) < 0.7 * rel_err(q8_inputs(plain), fp)
    with pytest.raises(LowbitError, match="alpha"):
        smooth_model(smoothed, windows, alpha=1.5)
    with pytest.raises(LowbitError, match="calibration windows"):
        smooth_model(smoothed, None, alpha=0.5)


def test_smoothquant_needs_an_activation_format_and_valid_alpha():
    with pytest.raises(LowbitError, match="activation format"):
        lowbit.make_algorithm(QuantConfig(method="smoothquant", weight=WeightSpec(bits=8, group_size=None)))
    with pytest.raises(LowbitError, match="alpha"):
        lowbit.make_algorithm(QuantConfig(method="smoothquant", act=ActSpec(), options={"alpha": 1.5}))


# --- ZeroQuant -----------------------------------------------------------------------------


def test_zeroquant_distillation_beats_no_distillation(tiny_dir):
    vocab = len(lowbit.load(str(tiny_dir))[1])
    ids = calib(vocab, n=2, length=40, seed=5)
    windows = calib(vocab, n=4, length=40)
    w4a8 = dict(weight=WeightSpec(bits=4, group_size=32, symmetric=False), act=ActSpec(bits=8), calib_precision="fp32")
    errs = {}
    for steps in (0, 30):
        model, tok, _ = lowbit.load(str(tiny_dir))
        with torch.no_grad():
            fp = model(input_ids=ids).logits
        report = lowbit.quantize(model, QuantConfig(method="zeroquant", options={"lkd_steps": steps}, **w4a8), windows, progress=False)
        with torch.no_grad():
            errs[steps] = rel_err(model(input_ids=ids).logits, fp)
        assert len(quant_layers(model)) == 14
        if steps:
            rows = [r for r in report.layers if "lkd_kept" in r]
            assert len(rows) == 14 and all(r["lkd_block_rel_error_after"] < r["lkd_block_rel_error_before"] for r in rows)
    assert errs[30] < 0.9 * errs[0], errs


def test_zeroquant_refuses_static_activations_and_bad_options():
    with pytest.raises(LowbitError, match="token-wise"):
        lowbit.make_algorithm(QuantConfig(method="zeroquant", act=ActSpec(dynamic=False, granularity="tensor")))
    with pytest.raises(LowbitError, match="lkd_lr"):
        lowbit.make_algorithm(QuantConfig(method="zeroquant", options={"lkd_lr": 0}))
    # without distillation and with dynamic activations nothing needs calibration data
    assert not lowbit.make_algorithm(QuantConfig(method="zeroquant", act=ActSpec(), options={"lkd_steps": 0})).uses_calibration()


# --- the activation report -------------------------------------------------------------------


def test_activation_report_finds_the_outlier_channels(tiny_dir, tmp_path):
    model, tok, _ = with_outliers(tiny_dir)
    windows = calib(len(tok), n=3, length=24)
    seen = {}
    h = model.model.layers[1].mlp.gate_proj.register_forward_pre_hook(
        lambda _m, a: seen.__setitem__("x", torch.maximum(seen.get("x", torch.zeros(96)), a[0].abs().reshape(-1, 96).amax(0)))
    )
    try:
        report = activation_report(model, windows, threshold=6.0)
    finally:
        h.remove()
    rows = {r["layer"]: r for r in report["layers"]}
    assert len(rows) == 14
    gate = rows["model.layers.1.mlp.gate_proj"]
    assert torch.allclose(torch.tensor(gate["channel_max_abs"]), seen["x"].double().float(), atol=1e-4)
    assert set(HOT) <= set(gate["outlier_channel_ids"][:2]) and gate["tokens"] == 72
    assert gate["max_to_median"] > 10
    # o_proj's and down_proj's inputs get no scaled channels
    assert rows["model.layers.1.mlp.down_proj"]["max_abs"] < gate["max_abs"]
    folder = save_activation_report(report, tmp_path / "rep", title="tiny")
    again = json.loads((folder / "activations.json").read_text())
    assert again["summary"]["layers_with_outliers"] == report["summary"]["layers_with_outliers"] >= 4
    assert (folder / "activations.png").stat().st_size > 10_000
    bad = windows.clone()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = float("nan")
    with pytest.raises(LowbitError, match=r"model\.layers\.0\.self_attn\.q_proj: its inputs have NaN"):
        activation_report(model, bad)


def test_activations_cli_writes_json_and_plot(tiny_dir, tmp_path, cache):
    from typer.testing import CliRunner

    from lowbit.cli import app

    out = tmp_path / "act"
    r = CliRunner().invoke(app, ["activations", str(tiny_dir), "-o", str(out), "--calib", str(EXCERPT), "--windows", "2", "--seq-len", "32", "-q"])
    assert r.exit_code == 0, r.output
    assert "layers have inputs with |x| > 6" in r.output
    assert json.loads((out / "activations.json").read_text())["windows"] == [2, 32]
    assert (out / "activations.png").is_file()
    r = CliRunner().invoke(app, ["activations", str(tiny_dir), "-o", str(out), "--threshold", "0", "-q"])
    assert r.exit_code == 2 and r.stderr.strip().startswith("error: ") and "--threshold" in r.stderr
