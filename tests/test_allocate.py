"""Automatic bit allocation: the sensitivities are what they claim, the solve fits the
budget and is close to the exhaustive optimum, and the plan runs through any method with
exactly the bytes it predicted."""

from __future__ import annotations

import itertools

import pytest
import torch

import lowbit
from lowbit.algorithms.allocate import Budget, input_hessians, measure
from lowbit.formats.budget import solve
from lowbit.algorithms.base import method_config
from lowbit.errors import LowbitError
from lowbit.formats.names import round_to_nearest
from tests.test_runner import calib


def brute(table, cap):
    names = list(table)
    best = None
    for combo in itertools.product(*[range(len(table[n])) for n in names]):
        b = sum(table[n][i][2] for n, i in zip(names, combo))
        if b <= cap:
            e = sum(table[n][i][1] for n, i in zip(names, combo))
            best = e if best is None or e < best else best
    return best


@pytest.mark.parametrize("seed", range(4))
def test_solve_fits_and_equals_the_exhaustive_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    table = {}
    for layer in range(5):
        size = int(torch.randint(50, 200, (1,), generator=g))
        sens = float(torch.rand(1, generator=g)) * 10
        table[f"l{layer}"] = [(f"int{k}", sens * 4.0 ** (-k), size * k) for k in (2, 3, 4, 6, 8)]
    total_min = sum(rows[0][2] for rows in table.values())
    total_max = sum(rows[-1][2] for rows in table.values())
    for frac in (0.0, 0.2, 0.5, 0.8, 1.0):
        cap = total_min + frac * (total_max - total_min)
        choice = solve(table, cap)
        used = sum(table[n][i][2] for n, i in choice.items())
        err = sum(table[n][i][1] for n, i in choice.items())
        assert used <= cap
        assert err <= brute(table, cap) * (1 + 1e-9) + 1e-15  # exact: the units are finer than any size here
        left = cap - used
        assert not any(e < table[n][choice[n]][1] and b - table[n][choice[n]][2] <= left
                       for n in table for _, e, b in table[n])  # no upgrade that still fits is left out
    with pytest.raises(LowbitError, match="below the smallest"):
        solve(table, total_min - 1)


def layer_inputs(model, lin, cal):
    """Every input row the Linear ``lin`` sees over the windows ``cal`` (float model)."""
    X = []
    h = lin.register_forward_pre_hook(lambda m, a: X.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for row in cal:
            model(input_ids=row.unsqueeze(0))
    h.remove()
    return torch.cat(X)


def test_sensitivity_is_the_output_error_on_the_calibration_inputs(tiny):
    model, tok = tiny
    cal = calib(len(tok), n=3, length=16)
    config = method_config("rtn")
    table = measure(model, config, cal, ("int2", "int4", "nf4"), sensitivity="output")
    name = "model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    X = layer_inputs(model, lin, cal)
    for cand, err, _ in table[name]:
        spec = config.weight_spec_for(name)
        spec = spec.__class__(**{**spec.__dict__, **({"format": "int", "bits": int(cand[3:])} if cand.startswith("int") else {"format": cand})})
        D = lin.weight.detach() - round_to_nearest(lin.weight.detach(), spec).dequantize()
        assert err == pytest.approx(float((X @ D.t()).pow(2).sum()), rel=1e-4)
    errs = {c: e for c, e, _ in table[name]}
    assert errs["int2"] > errs["int4"]
    assert set(input_hessians(model, {name: lin}, cal)) == {name}


def _fisher_reference(model, name, cal):
    """The layer's inputs and the per-output-channel sum of squared loss gradients, by
    plain autograd with every weight trainable (as a training step would see them)."""
    lin = model.get_submodule(name)
    X, F = [], torch.zeros(lin.out_features, dtype=torch.float64)
    outs = []
    h1 = lin.register_forward_pre_hook(lambda m, a: X.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    h2 = lin.register_forward_hook(lambda m, a, o: outs.append(o))
    for row in cal:
        outs.clear()
        logits = model(input_ids=row.unsqueeze(0), use_cache=False).logits[0, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum")
        (g,) = torch.autograd.grad(loss, outs[0])
        F += g.reshape(-1, g.shape[-1]).double().pow(2).sum(0)
    h1.remove()
    h2.remove()
    return torch.cat(X), F


def test_fisher_sensitivity_weighs_each_output_channel_by_its_squared_loss_gradient(tiny):
    model, tok = tiny
    cal = calib(len(tok), n=3, length=16)
    config = method_config("rtn")
    params = {n: p.requires_grad for n, p in model.named_parameters()}
    table = measure(model, config, cal, ("int2", "int4"), sensitivity="fisher")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == params  # restored
    assert all(p.grad is None for p in model.parameters())  # the pass trains nothing
    name = "model.layers.0.self_attn.v_proj"
    X, F = _fisher_reference(model, name, cal)
    assert F.min() >= 0 and F.max() > 0 and not torch.allclose(F, F.mean().expand_as(F))  # not uniform
    W = model.get_submodule(name).weight.detach()
    for cand, err, _ in table[name]:
        spec = config.weight_spec_for(name)
        spec = spec.__class__(**{**spec.__dict__, "format": "int", "bits": int(cand[3:])})
        D = W - round_to_nearest(W, spec).dequantize()
        ref = float(((X @ D.t()).double().pow(2).sum(0) * F).sum())
        assert err == pytest.approx(ref, rel=1e-3)
    with pytest.raises(LowbitError, match="sensitivity must be one of"):
        Budget(bpw=4.0, sensitivity="kl")


def test_weighted_allocation_fits_each_candidate_with_the_importance(tiny):
    from lowbit.formats.base import quantize_matrix
    from lowbit.formats.names import format_of

    model, tok = tiny
    cal = calib(len(tok), n=2, length=16)
    config = method_config("rtn", options={"imatrix": True})
    name = "model.layers.1.mlp.up_proj"
    plain = measure(model, config, cal, ("codebook2", "bcq2"), sensitivity="output")
    weighted = measure(model, config, cal, ("codebook2", "bcq2"), sensitivity="output", weighted=True)
    lin = model.get_submodule(name)
    X = layer_inputs(model, lin, cal)
    W = lin.weight.detach()
    for (cand, err, _), (_, err_plain, _) in zip(weighted[name], plain[name]):
        spec = config.weight_spec_for(name)
        spec = spec.__class__(**{**spec.__dict__, "format": cand})
        D = W - quantize_matrix(format_of(spec), W, importance=X.pow(2).mean(0)).dequantize()
        assert err == pytest.approx(float((X @ D.t()).pow(2).sum()), rel=1e-4)
        assert err != err_plain
    # the affine grid does not weigh its fit: the same error either way
    assert measure(model, config, cal, ("int4",), weighted=True)[name] == measure(model, config, cal, ("int4",))[name]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_plan_runs_with_the_predicted_bytes(tiny_dir, method):
    model, tok, _ = lowbit.load(str(tiny_dir))
    cal = calib(len(tok), n=4, length=32)
    report = lowbit.quantize(model, method_config(method, weight={"group_size": 32}, calib_precision="fp32"), cal,
                             progress=False, budget=Budget(bpw=3.5))
    a = report.allocation
    assert report.storage["quantized_bytes"] == a["bytes"]
    assert report.storage["bits_per_weight"] <= 3.5
    assert len(set(a["choices"].values())) > 1  # a real mixture
    formats = {r["layer"]: r["format"] for r in report.layers}
    for layer, cand in a["choices"].items():
        assert formats[layer].startswith(f"W{cand[3:]} ")


def test_budget_errors_and_cli(tiny_dir, tmp_path, cache):
    from typer.testing import CliRunner

    from lowbit.cli.main import app, parse_size
    from tests.test_cli import SMALL

    with pytest.raises(LowbitError, match="exactly one"):
        Budget()
    with pytest.raises(LowbitError, match="unknown weight format"):
        Budget(bpw=3, candidates=("int4", "nf5"))
    assert parse_size("40MB") == 40_000_000 and parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("123") == 123
    with pytest.raises(LowbitError, match="--max-size"):
        parse_size("big")
    r = CliRunner().invoke(app, ["quantize", str(tiny_dir), "--target-bpw", "3", "-g", "32", *SMALL, "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "bit allocation:" in r.output
