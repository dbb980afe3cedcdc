"""AWQ: scale and clipping searches on seeded layers, exact folding into norms and
linears, scaling pairs, the runner, the checkpoint, NaN inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.awq import awq_scales, output_sq_error, rtn_dequant, search_clip, search_scale
from lowbit.algorithms.smoothing import fold_scales, norm_offset
from lowbit.config import QuantConfig, WeightSpec
from lowbit.errors import LowbitError
from lowbit.export.checkpoint import quant_layers
from lowbit.models.arch import scaling_pairs
from lowbit.runner import capture_first_block_inputs
from tests.conftest import tiny_llama
from tests.test_export import needs_gptqmodel, wide_dir  # noqa: F401  (wide_dir: fixture)
from tests.test_runner import calib


def salient_layer(n=192, out=64, tokens=2048, seed=0):
    """A layer whose inputs have a few channels of much larger magnitude (as LLM
    activations do) and weights of ordinary size in those channels."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g)
    X[:, [5, 70, 130, 131]] *= torch.tensor([12.0, 20.0, 15.0, 9.0])
    W = torch.randn(out, n, generator=g) * 0.04
    return W, X


def test_search_scale_keeps_rtn_when_no_scale_helps():
    # inputs of equal magnitude in every channel: no channel is salient, and duo scaling's
    # candidates (which are not the identity even at alpha = 0) must not be forced on it
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(4)) * 0.05
    H = torch.eye(128)
    res = search_scale([W], [WeightSpec(bits=4, group_size=64)], H, torch.ones(128), duo=True)
    if res.alpha is None:
        assert torch.equal(res.s, torch.ones(128))
    assert min([res.rtn_error, *res.errors]) == pytest.approx(output_sq_error(W - rtn_dequant(W, WeightSpec(bits=4, group_size=64), res.s if res.alpha is not None else None), H), rel=1e-5)


def test_weight_group_mean_is_relative_to_each_group():
    from lowbit.algorithms.awq import weight_group_mean

    W = torch.tensor([[1.0, -2.0, 0.0, 4.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
    # groups of 2: (1, -2) -> (0.5, 1); (0, 4) -> (0, 1); ragged (0.5) -> 1; the zero row adds 0s
    got = weight_group_mean([W], [WeightSpec(bits=4, group_size=2)])
    assert torch.allclose(got, torch.tensor([0.25, 0.5, 0.0, 0.5, 0.5]))


def test_awq_scales_are_normalized_and_safe_for_dead_channels():
    m = torch.tensor([0.0, 1e-9, 0.5, 2.0, 8.0])
    s = awq_scales(m, 0.5)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(awq_scales(m, 0.0), torch.ones(5))
    assert torch.equal(awq_scales(torch.zeros(4), 0.7), torch.ones(4))  # all-zero inputs


@pytest.mark.parametrize("duo", [False, True], ids=["x", "duo"])
@pytest.mark.parametrize("spec", [WeightSpec(bits=4, group_size=64, symmetric=False), WeightSpec(bits=3, group_size=64)])
def test_awq_scaling_beats_rtn_on_salient_channels(spec, duo):
    W, X = salient_layer()
    H = X.T @ X
    res = search_scale([W], [spec], H, X.abs().mean(0), duo=duo)
    rtn = output_sq_error(W - rtn_dequant(W, spec), H)
    assert res.rtn_error == pytest.approx(rtn, rel=1e-4)
    if not duo:
        assert res.errors[0] == pytest.approx(rtn, rel=1e-4)  # alpha = 0 is plain RTN
    assert res.alpha is not None and min(res.errors) < 0.7 * rtn
    # the Gram-matrix loss is the error of the layer output itself: X W^T vs (X/s) Q(W s)^T
    Q = rtn_dequant(W * res.s, spec, None)
    direct = float(((X @ W.T) - (X / res.s) @ Q.T).pow(2).sum())
    assert min(res.errors) == pytest.approx(direct, rel=1e-3)


def test_clip_search_is_never_worse_than_min_max_and_helps_heavy_tails():
    g = torch.Generator().manual_seed(1)
    W = torch.distributions.StudentT(2.5).sample((48, 160)) * 0.02  # heavy-tailed weights
    X = torch.randn(1024, 160, generator=g)
    H = X.T @ X
    spec = WeightSpec(bits=3, group_size=64, symmetric=False)  # 160 = 64 + 64 + 32: ragged
    res = search_clip(W, H, spec)
    from lowbit.formats.weights import quantize_weight

    clipped = quantize_weight(W, spec, qparams=(res.scale, res.zero)).dequantize()
    plain = rtn_dequant(W, spec)
    assert (res.ratio <= 1).all() and (res.ratio > 0.5).all() and (res.ratio < 1).any()
    # per (row, group): the group's share of the output error never grows
    for lo, hi in ((0, 64), (64, 128), (128, 160)):
        Hg = H[lo:hi, lo:hi]
        e = lambda Wh: ((W - Wh)[:, lo:hi] @ Hg * (W - Wh)[:, lo:hi]).sum(1)  # noqa: E731
        assert (e(clipped) <= e(plain) * (1 + 1e-5) + 1e-9).all()
    assert output_sq_error(W - clipped, H) < 0.9 * output_sq_error(W - plain, H)


class GemmaStyleNorm(nn.Module):
    """y = normalize(x) * (1 + weight), the offset form Gemma's RMSNorm uses."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) - 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def test_folding_is_exact_for_norms_and_linears():
    torch.manual_seed(0)
    s = torch.rand(32) * 4 + 0.1
    x = torch.randn(10, 32)
    for norm, c in ((nn.LayerNorm(32), 0.0), (nn.RMSNorm(32), 0.0), (GemmaStyleNorm(32), 1.0)):
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            if getattr(norm, "bias", None) is not None:
                norm.bias.uniform_(-0.2, 0.2)
        block = nn.ModuleDict({"norm": norm, "lin": nn.Linear(32, 8)})
        assert norm_offset(norm) == c
        with torch.no_grad():
            before = block["lin"](block["norm"](x))
            fold_scales(block, "norm", ["lin"], s)
            after = block["lin"](block["norm"](x))
        assert torch.allclose(before, after, atol=1e-5), type(norm).__name__

    class NotAffine(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(32))

        def forward(self, x):
            return torch.tanh(x * self.weight)

    with pytest.raises(LowbitError, match="cannot fold"):
        fold_scales(nn.ModuleDict({"n": NotAffine(), "lin": nn.Linear(32, 8)}), "n", ["lin"], s)
    with pytest.raises(LowbitError, match="positive"):
        fold_scales(nn.ModuleDict({"n": nn.RMSNorm(32), "lin": nn.Linear(32, 8)}), "n", ["lin"], torch.zeros(32))


def test_scaling_pairs_follow_the_llama_block():
    from transformers import LlamaForCausalLM

    gqa = tiny_llama(64)  # 4 query heads, 2 kv heads: v_proj's 48 outputs feed o_proj's 96 inputs
    cfg = gqa.config
    cfg.num_key_value_heads = 4
    torch.manual_seed(1)
    mha = LlamaForCausalLM(cfg).eval()
    mlp = [("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]), ("mlp.up_proj", ["mlp.down_proj"])]
    qkv = [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])]
    assert scaling_pairs(gqa.model.layers[0]) == qkv + mlp
    assert scaling_pairs(mha.model.layers[0]) == qkv + [("self_attn.v_proj", ["self_attn.o_proj"])] + mlp
    assert scaling_pairs(nn.Sequential(nn.Linear(4, 4))) == []
    # folding random scales into every pair leaves the block's function unchanged
    block = mha.model.layers[0]
    windows = calib(64, n=2, length=16)
    inputs = capture_first_block_inputs(mha, block, windows)
    with torch.no_grad():
        before = block(inputs.hidden, **inputs.kwargs)
        before = before[0] if isinstance(before, tuple) else before
        g = torch.Generator().manual_seed(3)
        for prev, names in scaling_pairs(block):
            n = block.get_submodule(names[0]).in_features
            fold_scales(block, prev, names, torch.rand(n, generator=g) * 3 + 0.2)
        after = block(inputs.hidden, **inputs.kwargs)
        after = after[0] if isinstance(after, tuple) else after
    assert torch.allclose(before, after, atol=1e-5 * float(before.abs().max()))


def test_awq_in_the_runner_and_checkpoint(tiny_dir, tmp_path):
    spec = WeightSpec(bits=3, group_size=32, symmetric=False)
    model, tok, info = lowbit.load(str(tiny_dir))
    windows = calib(len(tok), n=6, length=48)
    with torch.no_grad():
        fp = model(input_ids=windows).logits
    awq_cfg = QuantConfig(method="awq", weight=spec, calib_precision="fp32")
    report = lowbit.quantize(model, awq_cfg, windows, progress=False)
    assert len(quant_layers(model)) == 14
    for r in report.layers:
        assert ("clip_ratio_mean" in r) == (not r["layer"].endswith(("q_proj", "k_proj")))
    assert sum(r["output_rel_error"] for r in report.layers) < 0.95 * sum(r["rtn_output_rel_error"] for r in report.layers)
    assert any((r.get("awq_alpha") or 0) > 0 for r in report.layers)
    rtn, _, _ = lowbit.load(str(tiny_dir))
    lowbit.quantize(rtn, QuantConfig(method="rtn", weight=spec), progress=False)
    with torch.no_grad():
        q, r = model(input_ids=windows).logits, rtn(input_ids=windows).logits
    err = lambda y: float((y - fp).norm() / fp.norm())  # noqa: E731
    assert err(q) < err(r)
    out = lowbit.save(model, tok, tmp_path / "ckpt", report, source=info["source"])
    again, _, _ = lowbit.load(str(out))
    with torch.no_grad():
        assert torch.equal(again(input_ids=windows).logits, q)


def test_nan_calibration_inputs_name_the_layer(tiny_dir):
    model, tok, _ = lowbit.load(str(tiny_dir))
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[4] = math.nan
    with pytest.raises(LowbitError, match=r"model\.layers\.1\.mlp\.gate_proj: its calibration inputs have NaN"):
        lowbit.quantize(model, QuantConfig(method="awq", weight=WeightSpec(bits=4, group_size=32)), calib(len(tok), n=2, length=16), progress=False)


def test_awq_options_are_validated():
    with pytest.raises(LowbitError, match="max_shrink"):
        lowbit.make_algorithm(QuantConfig(method="awq", options={"max_shrink": 1.5}))
    with pytest.raises(LowbitError, match="no option"):
        lowbit.make_algorithm(QuantConfig(method="awq", options={"alpha": 0.5}))


# --- export: the AWQ GEMM layout and compressed-tensors ---------------------------------


def awq_model(folder, spec=WeightSpec(bits=4, group_size=32, symmetric=False, scale_dtype="float16")):
    model, tok, _ = lowbit.load(str(folder))
    lowbit.quantize(model, QuantConfig(method="awq", weight=spec, calib_precision="fp32"), calib(len(tok), n=4, length=32), progress=False)
    return model, tok


def test_awq_4bit_packing_follows_the_gemm_interleave():
    from lowbit.export.awq import pack_awq, unpack_awq

    codes = torch.arange(16, dtype=torch.uint8).reshape(1, 16) % 16  # column j holds value j
    words = pack_awq(codes, 4)
    # word 0 holds columns 0..7 with nibble k = column (0, 2, 4, 6, 1, 3, 5, 7)[k]
    nibbles = [(int(words[0, 0]) >> (4 * k)) & 0xF for k in range(8)]
    assert nibbles == [0, 2, 4, 6, 1, 3, 5, 7]
    assert [(int(words[0, 1]) >> (4 * k)) & 0xF for k in range(8)] == [8, 10, 12, 14, 9, 11, 13, 15]
    g = torch.Generator().manual_seed(0)
    for bits in (3, 4, 8):
        c = torch.randint(0, 2**bits, (5, 64), generator=g, dtype=torch.uint8)
        assert torch.equal(unpack_awq(pack_awq(c, bits), bits, 64), c)


def decode_awq(tensors: dict, name: str, bits: int, gs: int, in_f: int, out_f: int) -> torch.Tensor:
    """The weight as an AWQ GEMM loader computes it, written from the format's description:
    4-bit words of 8 output columns in the order (0, 2, 4, 6, 1, 3, 5, 7)."""
    order = (0, 2, 4, 6, 1, 3, 5, 7)

    def fields(words, n):
        w = words.to(torch.int64) & 0xFFFFFFFF
        out = torch.zeros(w.shape[0], n, dtype=torch.int64)
        for col in range(n):
            word, k = divmod(col, 8)
            nib = order.index(k)
            out[:, col] = (w[:, word] >> (4 * nib)) & 0xF
        return out

    assert bits == 4
    q = fields(tensors[f"{name}.qweight"], out_f)  # [in, out]
    z = fields(tensors[f"{name}.qzeros"], out_f)  # [G, out]
    s = tensors[f"{name}.scales"].float()
    g = torch.arange(in_f) // gs
    return ((q - z[g]).float() * s[g]).T


def test_awq_export_decodes_to_lowbit_weights(wide_dir, tmp_path):
    import json

    from safetensors.torch import load_file

    from lowbit.export.awq import export_awq

    model, tok = awq_model(wide_dir)
    out = export_awq(model, tok, tmp_path / "awq")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "awq" and cfg["version"] == "gemm" and cfg["bits"] == 4 and cfg["group_size"] == 32
    tensors = load_file(str(out / "model.safetensors"))
    layers = quant_layers(model)
    assert len(layers) == 14
    for name, m in layers.items():
        assert tensors[f"{name}.qweight"].shape == (m.in_features, m.out_features // 8)
        assert torch.equal(decode_awq(tensors, name, 4, 32, m.in_features, m.out_features), m.dequantized_weight()), name
        assert f"{name}.weight" not in tensors
    with pytest.raises(LowbitError, match="not exactly representable in float16"):
        export_awq(*awq_model(wide_dir, WeightSpec(bits=4, group_size=32, symmetric=False, scale_dtype="float32")), tmp_path / "x")


def test_awq_model_loads_in_transformers_as_compressed_tensors(wide_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from lowbit.export.compressed_tensors import export_compressed_tensors

    model, tok = awq_model(wide_dir)
    out = export_compressed_tensors(model, tok, tmp_path / "ct")
    # asymmetric pack-quantized loads through dequantize=True (see the exporter's notes),
    # which dequantizes in the scale dtype: lowbit's weights rounded to float16
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, m in quant_layers(model).items():
        assert torch.equal(hf.get_submodule(name).weight, m.dequantized_weight().half().float()), name
    ids = calib(len(tok), n=1, length=24)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(input_ids=ids).logits, atol=2e-3, rtol=0)


@needs_gptqmodel
def test_awq_export_loads_in_gptqmodel(wide_dir, tmp_path):
    from lowbit.export.awq import export_awq
    from tests.test_export import load_in_gptqmodel

    model, tok = awq_model(wide_dir)
    out = export_awq(model, tok, tmp_path / "awq")
    ids = calib(len(tok), n=1, length=24)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    theirs = load_in_gptqmodel(out, ids, names, tmp_path)
    for name in names:
        assert torch.equal(theirs[name], model.get_submodule(name).dequantized_weight().half().float()), name
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(theirs["logits"], ours, atol=2e-2, rtol=0)
