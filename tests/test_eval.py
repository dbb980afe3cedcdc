"""Evaluation: perplexity by the protocol's definition, KL and top-1 against a reference."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.config import QuantConfig, WeightSpec
from lowbit.errors import LowbitError
from lowbit.evaluation.metrics import Reference, evaluate
from tests.test_runner import calib


def manual_ppl(model, windows):
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = F.log_softmax(model(input_ids=w[None]).logits[0, :-1].double(), -1)
            for t in range(len(w) - 1):
                nll -= float(logp[t, w[t + 1]])
                n += 1
    return math.exp(nll / n), n


def test_perplexity_matches_the_definition(tiny):
    model, tok = tiny
    windows = calib(len(tok), n=3, length=40)
    r = evaluate(model, windows)
    ppl, n = manual_ppl(model, windows)
    assert r.n_tokens == n == 3 * 39
    assert r.ppl == pytest.approx(ppl, rel=1e-5)
    assert len(r.window_nll) == 3 and r.kl is None


def test_reference_against_itself_and_a_quantized_model(tiny_dir, tmp_path):
    model, tok, _ = lowbit.load(str(tiny_dir))
    windows = calib(len(tok), n=3, length=40)
    folder = tmp_path / "ref"
    fp = evaluate(model, windows, record_to=folder, record_meta={"what": "test"})
    ref = Reference(folder)
    ref.check(windows, len(tok))
    assert ref.meta["what"] == "test" and ref.meta["result"]["ppl"] == fp.ppl
    same = evaluate(model, windows, reference=ref)
    assert same.top1 == 1.0
    assert abs(same.kl) < 1e-4  # only the float16 storage of the reference
    lowbit.quantize(model, QuantConfig(weight=WeightSpec(bits=2, group_size=32)), progress=False)
    q = evaluate(model, windows, reference=ref)
    assert q.kl > 100 * abs(same.kl) and q.top1 < 1.0


def test_reference_cache_records_once(tiny_dir, cache):
    model, tok, info = lowbit.load(str(tiny_dir))
    windows = calib(len(tok), n=2, length=24)
    p = lowbit.Protocol(seq_len=24, n_windows=2)
    ref, fp = lowbit.reference_for(model, info["source"]["fingerprint"], windows, p, progress=False)
    stamp = (ref.folder / "ids.npy").stat().st_mtime_ns
    ref2, fp2 = lowbit.reference_for(model, info["source"]["fingerprint"], windows, p, progress=False)
    assert ref2.folder == ref.folder and fp2.ppl == fp.ppl
    assert (ref.folder / "ids.npy").stat().st_mtime_ns == stamp


def test_interrupted_recording_leaves_no_reference(tiny, tmp_path):
    model, tok = tiny
    windows = calib(len(tok), n=3, length=24)
    calls = {"n": 0}

    def flaky(it):
        for x in it:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            yield x

    with pytest.raises(KeyboardInterrupt):
        evaluate(model, windows, record_to=tmp_path / "ref", progress=flaky)
    assert not (tmp_path / "ref").exists() and list(tmp_path.iterdir()) == []


def test_bad_windows(tiny):
    model, _ = tiny
    with pytest.raises(LowbitError, match="at least 2 tokens"):
        evaluate(model, torch.zeros(2, 1, dtype=torch.long))


def test_compact_reference_estimates_the_full_kl():
    """Head exact, tail sampled: over many positions the mean KL matches the full sum."""
    from lowbit.evaluation.reference import compact_rows, position_kl

    g = torch.Generator().manual_seed(0)
    vocab, positions = 4000, 2000
    logp = torch.log_softmax(3 * torch.randn(positions, vocab, generator=g), -1)
    logq = torch.log_softmax(logp + 0.7 * torch.randn(positions, vocab, generator=g), -1)
    full = (logp.exp() * (logp - logq)).sum(-1)
    ids, lp, tail, top = compact_rows(logp, 64, 64, torch.Generator().manual_seed(1))
    est = position_kl(ids, lp, tail, logq, 64)
    assert ids.shape == (positions, 128) and torch.equal(top.long(), logp.argmax(-1))
    assert float(full.mean()) > 0.05
    assert abs(float(est.mean()) - float(full.mean())) < 0.01 * float(full.mean())
    # the head alone, with the tail's coarse-grained term, would be far off: the samples matter
    head_only = position_kl(ids[:, :64], lp[:, :64], tail, logq, 64)
    assert abs(float(head_only.mean()) - float(full.mean())) > 0.05 * float(full.mean())
    # a model equal to the reference: zero exactly, whatever the draws
    assert float(position_kl(ids, lp, tail, logp, 64).abs().max()) < 1e-5


def test_reference_is_small_deterministic_and_the_cache_bounded(tmp_path):
    from lowbit.evaluation.reference import Recorder, Reference, folder_bytes, prune

    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(2, 30, 5000, generator=g), -1)
    for name in ("a", "b"):
        rec = Recorder(tmp_path / name, 2, 30, 5000, {})
        for i in range(2):
            rec.write(i, logp[i])
        rec.close(True, {"ppl": 1.0})
    for f in ("ids.npy", "logprobs.npy", "tail.npy", "argmax.npy"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    ref = Reference(tmp_path / "a")
    assert float(ref.kl(1, logp[1]).abs().max()) < 1e-5
    assert folder_bytes(tmp_path / "a") < 2 * 30 * 5000 * 2 / 4  # a quarter of float16 distributions
    os.utime(tmp_path / "a", (1, 1))  # a is the least recently used
    removed = prune(tmp_path, folder_bytes(tmp_path / "b") + 10, keep=tmp_path / "b")
    assert removed == [tmp_path / "a"] and (tmp_path / "b").is_dir()


@pytest.mark.parametrize("batch_size", [1, 2])
def test_logprobs_by_chunks_of_positions_equal_the_whole_window(tiny_dir, tmp_path, monkeypatch, batch_size):
    """Where the architecture allows, the head runs on POSITION_CHUNK positions at a time
    (windows of 300 tokens: chunks of 128, 128 and 43); perplexity, KL, top-1 and the
    recorded reference are those of the whole-window path."""
    import copy

    from lowbit.evaluation import metrics

    model, tok, _ = lowbit.load(str(tiny_dir))
    assert metrics._head_split(model) is not None  # the tiny Llama takes the chunked path
    windows = calib(len(tok), n=3, length=300)
    assert [a for a, _ in metrics.window_logprobs(model, windows[:1])] == [0, 128, 256]
    quant = copy.deepcopy(model)
    lowbit.quantize(quant, QuantConfig(weight=WeightSpec(bits=3, group_size=32)), progress=False)
    runs = {}
    for path in ("chunked", "whole"):
        if path == "whole":
            monkeypatch.setattr(metrics, "HEAD_ONLY_TYPES", ())
            assert [a for a, _ in metrics.window_logprobs(model, windows[:1])] == [0]
        fp = evaluate(model, windows, record_to=tmp_path / path, batch_size=batch_size)
        ref = Reference(tmp_path / path)
        runs[path] = (fp, evaluate(quant, windows, reference=ref, batch_size=batch_size), ref)
    (fa, qa, ra), (fb, qb, rb) = runs["chunked"], runs["whole"]
    assert fa.ppl == pytest.approx(fb.ppl, rel=1e-6) and fa.window_nll == pytest.approx(fb.window_nll, rel=1e-6)
    assert qa.kl == pytest.approx(qb.kl, rel=1e-4) and qa.top1 == qb.top1 and qa.ppl == pytest.approx(qb.ppl, rel=1e-6)
    assert qa.kl > 1e-3  # (a 3-bit model: the KL is no rounding noise)
    assert (ra.argmax == rb.argmax).all()
    assert (ra.ids[:, :, :128] == rb.ids[:, :, :128]).mean() > 0.999  # the head (ties aside)


def test_nonfinite_count_across_slices(monkeypatch):
    from lowbit.models import loader

    monkeypatch.setattr(loader, "FINITE_CHUNK", 1000)
    t = torch.zeros(7, 501)  # 3507 values: slices of 1000, the last one short
    t.view(-1)[[0, 999, 1000, 3506]] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")])
    assert loader.nonfinite_count(t) == 4 and loader.nonfinite_count(t[:, :2]) == 1
