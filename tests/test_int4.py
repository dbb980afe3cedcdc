"""The packed int4 kernel (lowbit.nn.int4) against its plain reference and the reference path."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.config import ActSpec, QuantConfig, WeightSpec
from lowbit.errors import LowbitError
from lowbit.export.checkpoint import quant_layers
from lowbit.formats.weights import quantize_weight
from lowbit.nn import QuantLinear, set_kernel, use_kernel
from lowbit.nn.int4 import int4_matmul, int4_reference, prepare_weight
from tests.test_runner import calib

# (bits, group size, symmetric, in, out): ragged last groups, widths 32 does not divide,
# per-channel, output widths 16 does not divide, 3- and 2-bit codes
LAYOUTS = {
    "w4-g64-asym": (4, 64, False, 576, 96),
    "w4-g128-asym-ragged": (4, 128, False, 576, 64),
    "w4-g64-sym": (4, 64, True, 192, 48),
    "w4-g32-odd-width": (4, 32, False, 150, 70),
    "w4-g48": (4, 48, False, 144, 32),
    "w4-channel": (4, None, False, 200, 40),
    "w3-g64-asym": (3, 64, False, 256, 32),
    "w2-g64-sym": (2, 64, True, 130, 17),
}


def _weight(bits, gs, sym, n_in, n_out, seed=0, act_order=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g)
    w[:, 5] *= 10  # an outlier column
    spec = WeightSpec(bits=bits, group_size=gs, symmetric=sym)
    g_idx = None
    if act_order and gs is not None:
        perm = torch.randperm(n_in, generator=g)
        g_idx = torch.empty(n_in, dtype=torch.int32)
        g_idx[perm] = (torch.arange(n_in) // gs).to(torch.int32)
    return w, spec, quantize_weight(w, spec, g_idx=g_idx)


def _x(n_in, tokens=5, seed=1):
    return torch.randn(tokens, n_in, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("act_order", [False, True])
def test_kernel_matches_its_plain_reference(name, act_order):
    bits, gs, sym, n_in, n_out = LAYOUTS[name]
    _, _, q = _weight(bits, gs, sym, n_in, n_out, act_order=act_order)
    x = _x(n_in)
    got = int4_matmul(x, prepare_weight(q)).double()
    ref = int4_reference(x, q)
    assert got.shape == (5, n_out)
    # bfloat16 output (8 significant bits) and float32 accumulation in the kernel
    tol = 2**-7 * ref.abs() + 1e-3 * float(ref.abs().max())
    assert bool(((got - ref).abs() <= tol).all()), float((got - ref).abs().max())


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_kernel_matches_the_reference_path_to_bfloat16_rounding(name):
    bits, gs, sym, n_in, n_out = LAYOUTS[name]
    torch.manual_seed(0)
    lin = torch.nn.Linear(n_in, n_out)
    spec = WeightSpec(bits=bits, group_size=gs, symmetric=sym)
    m = QuantLinear.from_linear(lin, quantize_weight(lin.weight, spec), spec)
    x = _x(n_in).reshape(1, 5, n_in)
    ref = m(x)
    with use_kernel(m, "int4") as switched:
        assert switched == [""]
        got = m(x)
    assert m.kernel == "reference" and m._int4 is None
    assert got.dtype == torch.float32 and got.shape == ref.shape
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 5e-3, rel  # 0.3% measured on every layout: bfloat16 rounding


def test_packed_weight_is_half_a_byte_per_weight():
    _, _, q = _weight(4, 64, False, 576, 1536)
    w = prepare_weight(q)
    assert w.packed.dtype == torch.uint8 and w.packed.numel() == 576 * 1536 // 2
    assert w.order is None  # contiguous groups that 64 divides need no gather
    # two bfloat16 numbers (scale, offset) per group of 64: 4.5 bits per weight in all
    assert w.nbytes() * 8 / (576 * 1536) == pytest.approx(4.5)


def test_unsupported_weights_stay_on_the_reference_path():
    model = torch.nn.Sequential(
        QuantLinear.from_linear(torch.nn.Linear(64, 32), *_q8(64, 32)),
        QuantLinear.from_linear(torch.nn.Linear(64, 32), quantize_weight(torch.randn(32, 64), WeightSpec(bits=4)), WeightSpec(bits=4)),
    )
    assert set_kernel(model, "int4") == ["1"]
    assert "8 bits" in model[0].int4_unsupported() and model[0].kernel == "reference"
    with pytest.raises(LowbitError, match="no layer can use the int4 kernel"):
        set_kernel(model[:1], "int4")


def _q8(n_in, n_out):
    spec = WeightSpec(bits=8, group_size=None)
    return quantize_weight(torch.randn(n_out, n_in), spec), spec


def test_dropping_codes_keeps_the_output_and_frees_the_unpacked_buffers():
    spec = WeightSpec(bits=4, group_size=32, symmetric=False)
    lin = torch.nn.Linear(96, 48)
    m = QuantLinear.from_linear(lin, quantize_weight(lin.weight, spec), spec, ActSpec(bits=8))
    x = _x(96)
    set_kernel(m, "int4")
    before = m(x)
    set_kernel(m, "int4", keep_codes=False)
    assert m.packed_only and "codes" not in dict(m.named_buffers())
    assert torch.equal(m(x), before)  # activations still rounded as on the reference path
    with pytest.raises(LowbitError, match="keeps only its packed int4 weights"):
        set_kernel(m, "reference")
    with pytest.raises(LowbitError, match="packed int4 weights"):
        m.dequantized_weight()


def test_a_checkpoint_loads_packed_and_generates_like_the_reference(tiny_dir, tmp_path):
    model, tok, info = lowbit.load(str(tiny_dir))
    cfg = QuantConfig(method="rtn", weight=WeightSpec(bits=4, group_size=32, symmetric=False))
    report = lowbit.quantize(model, cfg, progress=False)
    out = lowbit.save(model, tok, tmp_path / "ckpt", report, source=info["source"])
    ids = calib(len(tok), n=1, length=12)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    packed, _, info2 = lowbit.load(str(out), kernel="int4")
    assert info2["kernel"] == "int4"
    layers = quant_layers(packed)
    assert layers and all(m.kernel == "int4" and m.packed_only for m in layers.values())
    with torch.no_grad():
        got = packed(input_ids=ids).logits
    assert float((got - ref).norm() / ref.norm()) < 2e-2
    # greedy generation with the KV cache runs on the packed layers
    gen = packed.generate(ids[:, :4], max_new_tokens=5, do_sample=False, attention_mask=torch.ones(1, 4, dtype=torch.long))
    assert gen.shape == (1, 9)
    with pytest.raises(LowbitError, match="unknown kernel"):
        lowbit.load(str(out), kernel="cuda")


@pytest.mark.parametrize("fmt", ["ternary", "bitnet", "bitnet158"])
def test_affine_formats_run_on_the_int4_kernel(fmt):
    from lowbit.formats.names import round_to_nearest

    spec = WeightSpec(format=fmt, group_size=None if fmt.startswith("bitnet") else 64)
    lin = torch.nn.Linear(192, 48)
    enc = round_to_nearest(lin.weight.detach(), spec)
    m = QuantLinear.from_linear(lin, enc, spec)
    x = _x(192)
    ref = m(x)
    got64 = int4_matmul(x, prepare_weight(enc)).double()
    plain = int4_reference(x, enc)
    assert bool(((got64 - plain).abs() <= 2**-7 * plain.abs() + 1e-3 * float(plain.abs().max())).all())
    # the kernel's reference decodes the same levels as the format itself
    assert torch.allclose(int4_reference(torch.eye(192), enc).t().float(), enc.dequantize(), rtol=2**-7, atol=1e-6)
    set_kernel(m, "int4", keep_codes=False)
    assert m.packed_only and m.encoded is None
    assert float((m(x) - ref).norm() / ref.norm()) < 5e-3


def test_formats_without_affine_levels_say_why():
    spec = WeightSpec(format="nf4", group_size=64)
    from lowbit.formats.names import round_to_nearest

    lin = torch.nn.Linear(128, 32)
    m = QuantLinear.from_linear(lin, round_to_nearest(lin.weight.detach(), spec), spec)
    assert "not affine" in m.int4_unsupported()
