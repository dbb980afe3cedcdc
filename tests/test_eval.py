"""Evaluation: perplexity by the protocol's definition, KL and top-1 against a reference."""

from __future__ import annotations

import math

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
    stamp = (ref.folder / "logprobs.npy").stat().st_mtime_ns
    ref2, fp2 = lowbit.reference_for(model, info["source"]["fingerprint"], windows, p, progress=False)
    assert ref2.folder == ref.folder and fp2.ppl == fp.ppl
    assert (ref.folder / "logprobs.npy").stat().st_mtime_ns == stamp


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
