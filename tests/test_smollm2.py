"""End to end on the embedded SmolLM2-135M and Wikipedia text (installed by `make test`)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit.cli import app
from lowbit.config import QuantConfig, WeightSpec
from lowbit.errors import LowbitError
from lowbit.models.loader import embedded_gguf
from tests.conftest import needs_model

pytestmark = [needs_model, pytest.mark.model]


@pytest.fixture(scope="module")
def smol():
    model, tok, info = lowbit.load("smollm2-135m")
    return model, tok, info


def test_embedded_model_loads_and_answers(smol):
    model, tok, info = smol
    assert info["source"]["kind"] == "embedded"
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_fp32_perplexity_under_the_protocol_is_23_49(smol):
    model, tok, info = smol
    evals, calib = lowbit.prepare_windows(tok)
    assert evals.shape == (20, 512) and calib.shape == (32, 512)
    _, fp = lowbit.reference_for(model, info["source"]["fingerprint"], evals, lowbit.Protocol(), progress=False)
    assert fp.n_tokens == 20 * 511
    assert fp.ppl == pytest.approx(23.49, abs=0.01)


def test_rtn_checkpoint_roundtrip_on_smollm2(tmp_path):
    model, tok, info = lowbit.load("smollm2-135m")
    report = lowbit.quantize(model, QuantConfig(weight=WeightSpec(bits=4, group_size=64, symmetric=False)), progress=False)
    # per row: 4-bit codes, one fp16 scale and one 4-bit zero per 64 weights; 576-wide rows
    # have 9 groups, so their zero points take 5 bytes (4.5 rounded up)
    bpw = report.storage["bits_per_weight"]
    assert 4 + 16 / 64 + 4 / 64 < bpw < 4 + 16 / 64 + 4 / 64 + 0.01
    out = lowbit.save(model, tok, tmp_path / "ckpt", report, source=info["source"])
    again, _, _ = lowbit.load(str(out))
    ids = tok("Quantization makes models small.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    # 4-bit codes + fp16 scales + 4-bit zeros for the 210 Linear layers, fp32 for the rest
    size = (out / "model.safetensors").stat().st_size
    assert 150e6 < size < 175e6


def test_truncated_gguf_is_a_clear_error(tmp_path):
    src = embedded_gguf("smollm2-135m")
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(8_000_000))
    with pytest.raises(LowbitError, match="cut.gguf is truncated"):
        lowbit.load(str(cut))
    whole = tmp_path / "copy.gguf"
    shutil.copy(src, whole)  # a local .gguf path works as MODEL too (and hits the same cache)
    model, _, info = lowbit.load(str(whole))
    assert info["source"]["kind"] == "gguf" and model.config.num_hidden_layers == 30


def test_cli_w8a8_on_smollm2(tmp_path):
    out = tmp_path / "w8a8"
    r = CliRunner().invoke(
        app,
        ["quantize", "smollm2-135m", "-b", "8", "-g", "channel", "--asym", "--act-bits", "8",
         "--windows", "2", "--n-calib", "2", "-q", "-o", str(out)],
    )
    assert r.exit_code == 0, r.output
    ev = json.loads((out / "eval.json").read_text())
    assert ev["quantized"]["ppl"] / ev["original"]["ppl"] < 1.05
    assert ev["quantized"]["top1"] > 0.85
