"""QLLM: channel reassembly as pure functions (disassembly exact, merge error exact from
the Gram matrix, the search never worse than no reassembly), its fold into a gated MLP
(same architecture, same function up to the reported merge error) and ``--method qllm``
(W4A4 better than RTN and SmoothQuant on a tiny model with outlier channels; low-rank
tuning lowers the error further; QLLM + GPTQ runs)."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.algorithms.qllm import fold_mlp_plan, mlp_names
from lowbit.algorithms.reassembly import (
    Plan,
    disassemble,
    disassembly_counts,
    make_plan,
    merge_distance,
    merge_rel_error,
    plan_input,
    plan_weight,
    quantized_output_error,
    search_threshold,
)
from lowbit.config import ActSpec, QuantConfig, WeightSpec
from lowbit.errors import LowbitError
from lowbit.export.checkpoint import quant_layers
from tests.test_runner import calib

HOT_FF = [7, 40, 111]  # down_proj input channels given outlier activations


def outlier_matrices(seed=0, n=512, d=64, m=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, :3] *= torch.tensor([60.0, 25.0, 12.0], dtype=torch.float64)
    x[:, 10] = 0.9 * x[:, 11] + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)  # a near-duplicate pair
    w = torch.randn(m, d, generator=g, dtype=torch.float64) / 8
    return x, w


def test_disassembly_is_exact_and_bounds_every_sub_channel():
    x, w = outlier_matrices()
    absmax = x.abs().amax(0)
    theta = 10.0
    counts = disassembly_counts(absmax, theta)
    assert counts[:3].tolist() == torch.ceil(absmax[:3] / theta).long().tolist() and (counts[3:] == 1).all()
    xd, wd = disassemble(x, w, counts)
    assert xd.shape[1] == 64 + int((counts - 1).sum())
    torch.testing.assert_close(xd @ wd.t(), x @ w.t(), rtol=1e-12, atol=1e-10)
    assert float(xd.abs().amax(0)[: int(counts[:3].sum())].max()) <= theta


def test_plan_keeps_the_width_and_its_merge_error_is_exact():
    x, w = outlier_matrices()
    gram = x.t() @ x
    absmax = x.abs().amax(0)
    plan = make_plan(gram, absmax, w, 10.0)
    extra = int((disassembly_counts(absmax, 10.0) - 1).sum())
    assert plan.n_disassembled == 3 and plan.n_extra == extra == len(plan.merges)
    xp, wp = plan_input(x, plan), plan_weight(w, plan)
    assert xp.shape == x.shape and wp.shape == w.shape  # width unchanged
    assert float(xp.abs().amax(0).max()) <= 10.0 + 1e-9 < float(absmax.max())
    ref = x @ w.t()
    direct = float((xp @ wp.t() - ref).norm() / ref.norm())
    assert merge_rel_error(gram, w, plan) == pytest.approx(direct, rel=1e-9)
    assert 0 < direct < 0.15  # independent random channels: each merge loses one
    # the similarity is the exact squared error of dropping a onto b (for single merges)
    dist = merge_distance(gram, w.pow(2).sum(0))
    a, b, lam = plan.merges[0]
    assert float(((x[:, a] - lam * x[:, b]).unsqueeze(1) * w[:, a]).pow(2).sum()) == pytest.approx(float(dist[a, b]), rel=1e-9)
    # the near-duplicate pair is the cheapest merge of all
    assert (10, 11) in [(a, b) for a, b, _ in plan.merges] or (11, 10) in [(a, b) for a, b, _ in plan.merges]
    assert merge_rel_error(gram, w, Plan.identity(64)) == 0.0


def test_threshold_search_beats_no_reassembly_at_w4a4():
    x, w = outlier_matrices(seed=1)
    x, w = x.float(), w.float()
    ws, acts = WeightSpec(bits=4, group_size=None, symmetric=False), ActSpec(bits=4)
    plan, tried = search_threshold(x, x.double().t() @ x.double(), w, ws, acts)
    none = quantized_output_error(x, w, Plan.identity(64), ws, acts)
    assert tried[0][1] == pytest.approx(none)  # theta = max|x| is the first candidate: no change
    assert plan.n_extra > 0
    assert quantized_output_error(x, w, plan, ws, acts) < 0.75 * none


def test_per_token_objective_is_not_ruled_by_one_huge_token():
    """A token 1000x larger (an attention-sink token) multiplies the plain objective's share
    of that token by 10^6; the per-token objective does not move (per-token activation
    quantization scales with the token)."""
    x, w = outlier_matrices(seed=2, n=256)
    x, w = x.float(), w.float()
    ws, acts = WeightSpec(bits=6, group_size=None, symmetric=False), ActSpec(bits=6)
    plan = make_plan(x.double().t() @ x.double(), x.abs().amax(0), w, 10.0)
    big = x.clone()
    big[5] *= 1000
    for p in (Plan.identity(64), plan):
        plain, plain_big = quantized_output_error(x, w, p, ws, acts), quantized_output_error(big, w, p, ws, acts)
        tok, tok_big = (quantized_output_error(v, w, p, ws, acts, per_token=True) for v in (x, big))
        assert tok_big == pytest.approx(tok, rel=1e-3)
        assert plain_big > 50 * plain


def test_search_scores_on_the_sample_with_the_given_absmax():
    """The thresholds come from the absmax given (all tokens), the errors from the sample."""
    x, w = outlier_matrices(seed=1)
    x, w = x.float(), w.float()
    ws, acts = WeightSpec(bits=4, group_size=None, symmetric=False), ActSpec(bits=4)
    gram = x.double().t() @ x.double()
    absmax = x.abs().amax(0) * 2
    plan, tried = search_threshold(x[:128], gram, w, ws, acts, absmax=absmax)
    assert tried[0][0] == pytest.approx(float(absmax.max()))
    assert tried[0][1] == pytest.approx(quantized_output_error(x[:128], w, Plan.identity(64), ws, acts))
    assert min(e for _, e in tried) == pytest.approx(quantized_output_error(x[:128], w, plan, ws, acts))


def with_mlp_outliers(tiny_dir):
    """The tiny model with outliers in down_proj's inputs (rows of up_proj x30, the same
    columns of down_proj /30: the function is unchanged), as SmolLM2 has."""
    model, tok, info = lowbit.load(str(tiny_dir))
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.up_proj.weight[HOT_FF] *= 30
            block.mlp.down_proj.weight[:, HOT_FF] /= 30
    return model, tok, info


def test_fold_into_the_mlp_keeps_architecture_and_function(tiny_dir):
    model, _, _ = with_mlp_outliers(tiny_dir)
    mlp = model.model.layers[0].mlp
    linears = {f"mlp.{k}": v for k, v in mlp.named_children() if isinstance(v, torch.nn.Linear)}
    assert mlp_names(linears) == ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    h = torch.randn(300, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
        ref = mlp(h)
    gram, w = x.double().t() @ x.double(), mlp.down_proj.weight.detach().double()
    plan = make_plan(gram, x.abs().amax(0), w, float(x.abs().amax(0).max()) / 2)
    assert plan.n_disassembled >= 3
    shapes = {k: v.shape for k, v in mlp.state_dict().items()}
    fold_mlp_plan(mlp.gate_proj, mlp.up_proj, mlp.down_proj, plan)
    assert {k: v.shape for k, v in mlp.state_dict().items()} == shapes
    with torch.no_grad():
        xf = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
        out = mlp(h)
    # the folded layers compute exactly the reassembled input, and its max|x| shrank
    torch.testing.assert_close(xf.double(), plan_input(x.double(), plan), rtol=1e-5, atol=1e-5)
    assert float(xf.abs().max()) <= 0.5 * float(x.abs().max()) * (1 + 1e-5)
    change = float((out - ref).norm() / ref.norm())
    assert change == pytest.approx(merge_rel_error(gram, w, plan), rel=1e-3, abs=1e-6)
    assert change < 0.15, change  # a random model: its channels are independent, each merge loses one


def run(tiny_dir, method, w, a, options=None, outliers=True):
    vocab = len(lowbit.load(str(tiny_dir))[1])
    ids, windows = calib(vocab, n=2, length=40, seed=5), calib(vocab, n=4, length=40)
    model, _, _ = with_mlp_outliers(tiny_dir) if outliers else lowbit.load(str(tiny_dir))
    with torch.no_grad():
        fp = model(input_ids=ids).logits
    report = lowbit.quantize(model, QuantConfig(method=method, weight=w, act=a, options=options or {}, calib_precision="fp32"), windows, progress=False)
    with torch.no_grad():
        q = model(input_ids=ids).logits
    return float((q - fp).norm() / fp.norm()), report, model


def test_qllm_w4a4_beats_rtn_and_smoothquant_and_tuning_helps(tiny_dir):
    w, a = WeightSpec(bits=4, group_size=32, symmetric=False), ActSpec(bits=4)
    errs = {m: run(tiny_dir, m, w, a)[0] for m in ("rtn", "smoothquant")}
    errs["qllm"], report, model = run(tiny_dir, "qllm", w, a)
    errs["no_reassembly"] = run(tiny_dir, "qllm", w, a, {"reassembly": False})[0]
    rows = [r for r in report.layers if "reassembly_disassembled" in r]
    assert len(rows) == 2 and all(r["reassembly_disassembled"] >= 3 for r in rows)
    assert all(r["reassembly_act_absmax_after"] < 0.5 * r["reassembly_act_absmax_before"] for r in rows)
    # a random model's channels are independent, so each merge loses one: measured ~0.15-0.17
    assert all(0 < r["reassembly_merge_rel_error"] < 0.25 and r["reassembly_block_rel_change"] < 0.1 for r in rows)
    assert len(quant_layers(model)) == 14
    errs["qllm_lowrank"], report, _ = run(tiny_dir, "qllm", w, a, {"lowrank_rank": 4, "lowrank_steps": 30})
    tuned = [r for r in report.layers if "lowrank_kept" in r]
    assert len(tuned) == 14 and all(r["lowrank_block_rel_error_after"] < r["lowrank_block_rel_error_before"] for r in tuned)
    # measured: rtn 0.217, smoothquant 0.240, qllm without reassembly 0.240, qllm 0.202, tuned 0.189
    assert errs["qllm"] < 0.9 * errs["no_reassembly"] and errs["qllm"] < min(errs["rtn"], errs["smoothquant"]), errs
    assert errs["qllm_lowrank"] < errs["qllm"], errs


def test_qllm_with_gptq_and_options(tiny_dir):
    w, a = WeightSpec(bits=4, group_size=32, symmetric=False), ActSpec(bits=8)
    err, report, _ = run(tiny_dir, "qllm", w, a, {"solver": "gptq"})
    assert err < 0.2 and any("gptq_loss" in r and "reassembly_merge_rel_error" in r for r in report.layers)
    for bad, match in (({"solver": "awq"}, "solver"), ({"max_extra": 0.9}, "max_extra"), ({"lowrank_lr": 2}, "lowrank_lr")):
        with pytest.raises(LowbitError, match=match):
            lowbit.make_algorithm(QuantConfig(method="qllm", weight=w, act=a, options=bad))
    cfg = lowbit.method_config("qllm")
    assert cfg.weight.bits == 4 and cfg.weight.group_size is None and cfg.act.bits == 4 and cfg.act.dynamic


def test_qllm_cli_writes_reassembly_records(tiny_dir, tmp_path, cache):
    import json

    from tests.test_cli import SMALL, run as cli

    out = tmp_path / "q"
    r = cli("quantize", tiny_dir, "--method", "qllm", "--act-bits", "8", "--option", "lowrank_rank=2", "--option", "lowrank_steps=2", "-o", out, *SMALL)
    assert r.exit_code == 0, r.output
    layers = json.loads((out / "report.json").read_text())["layers"]
    down = [x for x in layers if x["layer"].endswith("down_proj")]
    assert len(down) == 2 and all("reassembly_merge_rel_error" in x and "reassembly_disassembled" in x for x in down)
    assert all("lowrank_kept" in x for x in layers)
    r = cli("quantize", tiny_dir, "--method", "qllm", "--option", "solver=nope", "-o", tmp_path / "bad", *SMALL)
    assert r.exit_code == 2 and "error: solver must be rtn or gptq" in r.output
