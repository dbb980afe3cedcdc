"""BiLLM: the format's searches and coding rule against plain loops, its storage, the
GPTQ-style solve against round-to-nearest, and the method through the runner."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.algorithms.base import method_config
from lowbit.algorithms.billm import billm_quantize
from lowbit.algorithms.gptq import output_errors
from lowbit.errors import LowbitError
from lowbit.formats.base import make_format, quantize_matrix
from lowbit.formats.billm import PERCENTILES, binarize
from lowbit.nn.qlinear import QuantLinear
from tests.test_runner import calib


def binarize_reference(w, m, passes):
    """Row by row, entry by entry: mean and mean absolute deviation of the masked entries."""
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        idx = [j for j in range(w.shape[1]) if bool(m[0 if m.shape[0] == 1 else r, j])]
        for _ in range(passes):
            res = [float(w[r, j] - out[r, j]) for j in idx]
            mu = sum(res) / len(res) if res else 0.0
            a = sum(abs(x - mu) for x in res) / len(res) if res else 0.0
            for j, x in zip(idx, res):
                out[r, j] += mu + (a if x - mu >= 0 else -a)
    return out


def block(rows=12, cols=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[:, 7] *= 12  # salient columns
    w[:, 21] *= 6
    return w


@pytest.mark.parametrize("passes", [1, 2])
def test_binarize_equals_the_plain_loop(passes):
    w = block()
    m = torch.rand(1, 40, generator=torch.Generator().manual_seed(3)) > 0.4
    got = binarize(w, m, passes)[0]
    assert torch.allclose(got, binarize_reference(w, m, passes), atol=1e-6)
    assert torch.equal(binarize(w, torch.zeros(1, 40, dtype=torch.bool), 2)[0], torch.zeros_like(w))  # empty set: nothing


def test_fit_searches_as_described():
    """The salient count minimises the two-pass error over every count tried, the break
    point the final error over the 81 percentiles, and decoding gives the searched values."""
    w, imp = block(), torch.linspace(0.5, 2.0, 40)
    fmt = make_format("billm", group_size=40, scale_dtype="float32", max_salient=12)
    p = fmt.fit(w.unsqueeze(1), None, imp.unsqueeze(0))
    sal = p["salient"][0, 0]
    score = (w.pow(2) * imp).sum(0)
    order = torch.argsort(score, descending=True, stable=True)

    def err(q):
        return float(((w - q).pow(2) * imp).sum())

    errors = {}
    for k in range(1, 12):
        s = torch.zeros(40, dtype=torch.bool)
        s[order[:k]] = True
        errors[k] = err(binarize_reference(w, s[None], 2) + binarize_reference(w, (~s)[None], 2))
    k = int(sal.sum())
    assert errors[k] == pytest.approx(min(errors.values()), rel=1e-5) and torch.equal(sal, torch.isin(torch.arange(40), order[:k]))
    assert bool(sal[7]) and bool(sal[21])
    rest = (~sal)[None].expand(12, -1)
    q_sal = binarize_reference(w, sal[None], 2)
    finals = []
    for brk in torch.quantile(w.abs()[rest].double(), PERCENTILES.double()).half().float().unique():
        lo, hi = rest & (w.abs() < brk), rest & (w.abs() >= brk)
        finals.append(err(binarize_reference(w, lo, 1) + binarize_reference(w, hi, 1) + q_sal))
    deq = quantize_matrix(fmt, w, importance=imp).dequantize()
    assert err(deq) == pytest.approx(min(finals), rel=1e-5)


def test_codes_follow_the_class_rule_and_storage_is_exact():
    fmt = make_format("billm", group_size=32)
    w = block(rows=16, cols=72)  # 72: a narrower last block
    enc = quantize_matrix(fmt, w)
    sal_cols = torch.cat([enc.params["salient"][0, 0], enc.params["salient"][0, 1], enc.params["salient"][0, 2, :8]])
    assert torch.equal(enc.codes >= 4, sal_cols.unsqueeze(0).expand(16, -1))  # salient columns, all rows
    brk = enc.params["brk"].float().reshape(-1)[torch.arange(72) // 32]
    ns = enc.codes < 4
    assert torch.equal(((enc.codes >= 2) & ns), (w.abs() >= brk) & ns)  # sparse group: at or above the break
    # bytes: 2 bits per weight, 1 bit per column slot, a float16 break per block, 8 float16 per row and block
    assert fmt.nbytes(enc) == 16 * 18 + 96 // 8 + 3 * 2 + 16 * 3 * 8 * 2
    assert fmt.signs_only_bits(enc) == pytest.approx(1 + sal_cols.float().mean().item())


def test_edge_cases():
    fmt = make_format("billm", group_size=16)
    z = torch.zeros(4, 20)
    enc = quantize_matrix(fmt, z)
    assert torch.equal(enc.dequantize(), z)
    const = torch.full((4, 20), 0.3)
    assert torch.allclose(quantize_matrix(fmt, const).dequantize(), const, atol=1e-3)
    one_more = torch.randn(4, 17)  # a last block of one column: no salient column possible
    enc = quantize_matrix(fmt, one_more)
    assert torch.isfinite(enc.dequantize()).all() and not bool(enc.params["salient"][0, 1].any())
    with pytest.raises(LowbitError, match="at least 2 columns"):
        make_format("billm", group_size=1)


def problem(rows=48, cols=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1500, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols**0.5)
    X[:, 3] *= 8
    return block(rows, cols, seed), 2 * X.t() @ X / X.shape[0]


@pytest.mark.parametrize("feedback", ["block", "column"])
def test_solve_beats_round_to_nearest(feedback):
    """On weights without planted columns and inputs with one outlier channel, the solve's
    output error is well below round-to-nearest's."""
    _, H = problem()
    W = torch.randn(48, 160, generator=torch.Generator().manual_seed(4)) * 0.02
    fmt = make_format("billm", group_size=64)
    enc, _ = billm_quantize(W, H, fmt, feedback=feedback)
    err, rtn_err = output_errors(W, [enc.dequantize(), quantize_matrix(fmt, W).dequantize()], H)
    assert err < 0.95 * rtn_err
    back = fmt.unpack(fmt.pack(enc), *W.shape, enc.g_idx)
    assert torch.equal(back.codes, enc.codes) and torch.equal(back.dequantize(), enc.dequantize())


def test_block_feedback_is_the_reference_loop():
    """feedback=block: each block coded from its weights as the solve reaches it, errors
    (w - q) / U_jj pushed to the later blocks through U's rows (BRAGPTQ's loop)."""
    from lowbit.algorithms.gptq import inverse_hessian_cholesky

    W, H = problem(rows=16, cols=96, seed=2)
    fmt = make_format("billm", group_size=32)
    enc, _ = billm_quantize(W, H, fmt, feedback="block")
    U, _ = inverse_hessian_cholesky(H, 0.01)
    Wc = W.clone()
    out = torch.zeros_like(W)
    for i1 in range(0, 96, 32):
        d = torch.diagonal(U)[i1 : i1 + 32]
        e = quantize_matrix(fmt, Wc[:, i1 : i1 + 32], importance=1 / d.pow(2))
        out[:, i1 : i1 + 32] = e.dequantize()
        err = (Wc[:, i1 : i1 + 32] - out[:, i1 : i1 + 32]) / d
        Wc[:, i1 + 32 :] -= err @ U[i1 : i1 + 32, i1 + 32 :]
    assert torch.allclose(enc.dequantize(), out, atol=1e-6)


def test_method_through_the_runner_and_checkpoint(tiny_dir, tmp_path):
    model, tok, info = lowbit.load(str(tiny_dir))
    assert method_config("billm").weight.format == "billm" and method_config("billm").weight.group_size == 128
    config = method_config("billm", weight={"group_size": 32}, calib_precision="fp32")  # the tiny model is 96 wide
    report = lowbit.quantize(model, config, calib(len(tok)), progress=False)
    rows = [r for r in report.layers if "paper_bits_per_weight" in r]
    assert rows and all(r["output_rel_error"] < r["rtn_output_rel_error"] for r in rows)
    # 2 bits of codes, 8 float16 per row and block of 32 (4 bits), the salient mask
    assert all(6.0 < r["bits_per_weight"] < 6.2 and 1.0 < r["paper_bits_per_weight"] < 1.5 for r in rows)
    again, _, _ = lowbit.load(str(lowbit.save(model, tok, tmp_path / "ckpt", report, source=info["source"])))
    ids = torch.arange(20).reshape(1, -1) % len(tok)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert all(m.fmt.kind == "billm" for m in again.modules() if isinstance(m, QuantLinear))


def test_wrong_pairings_are_refused(tiny_dir):
    model, tok, _ = lowbit.load(str(tiny_dir))
    with pytest.raises(LowbitError, match="BiLLM binarizes into the billm format"):
        lowbit.quantize(model, method_config("billm", weight={"format": "nf4"}), calib(len(tok)), progress=False)
    with pytest.raises(LowbitError, match="use its own method"):
        lowbit.quantize(model, method_config("gptq", weight={"format": "billm"}), calib(len(tok)), progress=False)
