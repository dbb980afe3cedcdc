"""GGML block types as formats of the family (lowbit.formats.ggml), llama.cpp file types as
per-layer plans (export.gguf_plan), and ``lowbit quantize --format Q4_K_M`` followed by
``lowbit export gguf CKPT`` writing exactly the codes that were quantized."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader

import lowbit
from lowbit.algorithms.base import method_config
from lowbit.algorithms.gptq import output_error
from lowbit.algorithms.gptq_format import gptq_format
from lowbit.algorithms.gptq_grid import gptq_on_grid
from lowbit.errors import LowbitError
from lowbit.formats.base import make_format, quantize_matrix
from lowbit.formats.gguf import dequantize_tensor, quantize_tensor
from lowbit.formats.gguf.grid import codes_of, grid_of, grid_types, with_codes
from tests.test_gguf_export import kdir  # noqa: F401  (fixture)
from tests.test_gptq import problem


def _weights(rows=6, cols=512, seed=3):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 1, (rows, 1))).astype(np.float32)
    W[0, :32] = 0  # a dead block
    return W


@pytest.mark.parametrize("qtype", grid_types())
def test_codes_read_back_out_of_the_bytes(qtype):
    W = _weights()
    raw = quantize_tensor(W, qtype, np.ones(W.shape[1], np.float32))
    codes = codes_of(raw, qtype, W.shape)
    np.testing.assert_array_equal(with_codes(raw, qtype, codes), raw)  # the inverse of with_codes
    np.testing.assert_array_equal(grid_of(raw, qtype, W.shape).decode(codes), dequantize_tensor(raw, qtype, W.shape))


@pytest.mark.parametrize("qtype", grid_types())
@pytest.mark.parametrize("weighted", [False, True])
def test_format_is_the_codec_bit_exactly(qtype, weighted):
    W = _weights()
    imp = np.random.default_rng(1).uniform(0.1, 2, W.shape[1]).astype(np.float32) if weighted else None
    fmt = make_format("ggml", type=qtype)
    enc = quantize_matrix(fmt, torch.from_numpy(W), importance=None if imp is None else torch.from_numpy(imp))
    raw = quantize_tensor(W, qtype, imp if weighted else np.ones(W.shape[1], np.float32))  # search "weighted"
    packed = fmt.pack(enc)
    assert list(packed) == ["ggml"]
    np.testing.assert_array_equal(packed["ggml"].numpy(), raw)
    np.testing.assert_array_equal(enc.dequantize().numpy(), dequantize_tensor(raw, qtype, W.shape))
    assert fmt.nbytes(enc) == raw.nbytes  # exact bits: the GGUF tensor's own bytes
    back = fmt.unpack(packed, *W.shape, enc.g_idx)
    assert torch.equal(back.codes, enc.codes) and all(torch.equal(back.params[k], enc.params[k]) for k in enc.params)
    # encode on the stored grid is the codec's rounding, up to ties (legacy searches)
    again = fmt.decode(fmt.encode(torch.from_numpy(W).reshape(6, -1, fmt.group_size), enc.params), enc.params)
    assert float((again.reshape(W.shape) != enc.dequantize()).float().mean()) < 0.01


def test_plain_llama_cpp_rounding_is_a_search_choice():
    W = _weights()
    enc = quantize_matrix(make_format("ggml", type="Q4_0", search="llama.cpp"), torch.from_numpy(W))
    np.testing.assert_array_equal(enc.fmt.pack(enc)["ggml"].numpy(), quantize_tensor(W, "Q4_0"))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q3_K", "Q6_K", "Q5_0", "Q8_0"])
def test_gptq_on_the_format_is_gptq_on_the_grid(qtype):
    """The family's GPTQ (algorithms.gptq_format) against the grid GPTQ beside it: same
    scales (the codec's, weighted by the Hessian diagonal), same codes."""
    W, H, _ = problem(n=256, out=32, seed=2)
    fmt = make_format("ggml", type=qtype)
    res = gptq_format(W, H, fmt, block_size=64)
    raw = quantize_tensor(W.numpy(), qtype, (torch.diagonal(H) / 2).numpy())
    ref = gptq_on_grid(W.numpy(), H, grid_of(raw, qtype, W.shape), block_size=64).codes
    np.testing.assert_array_equal(fmt.pack(res.enc)["ggml"].numpy(), with_codes(raw, qtype, ref))
    rtn = quantize_matrix(fmt, W, importance=torch.diagonal(H)).dequantize()
    assert output_error(W, res.enc.dequantize(), H) < output_error(W, rtn, H)


def test_bad_widths_and_names():
    with pytest.raises(LowbitError, match="layer x: input width 576 is not a multiple of Q4_K's 256-wide blocks"):
        quantize_matrix(make_format("ggml", type="Q4_K"), torch.randn(4, 576), name="x")
    with pytest.raises(LowbitError, match="IQ4_NL"):
        make_format("ggml", type="IQ4_NL")
    with pytest.raises(LowbitError, match="per-tensor plan"):
        from lowbit.config import WeightSpec
        from lowbit.formats.names import format_of

        format_of(WeightSpec(format="Q4_K_M"))
    with pytest.raises(LowbitError, match="unknown weight format"):
        method_config("rtn", weight={"format": "Q7_K"})


def _tensors(path):
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in GGUFReader(str(path)).tensors}


def test_quantize_then_export_writes_the_quantized_codes(kdir, tmp_path, excerpt):  # noqa: F811
    """lowbit quantize --method gptq --format Q4_K_M, saved, reloaded, exported: the same
    tensors as export gguf --gptq in one go, and the layers' codes unchanged."""
    from lowbit.export.gguf_quantize import export_checkpoint_gguf, quantize_to_gguf

    model, tok, info = lowbit.load(str(kdir))
    ids = torch.tensor(tok(excerpt[:30000])["input_ids"][: 8 * 64]).reshape(8, 64)
    config = method_config("gptq", weight={"format": "Q4_K_M"}, calib_precision="fp32")
    report = lowbit.quantize(model, config, ids, progress=False)
    formats = {r["layer"]: r["format"] for r in report.layers}
    assert set(formats.values()) == {"Q4_K", "Q6_K"}
    ckpt = lowbit.save(model, tok, tmp_path / "ckpt", report, source=info["source"])
    again, tok2, info2 = lowbit.load(str(ckpt))
    res, copied = export_checkpoint_gguf(again, tok2, info2["checkpoint"], tmp_path / "a.gguf", None, source=info2["source"])
    assert copied and res.preset == "Q4_K_M"
    fresh, tok3, info3 = lowbit.load(str(kdir))
    quantize_to_gguf(fresh, tok3, tmp_path / "b.gguf", "Q4_K_M", windows=ids, gptq=True, source=info3["source"])
    a, b = _tensors(tmp_path / "a.gguf"), _tensors(tmp_path / "b.gguf")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    # a checkpoint of a file type is not quantized again to another one
    with pytest.raises(LowbitError, match="holds Q4_K_M codes; exporting it as Q6_K"):
        export_checkpoint_gguf(again, tok2, info2["checkpoint"], tmp_path / "c.gguf", "Q6_K")


def test_a_budget_mixture_of_ggml_types_exports_with_its_own_types(kdir, tmp_path, excerpt):  # noqa: F811
    """A bit budget over GGML candidates gives each Linear its own type; the checkpoint's
    GGUF keeps every Linear's type and bytes, and the preset types only the rest."""
    from lowbit.algorithms.allocate import Budget
    from lowbit.export.gguf_quantize import export_checkpoint_gguf, stored_ggml
    from lowbit.export.gguf_writer import hf_to_gguf_names, plan_types

    model, tok, info = lowbit.load(str(kdir))
    ids = torch.tensor(tok(excerpt[:30000])["input_ids"][: 8 * 64]).reshape(8, 64)
    config = method_config("rtn", weight={"format": "Q4_K"}, calib_precision="fp32")
    report = lowbit.quantize(model, config, ids, progress=False,
                             budget=Budget(bpw=4.5, candidates=("Q3_K", "Q4_0", "Q5_K", "Q8_0")))
    chosen = set(report.allocation["choices"].values())
    assert len(chosen) >= 2, chosen  # a real mixture, not one type
    assert report.allocation["bits_per_weight"] <= 4.5
    ours = stored_ggml(model)
    ckpt = lowbit.save(model, tok, tmp_path / "ckpt", report, source=info["source"])
    again, tok2, info2 = lowbit.load(str(ckpt))
    res, copied = export_checkpoint_gguf(again, tok2, info2["checkpoint"], tmp_path / "m.gguf", None, source=info2["source"])
    assert copied
    names = hf_to_gguf_names(model)
    got = _tensors(tmp_path / "m.gguf")
    for hf, (t, raw) in ours.items():
        g = names[hf]
        assert got[g][0] == t.name, g
        if not g.endswith(("attn_q.weight", "attn_k.weight")):  # those rows are permuted for llama.cpp
            assert got[g][1] == raw.tobytes(), g
    preset = plan_types(model, "Q4_K_M", imatrix=False)
    other = [hf for hf in preset if hf not in ours]
    assert other and all(got[names[hf]][0] == preset[hf].name for hf in other)


def test_export_gguf_max_size_writes_a_mixture_within_the_bytes(kdir, tmp_path, excerpt):  # noqa: F811
    """export gguf --max-size: one GGML type per Linear for the least predicted error, the
    whole file within the size; a size below the other tensors' bytes is refused."""
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.export.gguf_quantize import quantize_to_gguf

    model, tok, info = lowbit.load(str(kdir))
    ids = torch.tensor(tok(excerpt[:30000])["input_ids"][: 8 * 64]).reshape(8, 64)
    plain = quantize_to_gguf(copy_model(model), tok, tmp_path / "plain.gguf", "Q4_K_M", windows=ids, imatrix=True, source=info["source"])
    target = plain.export.file_bytes
    run = quantize_to_gguf(copy_model(model), tok, tmp_path / "mix.gguf", "Q4_K_M", windows=ids, imatrix=True, source=info["source"],
                           max_bytes=target, candidates=("Q3_K", "Q4_0", "Q5_K", "Q8_0"))
    assert run.export.file_bytes <= target
    assert len(set(run.allocation["choices"].values())) >= 2
    got = {t for t, n in run.export.type_counts.items()}
    assert set(run.allocation["choices"].values()) <= got
    assert not list(tmp_path.glob(".mix.gguf.probe*"))  # the probe file is gone
    r = CliRunner().invoke(app, ["export", "gguf", str(kdir), "--max-size", "10KB", "-o", str(tmp_path / "small.gguf")])
    assert r.exit_code != 0 and "already take" in r.output and not (tmp_path / "small.gguf").exists()
    r = CliRunner().invoke(app, ["export", "gguf", str(kdir), "--max-size", "1MB", "--candidates", "Q4_0,IQ2_XS", "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code != 0 and "IQ2_XS" in r.output


def copy_model(model):
    import copy

    return copy.deepcopy(model)


def test_rtn_with_an_imatrix_weighs_the_fit(kdir, excerpt):  # noqa: F811
    """Block 0's q_proj sees the float model's inputs (nothing upstream is quantized yet),
    so its bytes are the codec's with llama.cpp's imatrix of the float model."""
    from lowbit.calibration.imatrix import collect_imatrix
    from lowbit.export.gguf_quantize import stored_ggml

    name = "model.layers.0.self_attn.q_proj"
    model, tok, _ = lowbit.load(str(kdir))
    ids = torch.tensor(tok(excerpt[:30000])["input_ids"][: 8 * 64]).reshape(8, 64)
    W = model.get_submodule(name).weight.detach().clone()
    imat = collect_imatrix(model, ids)[name]
    cfg = method_config("rtn", weight={"format": "Q4_K"}, options={"imatrix": True}, calib_precision="fp32")
    report = lowbit.quantize(model, cfg, ids, progress=False)
    got = stored_ggml(model)[f"{name}.weight"][1]
    np.testing.assert_array_equal(got, quantize_tensor(W.numpy(), "Q4_K", imat.numpy()))
    assert not np.array_equal(got, quantize_tensor(W.numpy(), "Q4_K", np.ones(W.shape[1], np.float32)))
    assert report.config["options"] == {"imatrix": True}
    with pytest.raises(LowbitError, match="does not weigh its fit"):
        lowbit.quantize(lowbit.load(str(kdir))[0], method_config("rtn", weight={"format": "nf4"}, options={"imatrix": True}), ids, progress=False)
