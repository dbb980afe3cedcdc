"""Number formats, integer grids, packing and byte accounting: pure tensor tests."""

import math

import pytest
import torch

from lowbit.config import WeightSpec
from lowbit.errors import LowbitError
from lowbit.formats import floats, packing
from lowbit.formats.integer import (
    IntGrid,
    absmax_quantize,
    dequantize,
    error_metrics,
    fake_quantize,
    qparams_from_range,
    quantize,
    zeropoint_dequantize,
    zeropoint_quantize,
)
from lowbit.formats.memory import format_bits, human_bytes, model_bytes, parse_count, weight_storage

# --- the guide's worked examples -----------------------------------------------------------


def test_absmax_int8_guide_example():
    # absmax is 10.8: s = 127 / 10.8; 3.08 and 3.02 both land on 36, as the guide shows
    x = torch.tensor([10.8, -7.59, 3.08, 3.02, 0.0, -10.8])
    q, s = absmax_quantize(x, bits=8)
    assert s == pytest.approx(127 / 10.8, rel=1e-6)
    assert q.tolist() == [127, -89, 36, 36, 0, -127]
    err = (q.float() / s - x).abs()
    assert float(err.max()) <= 0.5 / s + 1e-6  # at most half a step


def test_zeropoint_int8_guide_example():
    # range [-7.59, 10.8]: s = 255 / 18.39, z = round(-s * -7.59) - 128 = -23
    x = torch.tensor([-7.59, 10.8, 0.0, 2.5, -3.1])
    q, s, z = zeropoint_quantize(x, bits=8)
    assert s == pytest.approx(255 / 18.39, rel=1e-5)
    assert z == -23
    assert q[0] == -128 and q[1] == 127  # min and max land on the ends of INT8
    assert q[2] == z  # zero is exactly representable: it maps to the zero point
    back = zeropoint_dequantize(q, s, z)
    assert float((back - x).abs().max()) <= 0.5 / s + 1e-6


# --- grids and qparams ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric,restricted", [(True, False), (True, True), (False, False)])
def test_roundtrip_error_bounded_by_half_step(bits, symmetric, restricted):
    torch.manual_seed(bits)
    x = torch.randn(64, 128)
    grid = IntGrid(bits, symmetric, restricted)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    s, z = qparams_from_range(lo, hi, grid)
    q = quantize(x, s, z, grid)
    assert int(q.min()) >= grid.qmin and int(q.max()) <= grid.qmax
    err = (dequantize(q, s, z) - x).abs()
    # everything inside the representable range is within half a step; symmetric full
    # range clips +absmax by at most half a step as well
    assert bool((err <= 0.5 * s.float() + 1e-6).all())


def test_symmetric_conventions():
    x = torch.tensor([[-1.0, 0.6, 1.0]])
    full = IntGrid(4, symmetric=True)
    s, z = qparams_from_range(x.min(), x.max(), full)
    assert float(s) == pytest.approx(2 / 15)  # GPTQ / compressed-tensors: 2*absmax/(2^b - 1)
    assert float(z) == 8
    rest = IntGrid(4, symmetric=True, restricted=True)
    s, z = qparams_from_range(x.min(), x.max(), rest)
    assert float(s) == pytest.approx(1 / 7)
    q = quantize(x, s, z, rest)
    assert (q.int() - 8).tolist() == [[-7, 4, 7]]


def test_all_zero_group_has_unit_scale_and_exact_zero():
    x = torch.zeros(3, 8)
    for grid in (IntGrid(4), IntGrid(4, symmetric=False), IntGrid(8, restricted=True)):
        s, z = qparams_from_range(x.amin(1), x.amax(1), grid, torch.float16)
        assert torch.all(s == 1)
        assert torch.equal(fake_quantize(x, s[:, None], z[:, None], grid), x)


def test_constant_rows_are_exact_asymmetric():
    x = torch.tensor([[0.3] * 5, [-2.0] * 5, [7.0] * 5])
    grid = IntGrid(3, symmetric=False)
    s, z = qparams_from_range(x.amin(1, keepdim=True), x.amax(1, keepdim=True), grid, torch.float32)
    assert torch.allclose(fake_quantize(x, s, z, grid), x, rtol=1e-6)


def test_tiny_ranges_do_not_underflow_fp16_scales():
    x = torch.full((1, 4), 1e-9)
    s, z = qparams_from_range(x.amin(1), x.amax(1), IntGrid(4), torch.float16)
    assert float(s) > 0 and torch.isfinite(s).all()


def test_huge_range_with_fp16_scales_is_an_error():
    with pytest.raises(LowbitError, match="range too large"):
        qparams_from_range(torch.tensor(-1e9), torch.tensor(1e9), IntGrid(4), torch.float16)


def test_error_metrics():
    x = torch.tensor([1.0, 2.0, 3.0])
    m = error_metrics(x, x + torch.tensor([0.1, 0.0, -0.1]))
    assert m["mse"] == pytest.approx(0.02 / 3)
    assert m["max_abs"] == pytest.approx(0.1)
    assert error_metrics(x, x)["sqnr_db"] == math.inf


# --- float formats ----------------------------------------------------------------------------


def test_float_formats_range_and_precision():
    f32, f16, bf16 = (floats.float_format(n) for n in ("fp32", "fp16", "bf16"))
    assert (f32.bits, f16.bits, bf16.bits) == (32, 16, 16)
    assert f16.max == 65504.0
    assert bf16.max > 3e38 and f32.max > 3e38  # bf16 keeps fp32's exponent range
    assert f16.eps == 2**-10 and bf16.eps == 2**-7  # ...but far less precision
    x = torch.tensor([1.0 + 2**-9, 70000.0, 1e-8])
    assert floats.convert(x, "bf16")[0] == 1.0  # below bf16 resolution
    assert floats.convert(x, "fp16")[0] == 1.0 + 2**-9  # within fp16 resolution
    assert math.isinf(float(floats.convert(x, "fp16")[1]))  # fp16 overflows, bf16 does not
    assert math.isfinite(float(floats.convert(x, "bf16")[1]))
    with pytest.raises(LowbitError):
        floats.float_format("fp7")


# --- packing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 64, 577])
def test_pack_roundtrip_and_exact_bytes(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (5, n), generator=g, dtype=torch.uint8)
    ref = packing.pack_reference(codes, bits)
    assert ref.shape == (5, math.ceil(n * bits / 8))
    fast = packing.pack(codes, bits)
    assert torch.equal(fast, ref)  # the fast path writes the same bytes as the bit stream
    assert torch.equal(packing.unpack(fast, bits, n), codes)
    assert torch.equal(packing.unpack_reference(ref, bits, n), codes)


def test_pack_layout_is_little_endian_bit_stream():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    b = packing.pack(codes, 3)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes[0]))
    assert b[0].tolist() == list(stream.to_bytes(3, "little"))
    assert packing.pack(torch.tensor([[0x3, 0xA]], dtype=torch.uint8), 4).tolist() == [[0xA3]]


def test_pack_rejects_bad_input():
    with pytest.raises(LowbitError):
        packing.pack(torch.zeros(3, dtype=torch.int32), 4)
    with pytest.raises(LowbitError):
        packing.unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 8)


# --- byte accounting ---------------------------------------------------------------------------


def test_weight_storage_counts_every_byte():
    st = weight_storage(576, 1536, WeightSpec(bits=4, group_size=64))
    assert st.codes == 576 * 768
    assert st.scales == 576 * 24 * 2
    assert st.zeros == 0
    assert st.bits_per_weight == pytest.approx(4 + 16 / 64)
    asym = weight_storage(576, 1536, WeightSpec(bits=4, group_size=64, symmetric=False))
    assert asym.zeros == 576 * 12  # 24 four-bit zero points per row
    assert asym.bits_per_weight == pytest.approx(4 + 16 / 64 + 4 / 64)
    three = weight_storage(10, 576, WeightSpec(bits=3, group_size=128))  # ragged: 5 groups
    assert three.codes == 10 * 216 and three.scales == 10 * 5 * 2


def test_seed_memory_example_70b_fp32_is_280gb():
    n = parse_count("70B")
    assert n == 70_000_000_000
    assert model_bytes(n, "fp32") == 280e9
    assert human_bytes(model_bytes(n, "fp32")) == "280.00 GB"
    assert model_bytes(n, "fp16") == 140e9
    assert format_bits("int4-g64") == 4.25
    with pytest.raises(LowbitError):
        parse_count("seventy")
    with pytest.raises(LowbitError):
        format_bits("int9")
