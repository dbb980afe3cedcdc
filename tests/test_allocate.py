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


def test_sensitivity_is_the_output_error_on_the_calibration_inputs(tiny):
    model, tok = tiny
    cal = calib(len(tok), n=3, length=16)
    config = method_config("rtn")
    table = measure(model, config, cal, ("int2", "int4", "nf4"))
    name = "model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    X = []
    h = lin.register_forward_pre_hook(lambda m, a: X.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for row in cal:
            model(input_ids=row.unsqueeze(0))
    h.remove()
    X = torch.cat(X)
    for cand, err, _ in table[name]:
        spec = config.weight_spec_for(name)
        spec = spec.__class__(**{**spec.__dict__, **({"format": "int", "bits": int(cand[3:])} if cand.startswith("int") else {"format": cand})})
        D = lin.weight.detach() - round_to_nearest(lin.weight.detach(), spec).dequantize()
        assert err == pytest.approx(float((X @ D.t()).pow(2).sum()), rel=1e-4)
    errs = {c: e for c, e, _ in table[name]}
    assert errs["int2"] > errs["int4"]
    assert set(input_hessians(model, {name: lin}, cal)) == {name}


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
