"""QAT: straight-through fake quantization with LSQ-style scales, the warm-up blend, the
training loop (loss goes down, a killed run resumes to the same curve), and the final codes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.algorithms.base import method_config
from lowbit.config import WeightSpec
from lowbit.errors import LowbitError
from lowbit.formats.base import quantize_matrix
from lowbit.formats.names import format_of
from lowbit.nn.fake_quant import FakeQuantLinear
from lowbit.nn.qlinear import QuantLinear
from lowbit.training.qat import QATConfig, qat, train, training_windows, wrap
from tests.test_runner import calib

EXCERPT = Path(__file__).parent / "data" / "wiki_excerpt.txt"


def layer(rows=8, cols=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.05, torch.randn(rows, generator=g) * 0.01


@pytest.mark.parametrize("fmt", ["int", "nf4", "bcq2", "ternary", "codebook2"])
def test_learned_start_is_rtn_and_blend_zero_is_float(fmt):
    w, b = layer()
    spec = WeightSpec(bits=3, group_size=16, symmetric=False, format=fmt)
    fq = FakeQuantLinear(w, b, spec, "learned")
    rtn = quantize_matrix(format_of(spec), w)
    assert torch.equal(fq.quantized_weight().detach(), rtn.dequantize())  # m = 1: the RTN start
    assert torch.equal(fq.final_encoded().codes, rtn.codes)
    x = torch.randn(3, 48)
    fq.lam = 0.0
    assert torch.equal(fq(x), torch.nn.functional.linear(x, w, b))
    fq.lam = 0.25
    q = rtn.dequantize()
    assert torch.allclose(fq(x), torch.nn.functional.linear(x, w + 0.25 * (q - w), b), atol=1e-6)


def test_lsq_gradients():
    """dL/dw passes straight through; dL/dm = g · sum over the group of (Q(u) - u) · dL/dq."""
    w, b = layer()
    spec = WeightSpec(bits=3, group_size=16, symmetric=False)
    fq = FakeQuantLinear(w, b, spec, "learned")
    with torch.no_grad():
        fq.mult.uniform_(0.8, 1.2, generator=torch.Generator().manual_seed(1))
    R = torch.randn(8, 48, generator=torch.Generator().manual_seed(2))
    (fq.quantized_weight() * R).sum().backward()
    assert torch.allclose(fq.weight.grad, R, atol=1e-6)
    m_cols = fq.mult.detach().repeat_interleave(16, 1)
    u = w / m_cols
    qu = fq.layout.scatter(fq.fmt.decode(fq.fmt.encode(fq.layout.gather(u), fq.p0), fq.p0))
    g = 1 / math.sqrt(16 * 7)
    want = (g * (qu - u) * R).reshape(8, 3, 16).sum(-1)
    assert torch.allclose(fq.mult.grad, want, atol=1e-5)


def test_learned_scales_refused_where_they_cannot_be_stored():
    w, b = layer(cols=64)
    for fmt in ("nf4-dq", "mixed123", "codebook2-col", "billm"):
        with pytest.raises(LowbitError, match="use scales=fixed"):
            FakeQuantLinear(w, b, WeightSpec(group_size=16 if fmt != "codebook2-col" else 1, format=fmt), "learned", name="blk.q")
    fq = FakeQuantLinear(w, b, WeightSpec(group_size=16, format="nf4-dq"), "fixed")
    assert torch.isfinite(fq.quantized_weight()).all()


def _setup(tiny_dir):
    model, tok, _ = lowbit.load(str(tiny_dir))
    windows = calib(len(tok), n=12, length=24, seed=5)
    return model, tok, windows


def _kl(model, teacher, ids):
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        lq = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
    return float(torch.nn.functional.kl_div(lp, lq, log_target=True, reduction="none").sum(-1).mean())


def test_training_lowers_the_loss_and_ends_in_real_codes(tiny_dir, tmp_path):
    model, tok, windows = _setup(tiny_dir)
    teacher = __import__("copy").deepcopy(model)
    ids = calib(len(tok), n=2, length=24, seed=9)
    config = method_config("rtn", weight={"bits": 2, "group_size": 32, "symmetric": False})
    start = __import__("copy").deepcopy(model)
    wrap(start, lambda n: config.weight_spec_for(n), "learned")
    before = _kl(start, teacher, windows)
    cfg = QATConfig(steps=16, batch=4, lr=1e-3, scale_lr=1e-2, warmup_steps=2, save_every=0)
    q, history = qat(model, tok, config, windows, cfg, tmp_path / "state")
    assert len(history) == 16
    assert _kl(q, teacher, windows) < 0.8 * before  # the real codes at the end, on the training windows
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert layers and not any(isinstance(m, FakeQuantLinear) for m in q.modules())
    out = lowbit.save(q, tok, tmp_path / "ckpt", lowbit.api.QuantReport(config={}, layers=[], seconds=0.0, storage=lowbit.api.storage_summary(q)))
    again, _, _ = lowbit.load(str(out))
    with torch.no_grad():
        assert torch.equal(q(input_ids=ids).logits, again(input_ids=ids).logits)


def test_the_curve_starts_at_the_ptq_point(tiny_dir, tmp_path):
    """With eval_every, step 0 is the quantized start evaluated before any update; the
    later evaluations follow every eval_every steps, and the plot draws such a history."""
    from lowbit.evaluation.plots import plot_training

    model, tok, windows = _setup(tiny_dir)
    teacher = __import__("copy").deepcopy(model)
    config = method_config("rtn", weight={"bits": 2, "group_size": 32, "symmetric": False})
    start = __import__("copy").deepcopy(model)
    wrap(start, lambda n: config.weight_spec_for(n), "learned")
    seen = []

    def evaluate(m):
        seen.append(_kl(m, teacher, windows))
        return {"ppl": float(seen[-1]), "kl": seen[-1]}

    cfg = QATConfig(steps=4, batch=2, lr=1e-3, warmup_steps=1, save_every=0, eval_every=2)
    _, history = qat(model, tok, config, windows, cfg, tmp_path / "state", evaluate=evaluate)
    assert [h["step"] for h in history] == [0, 1, 2, 3, 4]
    assert "loss" not in history[0] and history[0]["tokens"] == 0
    assert history[0]["eval"]["kl"] == pytest.approx(_kl(start, teacher, windows), rel=1e-5)
    assert [h["step"] for h in history if "eval" in h] == [0, 2]  # the last step's evaluation is the caller's
    assert plot_training(history, tmp_path / "t.png", final={"ppl": 1.0, "kl": 0.1}).exists()


def test_a_killed_run_resumes_to_the_same_curve(tiny_dir, tmp_path):
    cfg = QATConfig(steps=6, batch=2, lr=1e-3, warmup_steps=1, save_every=2, blend_steps=3, distill=0.5)
    runs = []
    for kill in (None, 3):
        model, tok, windows = _setup(tiny_dir)
        teacher = __import__("copy").deepcopy(model)
        wrap(model, lambda n: WeightSpec(bits=3, group_size=32, symmetric=False), "learned")
        state = tmp_path / f"state-{kill}"
        h = train(model, teacher, windows, cfg, state, stop_after=kill)
        if kill:
            assert len(h) == 3  # killed after step 3; the state on disk is step 2's
            model, tok, windows = _setup(tiny_dir)
            wrap(model, lambda n: WeightSpec(bits=3, group_size=32, symmetric=False), "learned")
            h = train(model, teacher, windows, cfg, state, resume=True)
        runs.append(([r["loss"] for r in h], {n: p.clone() for n, p in model.named_parameters()}))
    (straight, p1), (resumed, p2) = runs
    assert straight == resumed  # the same six losses, bit for bit
    assert all(torch.equal(p1[n], p2[n]) for n in p1)


def test_training_windows_skip_the_evaluation_part():
    ids = torch.arange(100)
    w = training_windows(ids, 30, 16, None)
    assert w.shape == (4, 16) and int(w.min()) == 30
    with pytest.raises(LowbitError, match="no room"):
        training_windows(ids, 95, 16, None)


def test_cli(tiny_dir, tmp_path, cache):
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    args = ["qat", str(tiny_dir), "--format", "int3", "-g", "32", "--steps", "3", "--batch", "2", "--train-len", "32",
            "--windows", "2", "--seq-len", "64", "--data", str(EXCERPT), "--save-every", "1", "-q", "-o", str(tmp_path / "ckpt")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output and (tmp_path / "ckpt" / "training.png").exists() and (tmp_path / "ckpt" / "training.json").exists()
    r = CliRunner().invoke(app, args[:-2] + ["-o", str(tmp_path / "ckpt")])
    assert r.exit_code != 0 and "--resume" in r.output  # an earlier state is not overwritten silently


def test_bitnet_formats_as_the_papers_define_them():
    w, _ = layer(rows=6, cols=40)
    one = quantize_matrix(format_of(WeightSpec(format="bitnet")), w)
    beta, alpha = w.abs().mean(), w.mean()
    assert torch.allclose(one.dequantize(), torch.where(w - alpha >= 0, beta, -beta))
    tern = quantize_matrix(format_of(WeightSpec(format="bitnet158")), w)
    gamma = w.abs().mean()
    assert torch.allclose(tern.dequantize(), torch.round(w / (gamma + 1e-5)).clamp(-1, 1) * gamma)


def test_bitnet_qat_trains_with_8bit_absmax_activations(tiny_dir, tmp_path):
    """BitLinear: per-matrix ternary weights (scale refit every step) and 8-bit absmax
    per-token inputs, both straight through; the result holds both."""
    model, tok, windows = _setup(tiny_dir)
    config = method_config("rtn", weight={"format": "bitnet158"}, act={"bits": 8, "symmetric": True})
    cfg = QATConfig(steps=3, batch=2, lr=1e-3, scales="fixed", save_every=0)
    q, history = qat(model, tok, config, windows, cfg, tmp_path / "state")
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.fmt.kind == "bitnet" and m.fmt.ternary and m.aspec.bits == 8 and m.aspec.symmetric for m in layers)
    assert all(set(torch.unique(m.encoded.codes).tolist()) <= {0, 1, 2} for m in layers)
    with pytest.raises(LowbitError, match="--scales fixed"):
        wrap(lowbit.load(str(tiny_dir))[0], lambda n: WeightSpec(format="bitnet158"), "learned")
