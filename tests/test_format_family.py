"""The weight-format family (lowbit.formats.base): every format on seeded layers.

Per format: pack then unpack returns the same codes and parameters, decoding is exact,
the bits accounting equals the bytes of the stored tensors, encode picks the nearest
representable value; edge cases (all-zero groups, constant rows, ragged widths, NaN)."""

import pytest
import torch
from safetensors.torch import save_file

from lowbit.config import WeightSpec
from lowbit.errors import LowbitError
from lowbit.export.inspect import safetensors_header
from lowbit.formats.affine import AffineInt
from lowbit.formats.base import GroupLayout, make_format, quantize_matrix
from lowbit.formats.memory import weight_storage
from lowbit.formats.weights import quantize_weight

FORMATS = [
    ("int", {"bits": 4, "symmetric": False}),
    ("int", {"bits": 3, "symmetric": True, "observer": "mse"}),
    ("nf4", {}),
    ("nf4", {"double_quant": True}),
    ("fp4", {}),
    ("fp4", {"double_quant": True}),
    ("ternary", {}),
    ("ternary", {"packing": "tq1"}),
    ("bcq", {"bits": 1}),
    ("bcq", {"bits": 3}),
    ("bcq", {"bits": 4, "offset": True}),
    ("codebook", {"bits": 2}),
    ("codebook", {"bits": 4, "group_size": 32}),
    ("codebook-col", {"bits": 3}),
    ("mixed", {}),
    ("mixed", {"choices": (2, 3, 4), "group_size": 32}),
    ("claq", {"bits": 2, "high": 4, "share_high": 0.1}),
    ("bitnet", {}),
    ("bitnet", {"ternary": True}),
    ("billm", {}),
    ("billm", {"scale_dtype": "int8", "group_size": 64}),
]
IDS = [k + "".join(f"-{a}{b}" for a, b in kw.items()) for k, kw in FORMATS]


def layer(rows=24, cols=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3, :64] = 0.0  # an all-zero group
    w[5] = 0.02  # a constant row
    return w


@pytest.mark.parametrize("kind,kw", FORMATS, ids=IDS)
@pytest.mark.parametrize("cols", [256, 200])  # 200: the last group of each row is narrower
def test_pack_unpack_decode_bits(kind, kw, cols, tmp_path):
    fmt = make_format(kind, **kw)
    w = layer(cols=cols)
    enc = quantize_matrix(fmt, w)
    assert enc.codes.shape == w.shape and enc.codes.dtype == torch.uint8
    deq = enc.dequantize()
    assert torch.isfinite(deq).all()
    if not getattr(fmt, "shares_rows", False):  # a column codebook's groups are columns, across rows
        assert torch.equal(deq[3, :64], torch.zeros(64))  # an all-zero group decodes to exact zeros
    tensors = fmt.pack(enc)
    back = fmt.unpack({k: v.clone() for k, v in tensors.items()}, *w.shape, enc.g_idx)
    assert torch.equal(back.codes, enc.codes)
    stored = {k: v for k, v in enc.params.items() if k != "absmax_fit"}
    assert set(back.params) == set(stored)
    for k in stored:
        assert torch.equal(back.params[k], stored[k]), k
    assert torch.equal(back.dequantize(), deq)  # decoding the stored form is exact
    # decode is the level each code names
    layout = GroupLayout(enc.g_idx, next(iter(stored.values())).shape[1])
    lv = fmt.levels(back.params).expand(w.shape[0], -1, -1)  # column codebooks: one set for all rows
    assert torch.equal(layout.scatter(torch.gather(lv, 2, layout.gather(back.codes).long())), deq)
    # exact bits: the bytes the stored tensors occupy in a safetensors file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "w.safetensors"))
    header = safetensors_header(tmp_path / "w.safetensors")
    stored_bytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    assert fmt.nbytes(enc) == stored_bytes
    assert fmt.bits_per_weight(enc) == pytest.approx(8 * stored_bytes / w.numel())


# BiLLM's code follows the weight's class (salient column, which side of the break point),
# not the nearest of its levels: tests/test_billm.py checks its rule
# BitNet's 1-bit code is the side of the matrix mean, b1.58's divides by mean|W| + 1e-5
NEAREST = [(f, i) for f, i in zip(FORMATS, IDS) if not f[1].get("double_quant") and f[0] not in ("billm", "bitnet")]


@pytest.mark.parametrize("kind,kw", [f for f, _ in NEAREST], ids=[i for _, i in NEAREST])
def test_encode_is_nearest_representable(kind, kw):
    fmt = make_format(kind, **kw)
    w = layer(rows=8, cols=128, seed=1)
    enc = quantize_matrix(fmt, w)
    layout = GroupLayout(enc.g_idx, int(enc.g_idx.max()) + 1)
    wg = layout.gather(w)
    lv = fmt.levels(enc.params)
    best = (wg.unsqueeze(-1) - lv.unsqueeze(2)).abs().amin(-1)
    got = (wg - layout.gather(enc.dequantize())).abs()
    assert (got <= best + 1e-6 * (1 + wg.abs())).all()


@pytest.mark.parametrize("kind,kw", FORMATS, ids=IDS)
def test_nan_refused(kind, kw):
    w = layer()
    w[2, 7] = float("nan")
    with pytest.raises(LowbitError, match="layer blk.q has 1 NaN"):
        quantize_matrix(make_format(kind, **kw), w, name="blk.q")


def test_unknown_format_and_bad_fields():
    with pytest.raises(LowbitError, match="unknown weight format"):
        make_format("int17")
    with pytest.raises(LowbitError, match="bcq bits"):
        make_format("bcq", bits=5)
    with pytest.raises(LowbitError, match="ternary packing"):
        make_format("ternary", packing="3bit")
    with pytest.raises(LowbitError, match="format nf4"):
        make_format("nf4", blocks=3)


def test_unpack_refuses_missing_or_misshapen_tensors():
    fmt = make_format("bcq", bits=2)
    enc = quantize_matrix(fmt, layer())
    t = fmt.pack(enc)
    with pytest.raises(LowbitError, match="no tensor 'alpha'"):
        fmt.unpack({"qweight": t["qweight"]}, 24, 200, enc.g_idx)
    with pytest.raises(LowbitError, match="alpha has shape"):
        fmt.unpack({**t, "alpha": t["alpha"][:, :2]}, 24, 200, enc.g_idx)


# --- affine integers: today's results, unchanged -----------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        WeightSpec(bits=4, group_size=64, symmetric=False),
        WeightSpec(bits=3, group_size=64, symmetric=True),
        WeightSpec(bits=2, group_size=None, symmetric=False),
        WeightSpec(bits=8, group_size=128, symmetric=True, restricted=True),
        WeightSpec(bits=3, group_size=64, symmetric=False, observer="mse"),
        WeightSpec(bits=4, group_size=64, symmetric=True, scale_dtype="bfloat16", observer="mse"),
    ],
)
def test_affine_format_is_bit_identical_with_quantize_weight(spec):
    w = layer(cols=200)
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(3))
    for g_idx in (None, (torch.arange(200) // (spec.group_size or 200))[perm].int()):
        ref = quantize_weight(w, spec, g_idx=g_idx)
        fmt = AffineInt.from_spec(spec)
        enc = quantize_matrix(fmt, w, g_idx=g_idx)
        assert torch.equal(enc.codes, ref.codes)
        assert torch.equal(enc.params["scale"], ref.scale) and enc.params["scale"].dtype == ref.scale.dtype
        assert torch.equal(enc.params["zero"], ref.zero_points())
        assert torch.equal(enc.dequantize(), ref.dequantize())
        assert fmt.nbytes(enc) == weight_storage(*w.shape, spec).total  # the version-1 byte count


# --- per-format facts ------------------------------------------------------------------


def test_nf4_fp4_tables_and_ties():
    from lowbit.formats.normal_float import table

    nf4 = table("nf4")
    assert nf4[0] == -1 and nf4[7] == 0 and nf4[15] == 1 and torch.all(nf4[1:] > nf4[:-1])
    assert table("fp4").tolist() == pytest.approx([0, 1 / 192, 2 / 3, 1, 1 / 3, 0.5, 1 / 6, 0.25, 0, -1 / 192, -2 / 3, -1, -1 / 3, -0.5, -1 / 6, -0.25])
    fmt = make_format("nf4")
    mid = float((nf4[8] + nf4[9]) / 2)
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1], w[0, 2] = 1.0, mid, -1.0
    codes = quantize_matrix(fmt, w).codes[0]
    assert codes[0] == 15 and codes[2] == 0 and codes[3] == 7
    assert codes[1] == 8  # exactly on a midpoint: the lower value, as bitsandbytes' bucketize
    fp = quantize_matrix(make_format("fp4"), torch.tensor([[-1.0, 1.0, 0.5, -0.25] + [0.0] * 60])).codes[0]
    assert fp[:4].tolist() == [11, 3, 5, 15]


def test_nf4_bits_per_weight_exact():
    w = layer(rows=64, cols=256)
    assert make_format("nf4").bits_per_weight(quantize_matrix(make_format("nf4"), w)) == 4 + 32 / 64
    dq = make_format("nf4", double_quant=True)
    n_blocks = 64 * 256 // 64
    expect = 8 * (64 * 256 // 2 + n_blocks + 4 * (-(-n_blocks // 256)) + 4) / w.numel()
    assert dq.bits_per_weight(quantize_matrix(dq, w)) == pytest.approx(expect)


def test_double_quant_map_and_nested_constants():
    from lowbit.formats.normal_float import dequantize_dynamic_blockwise, dynamic_map, quantize_dynamic_blockwise

    m = dynamic_map()
    assert m.numel() == 256 and torch.all(m[1:] >= m[:-1]) and m[-1] == 1 and (m == 0).any()
    a = torch.randn(1000, generator=torch.Generator().manual_seed(0)).abs() * 0.1
    a = a - a.mean()
    q, amax = quantize_dynamic_blockwise(a)
    assert q.dtype == torch.uint8 and amax.shape == (4,)
    back = dequantize_dynamic_blockwise(q, amax)
    # each value lands on its nearest map entry, up to the 65,536-bin table's resolution
    scale = amax.repeat_interleave(256)[:1000]
    nearest = (m[(a / scale).unsqueeze(-1).sub(m).abs().argmin(-1)] * scale)
    assert ((back - a).abs() <= (nearest - a).abs() + scale * 2 / 65535 + 1e-9).all()
    w = layer(rows=64, cols=256)
    plain = quantize_matrix(make_format("nf4"), w)
    dq = quantize_matrix(make_format("nf4", double_quant=True), w)
    assert torch.equal(dq.codes, plain.codes)  # codes come from the exact absmax, as bitsandbytes
    rel = (dq.params["absmax"] - plain.params["absmax"]).abs() / plain.params["absmax"].clamp(min=1e-8)
    assert float(rel[plain.params["absmax"] > 0.05].max()) < 0.05


def test_ternary_absmean_and_trit_packing():
    from lowbit.formats.ternary import pack_trits, unpack_trits, unpack_trits_reference

    trits = torch.tensor([[(v // p) % 3 for p in (81, 27, 9, 3, 1)] for v in range(243)]).reshape(1, -1).to(torch.uint8)
    b = pack_trits(trits)
    assert b.shape == (1, 243) and len(set(b[0].tolist())) == 243
    assert torch.equal(unpack_trits(b, trits.shape[1]), trits)
    assert torch.equal(unpack_trits_reference(b, trits.shape[1]), trits)
    w = layer(rows=6, cols=64)
    enc = quantize_matrix(make_format("ternary", group_size=None), w)
    alpha = w.abs().mean(1).half()
    assert torch.equal(enc.params["alpha"][:, 0], alpha)
    assert torch.equal(enc.codes.long() - 1, torch.round(w / alpha.float().clamp(min=1e-30).unsqueeze(1)).clamp(-1, 1).long() * (alpha > 0).long().unsqueeze(1))
    tq1 = make_format("ternary", packing="tq1")
    assert tq1.bits_per_weight(quantize_matrix(tq1, layer(cols=320))) == pytest.approx(8 * 64 / 320 + 16 / 64)


def test_bcq_fast_fit_equals_reference_and_als_helps():
    w = layer(rows=6, cols=200, seed=2)
    for kw in ({"bits": 2}, {"bits": 3, "offset": True}):
        fmt = make_format("bcq", **kw)
        layout = GroupLayout(torch.arange(200).int() // 64, 4)
        wg = layout.gather(w)
        imp = torch.rand(4, 64, generator=torch.Generator().manual_seed(1)) + 0.1
        for importance in (None, imp):
            fast, ref = fmt.fit(wg, layout.mask, importance), fmt.fit_reference(wg, layout.mask, importance)
            for k in fast:
                assert torch.allclose(fast[k].float(), ref[k].float(), atol=2e-3, rtol=2e-3), k
        greedy = make_format("bcq", iters=0, **kw)
        e_greedy = (quantize_matrix(greedy, w).dequantize() - w).pow(2).sum()
        e_als = (quantize_matrix(fmt, w).dequantize() - w).pow(2).sum()
        assert e_als < e_greedy
    errs = [(quantize_matrix(make_format("bcq", bits=k), w).dequantize() - w).pow(2).sum() for k in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    shifted = w + 0.1
    e_plain = (quantize_matrix(make_format("bcq", bits=2), shifted).dequantize() - shifted).pow(2).sum()
    e_off = (quantize_matrix(make_format("bcq", bits=2, offset=True), shifted).dequantize() - shifted).pow(2).sum()
    assert e_off < e_plain


def test_codebook_fast_kmeans_equals_reference_and_beats_a_uniform_grid():
    w = layer(rows=6, cols=200, seed=4) ** 3 * 100  # heavy tails: where learned levels pay
    fmt = make_format("codebook", bits=3)
    layout = GroupLayout(torch.arange(200).int() // 64, 4)
    wg = layout.gather(w)
    imp = torch.rand(4, 64, generator=torch.Generator().manual_seed(1)) + 0.1
    for importance in (None, imp):
        fast, ref = fmt.fit(wg, layout.mask, importance), fmt.kmeans_reference(wg, layout.mask, importance)
        assert torch.allclose(fast["centroids"].float(), ref["centroids"].float(), atol=1e-3, rtol=1e-3)
    e_cb = (quantize_matrix(fmt, w).dequantize() - w).pow(2).sum()
    e_int = (quantize_matrix(make_format("int", bits=3, symmetric=False), w).dequantize() - w).pow(2).sum()
    assert e_cb < e_int


def test_column_codebooks_cluster_each_column_across_rows():
    w = layer(rows=40, cols=24, seed=5) ** 3 * 100
    w[:, 7] = 0.3  # a constant column: its codebook holds the value exactly
    fmt = make_format("codebook-col", bits=2)
    wg = w.reshape(40, 24, 1)
    fast, ref = fmt.fit(wg), fmt.kmeans_reference(wg)
    assert fast["centroids"].shape == (1, 24, 4)
    assert torch.allclose(fast["centroids"].float(), ref["centroids"].float(), atol=1e-3, rtol=1e-3)
    enc = quantize_matrix(fmt, w)
    deq = enc.dequantize()
    assert torch.equal(deq[:, 7], torch.full((40,), 0.3).half().float())
    for j in range(24):  # every column decodes to at most 4 distinct values, its own
        assert deq[:, j].unique().numel() <= 4
    # per column beats per row at the same code width where columns differ (each its own level)
    g = torch.Generator().manual_seed(2)
    scaled = torch.randn(1, 24, generator=g) + 0.01 * torch.randn(40, 24, generator=g)
    e_col = (quantize_matrix(fmt, scaled).dequantize() - scaled).pow(2).sum()
    e_row = (quantize_matrix(make_format("codebook", bits=2, group_size=None), scaled).dequantize() - scaled).pow(2).sum()
    assert e_col < e_row


def test_mixed_widths_follow_salience_and_are_stored_at_their_width():
    from lowbit.formats.mixed import allocate_bits

    assert allocate_bits(torch.tensor([5.0, 1.0, 3.0, 0.5, 2.0, 4.0, 0.1, 9.0]), (1, 2, 3), 0.25).tolist() == [3, 2, 2, 1, 2, 2, 1, 3]
    w = layer(rows=8, cols=256)
    w[:, 64:128] *= 10  # the most salient group
    fmt = make_format("mixed")
    enc = quantize_matrix(fmt, w)
    bits = fmt.pack(enc)["group_bits"].tolist()
    assert bits[1] == 3 and sorted(bits) == [1, 2, 2, 3]
    t = fmt.pack(enc)
    assert t["qweight_b1"].shape == (8, 8) and t["qweight_b2"].shape == (8, 32) and t["qweight_b3"].shape == (8, 24)
    assert fmt.bits_per_weight(enc) == pytest.approx(2 + 8 * (2 + 1) / 64 + 8 * 4 / (8 * 256))


def test_mixed_widths_keep_the_budget_per_weight_with_the_least_error():
    """alloc=error: sum(width · columns) stays within target · columns also when the last
    group is narrower (576 = 4 x 128 + 64), and the salience-weighted error is never above
    the paper's share rule at the same budget; the clipping search only lowers it."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(16, 576, generator=g) * 0.05
    w[:, 130:140] *= 8
    imp = torch.rand(576, generator=g) + 0.5
    for target in (2.0, 2.5):
        fmt = make_format("mixed", group_size=128, target=target)
        enc = quantize_matrix(fmt, w, importance=imp)
        bits = fmt.pack(enc)["group_bits"].float()
        cols = torch.tensor([128, 128, 128, 128, 64.0])
        assert float((bits * cols).sum()) <= target * 576
    def werr(f, x=w):
        i = imp[: x.shape[1]]
        d = quantize_matrix(f, x, importance=i).dequantize() - x
        return float((d.pow(2) * i).sum())
    w4 = w[:, :512]  # four equal groups: the share rule (one up, one down) also averages 2 bits
    assert werr(make_format("mixed", group_size=128), w4) <= werr(make_format("mixed", group_size=128, alloc="share"), w4) + 1e-9
    assert werr(make_format("mixed", group_size=128)) <= werr(make_format("mixed", group_size=128, clip_search=False)) + 1e-9
    with pytest.raises(LowbitError, match="target"):
        make_format("mixed", target=3.5)
    # the name spells the target: mixed123@2.5 is the format above at 2.5 bits
    from lowbit.config import WeightSpec
    from lowbit.formats.names import format_of

    assert format_of(WeightSpec(format="mixed123@2.5", group_size=128)) == make_format("mixed", group_size=128, target=2.5)
    assert format_of(WeightSpec(format="mixed234", group_size=128)).target is None
    with pytest.raises(LowbitError, match="target 3.5 outside"):
        format_of(WeightSpec(format="mixed123@3.5", group_size=128))


def test_outliers_on_any_format_exact_and_accounted():
    from lowbit.formats.outliers import WithOutliers

    w = layer(rows=16, cols=200)
    w[2, 5], w[9, 150] = 3.0, -2.5
    for kind, kw in (("bcq", {"bits": 2}), ("nf4", {}), ("mixed", {})):
        base = make_format(kind, **kw)
        fmt = WithOutliers(base, 0.01)
        ow = fmt.quantize(w)
        k = round(0.01 * w.numel())
        assert ow.values.numel() == k
        deq = ow.dequantize()
        assert deq[2, 5] == 3.0 and deq[9, 150] == -2.5  # the largest weights, exact in float16
        back = fmt.unpack({n: v.clone() for n, v in fmt.pack(ow).items()}, *w.shape)
        assert torch.equal(back.dequantize(), deq)
        assert fmt.nbytes(ow) == base.nbytes(ow.base) + 6 * k
        plain = (quantize_matrix(base, w).dequantize() - w).pow(2).sum()
        assert (deq - w).pow(2).sum() < plain
    with pytest.raises(LowbitError, match="outlier positions outside"):
        fmt.unpack({**fmt.pack(ow), "outlier_rows": torch.full((k,), 99, dtype=torch.int16)}, *w.shape)


def test_nearest_level_search_equals_the_plain_argmin():
    """The binary search over sorted levels gives argmin's codes exactly, ties included:
    values on levels, at midpoints, equal levels (lower code wins), and non-finite values."""
    from lowbit.formats.base import nearest_level, nearest_level_reference

    g = torch.Generator().manual_seed(0)
    for trial in range(120):
        L = int(torch.randint(5, 40, (1,), generator=g))
        lv = torch.randn(3, 4, L, generator=g)
        if trial % 3 == 0:
            lv = torch.round(lv * 2) / 2  # many equal levels
        w = torch.randn(3, 4, 37, generator=g) * 1.5
        if trial % 2 == 0:
            w = torch.gather(lv, -1, torch.randint(0, L, (3, 4, 37), generator=g))
            if trial % 4 == 0:
                w = (w + torch.gather(lv, -1, torch.randint(0, L, (3, 4, 37), generator=g))) / 2
        assert torch.equal(nearest_level(w, lv), nearest_level_reference(w, lv)), trial
    w[0, 0, 0] = float("nan")
    assert torch.equal(nearest_level(w, lv), nearest_level_reference(w, lv))
