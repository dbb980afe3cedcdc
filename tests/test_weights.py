"""Group-wise weight quantization: granularities, ragged and permuted groups, edge cases."""

import pytest
import torch

from lowbit.config import ActSpec, QuantConfig, WeightSpec
from lowbit.errors import LowbitError
from lowbit.formats.activations import fake_quantize_act
from lowbit.formats.integer import dequantize, quantize
from lowbit.formats.weights import default_g_idx, grid_of, group_range, group_sum, mse_qparams, mse_qparams_reference, quantize_weight


def rtn_reference(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Slow, obvious RTN: loop over rows and groups, quantize each slice on its own."""
    out = torch.empty_like(w)
    gs = spec.group_size or w.shape[1]
    qmax = 2**spec.bits - 1
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], gs):
            v = w[r, c0 : c0 + gs]
            if spec.symmetric:
                scale = float(v.abs().max()) / (qmax / 2)
                scale = scale if scale > 0 else 1.0
                scale = float(torch.tensor(scale).to(torch.float16))
                q = torch.clamp(torch.round(v / scale) + 2 ** (spec.bits - 1), 0, qmax)
                out[r, c0 : c0 + gs] = (q - 2 ** (spec.bits - 1)) * scale
            else:
                lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
                scale = (hi - lo) / qmax if hi > lo else 1.0
                scale = float(torch.tensor(scale).to(torch.float16))
                z = min(max(round(-lo / scale), 0), qmax)
                q = torch.clamp(torch.round(v / scale) + z, 0, qmax)
                out[r, c0 : c0 + gs] = (q - z) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32, 64, 100])
@pytest.mark.parametrize("symmetric", [True, False])
def test_vectorized_rtn_equals_slow_reference(bits, group_size, symmetric):
    torch.manual_seed(0)
    w = torch.randn(12, 200)  # 200 is not a multiple of 32, 64 or 100*3: ragged last groups
    spec = WeightSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    qw = quantize_weight(w, spec)
    assert torch.allclose(qw.dequantize(), rtn_reference(w, spec), atol=1e-6)
    n_groups = 1 if group_size is None else -(-200 // group_size)
    assert qw.scale.shape == (12, n_groups) and qw.scale.dtype == torch.float16


def test_more_bits_less_error_and_groups_help():
    torch.manual_seed(1)
    w = torch.randn(64, 256) * torch.logspace(-1, 1, 256)  # columns of very different scale
    errs = [(quantize_weight(w, WeightSpec(bits=b)).dequantize() - w).pow(2).mean() for b in (2, 3, 4, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    per_channel = (quantize_weight(w, WeightSpec(bits=4, group_size=None)).dequantize() - w).pow(2).mean()
    assert errs[2] < per_channel


def test_all_zero_groups_and_constant_rows():
    w = torch.randn(4, 128)
    w[0, :64] = 0  # an all-zero group
    w[1] = 0.25  # a constant row
    w[2] = 0  # an all-zero row
    for sym in (True, False):
        qw = quantize_weight(w, WeightSpec(bits=4, group_size=64, symmetric=sym))
        d = qw.dequantize()
        assert torch.isfinite(d).all()
        assert torch.all(d[0, :64] == 0) and torch.all(d[2] == 0)
        if sym:  # the full-range symmetric grid clips +absmax by half a step (GPTQ's convention)
            assert torch.allclose(d[1], w[1] * 7 / 7.5, rtol=1e-3)
        else:  # asymmetric grids hold a constant row exactly
            assert torch.allclose(d[1], w[1], rtol=1e-3)


def test_nan_or_inf_weights_are_refused_with_the_layer_name():
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    w[2, 5] = float("inf")
    with pytest.raises(LowbitError, match=r"layer blocks.0.q_proj has 2 NaN/inf weights"):
        quantize_weight(w, WeightSpec(), name="blocks.0.q_proj")


def test_group_size_checks():
    w = torch.randn(4, 96)
    qw = quantize_weight(w, WeightSpec(group_size=64))  # 96 = 64 + 32: narrower last group
    assert qw.scale.shape == (4, 2)
    with pytest.raises(LowbitError, match="does not divide the input width 96 of layer up"):
        quantize_weight(w, WeightSpec(group_size=64, strict_groups=True), name="up")
    with pytest.raises(LowbitError, match="larger than the input width"):
        quantize_weight(w, WeightSpec(group_size=128), name="up")


def test_permuted_g_idx_quantizes_the_same_groups():
    torch.manual_seed(2)
    w = torch.randn(8, 128)
    perm = torch.randperm(128)
    spec = WeightSpec(bits=3, group_size=32)
    plain = quantize_weight(w[:, perm], spec).dequantize()
    g_idx = torch.empty(128, dtype=torch.int32)
    g_idx[perm] = default_g_idx(128, 32)  # column perm[j] belongs to group j // 32
    permuted = quantize_weight(w, spec, g_idx=g_idx)
    assert torch.allclose(permuted.dequantize()[:, perm], plain)
    assert not permuted.has_trivial_g_idx()


def test_group_range_matches_loops():
    w = torch.randn(3, 10)
    g = torch.tensor([0, 0, 1, 2, 1, 2, 2, 0, 1, 1])
    lo, hi = group_range(w, g, 3)
    for r in range(3):
        for k in range(3):
            assert lo[r, k] == w[r, g == k].min() and hi[r, k] == w[r, g == k].max()


def test_mse_observer_never_worse_than_minmax():
    torch.manual_seed(3)
    w = torch.randn(32, 128)
    w[:, 7] *= 12  # an outlier column
    mm = (quantize_weight(w, WeightSpec(bits=3)).dequantize() - w).pow(2).sum(1)
    ms = (quantize_weight(w, WeightSpec(bits=3, observer="mse")).dequantize() - w).pow(2).sum(1)
    assert bool((ms <= mm + 1e-6).all()) and float(ms.sum()) < float(mm.sum())


def _group_sq_error(w, scale, zero, grid, g_idx, n_groups):
    g = g_idx.long()
    s, z = scale.float()[:, g], zero[:, g]
    return group_sum((dequantize(quantize(w, s, z, grid), s, z) - w).pow(2), g_idx, n_groups)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("permuted", [True, False])
def test_grouped_mse_search_matches_the_plain_loop(symmetric, permuted):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 100, generator=g)
    w[3, 7] = 25.0  # an outlier worth clipping around
    w[5] = 0.0  # all-zero groups
    g_idx = default_g_idx(100, 32)  # ragged: the last group has 4 columns
    if permuted:
        g_idx = g_idx[torch.randperm(100, generator=g)]
    spec = WeightSpec(bits=3, group_size=32, symmetric=symmetric)
    grid = grid_of(spec)
    lo, hi = group_range(w, g_idx, 4)
    args = (w, lo, hi, grid, torch.float16, g_idx, 4)
    fast, ref = mse_qparams(*args), mse_qparams_reference(*args)
    e_fast = _group_sq_error(w, *fast, grid, g_idx, 4)
    e_ref = _group_sq_error(w, *ref, grid, g_idx, 4)
    # sums in another order may break an exact tie differently, never miss the minimum
    assert torch.allclose(e_fast, e_ref, rtol=1e-5, atol=1e-7)
    assert (fast[0] == ref[0]).float().mean() > 0.9


def test_activation_fake_quant_granularities():
    torch.manual_seed(4)
    x = torch.randn(2, 5, 96)
    x[..., 3] += 40  # a one-sided outlier channel
    errs = {}
    for name, spec in {
        "token-sym": ActSpec(symmetric=True),
        "token-asym": ActSpec(),
        "token-g32": ActSpec(group_size=32),
        "tensor": ActSpec(granularity="tensor"),
    }.items():
        y = fake_quantize_act(x, spec)
        assert y.shape == x.shape
        errs[name] = float((y - x).pow(2).mean())
    assert errs["token-g32"] < errs["token-asym"] < errs["token-sym"]
    assert errs["token-asym"] <= errs["tensor"]
    # groups that do not divide the width: the tail group is handled, not dropped
    y = fake_quantize_act(x[..., :90], ActSpec(group_size=32))
    assert y.shape == (2, 5, 90) and float((y - x[..., :90]).abs().max()) < 0.5


def test_config_validation_and_overrides():
    with pytest.raises(LowbitError, match="weight bits"):
        WeightSpec(bits=9)
    with pytest.raises(LowbitError, match="weight bits"):
        WeightSpec(bits=1)
    with pytest.raises(LowbitError, match="group size"):
        WeightSpec(group_size=0)
    with pytest.raises(LowbitError, match="static"):
        ActSpec(dynamic=False)
    cfg = QuantConfig(weight=WeightSpec(bits=4), ignore=("*.k_proj",), overrides={"*.down_proj": {"bits": 8}})
    assert cfg.weight_spec_for("model.layers.0.mlp.down_proj").bits == 8
    assert cfg.weight_spec_for("model.layers.0.mlp.up_proj").bits == 4
    assert cfg.weight_spec_for("model.layers.0.self_attn.k_proj") is None
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(LowbitError, match="override .* has no field bitz"):
        QuantConfig(overrides={"*": {"bitz": 3}})
    with pytest.raises(LowbitError, match="weight bits"):
        QuantConfig(overrides={"*": {"bits": 12}})
