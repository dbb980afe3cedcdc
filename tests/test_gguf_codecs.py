"""GGUF block codecs (lowbit.formats.gguf) against gguf-py as the oracle.

* decoding: for every type, gguf-py's dequantize of our bytes equals ours bit for bit,
  on quantized data (random and edge blocks) and on random byte patterns;
* legacy quantizers: our bytes equal gguf.quants.quantize's (ggml's reference) exactly;
* quality: round-trip error bounds and their order across types, importance helps;
* determinism, chunking invariance, edge blocks and the errors for bad input.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T

from lowbit.errors import LowbitError
from lowbit.formats import gguf as G
from lowbit.formats.gguf import tensor as gtensor
from lowbit.formats.gguf.iq4nl import GRID
from lowbit.formats.gguf.search import colsum

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
TERNARY = ["TQ1_0", "TQ2_0"]
ALL = LEGACY + KQUANTS + ["IQ4_NL"] + TERNARY
SEARCHED = [t for t in ALL if t != "Q8_0" and t not in TERNARY]  # Q8_0 and the TQ types have no search, so importance cannot help

# Byte offsets of the float16 fields (d, and m/dmin) inside one block of each type.
FP16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "TQ1_0": [52], "TQ2_0": [64],
}  # fmt: skip


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def gguf_decode(raw: np.ndarray, name: str) -> np.ndarray:
    return gguf.quants.dequantize(raw, T[name])


def rel_rmse(a: np.ndarray, b: np.ndarray, weight=None) -> float:
    w = np.ones_like(b) if weight is None else np.broadcast_to(weight, b.shape)
    return float(np.sqrt((w * (a - b) ** 2).sum() / (w * b**2).sum()))


@pytest.fixture(scope="module")
def gauss() -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((32, 1024)) * 0.02).astype(np.float32)


def edge_rows() -> np.ndarray:
    """One 256-wide row per edge pattern (a whole super-block, eight legacy blocks)."""
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(256).astype(np.float32)
    outlier = noise * 0.01
    outlier[77] = 5.0
    half = np.where(np.arange(256) < 128, 0.0, noise)
    alternating = np.where(np.arange(256) % 2 == 0, 0.5, -0.5)
    plateau = np.where(np.arange(256) < 128, 2.0, noise)
    rows = [
        np.zeros(256),  # all zero
        np.full(256, 0.37),  # constant
        np.full(256, -0.37),  # constant, negative
        outlier,  # one outlier among small weights
        noise * 1e-4,  # small: the float16 scales are subnormal for some types
        half,  # zero sub-blocks inside a live super-block
        alternating,  # ties for the largest magnitude: the first one wins
        np.linspace(-1, 1, 256),  # ramp
        np.abs(noise),  # one-signed
        np.round(noise * 4) / 4,  # values on a coarse grid
        plateau,
        noise * 3e3,  # large, still well inside every type's range
    ]
    return np.stack(rows).astype(np.float32)


# ---------------------------------------------------------------- the type table


def test_type_table_comes_from_gguf():
    assert G.supported_types() == ALL
    for name in ALL:
        codec = G.codec_for(name)
        assert (codec.block_size, codec.type_size) == GGML_QUANT_SIZES[T[name]]
        assert G.block_geometry(name) == GGML_QUANT_SIZES[T[name]]
        assert codec.ggml_type == T[name] and codec.name == name
    assert G.row_bytes("Q4_K", 768) == 3 * 144


def test_type_names_resolve_and_unknown_types_fail():
    assert G.resolve_type("q4_k") == G.resolve_type(T.Q4_K) == G.resolve_type(int(T.Q4_K)) == T.Q4_K
    with pytest.raises(LowbitError, match="Q9_9"):
        G.resolve_type("Q9_9")
    with pytest.raises(LowbitError, match="IQ2_XXS"):
        G.codec_for("IQ2_XXS")


def test_iq4nl_grid_is_ggmls():
    assert tuple(GRID.tolist()) == tuple(gguf.quants.IQ4_NL.kvalues)


def test_fallback_types_follow_llama_cpp():
    assert G.fallback_type("Q4_K", 768) == T.Q4_K
    assert G.fallback_type("Q2_K", 576) == T.Q4_0
    assert G.fallback_type("Q3_K", 576) == T.Q4_0
    assert G.fallback_type("Q4_K", 576) == T.Q5_0
    assert G.fallback_type("Q5_K", 576) == T.Q5_1
    assert G.fallback_type("Q6_K", 576) == T.Q8_0
    assert G.fallback_type("Q4_K", 48) == T.F16


# ---------------------------------------------------------------- decoding parity


@pytest.mark.parametrize("name", ALL)
def test_decode_matches_gguf_on_random_data(name, gauss):
    raw = G.quantize_tensor(gauss, name)
    assert raw.dtype == np.uint8 and raw.shape == (32, G.row_bytes(name, 1024))
    ours = G.dequantize_tensor(raw, name, gauss.shape)
    np.testing.assert_array_equal(bits(ours), bits(gguf_decode(raw, name)))


@pytest.mark.parametrize("name", ALL)
def test_decode_matches_gguf_on_edge_blocks(name):
    w = edge_rows()
    for importance in (None, np.linspace(0.1, 3.0, 256, dtype=np.float32)):
        raw = G.quantize_tensor(w, name, importance)
        ours = G.dequantize_tensor(raw, name, w.shape)
        np.testing.assert_array_equal(bits(ours), bits(gguf_decode(raw, name)))


@pytest.mark.parametrize("name", ALL)
def test_decode_matches_gguf_on_random_bytes(name):
    # Every bit of every field, not just the patterns our quantizer happens to write.
    rng = np.random.default_rng(2)
    _, type_size = G.block_geometry(name)
    raw = rng.integers(0, 256, (64, type_size), dtype=np.uint8)
    for off in FP16_FIELDS[name]:  # keep the float16 fields finite so NaN cannot hide a mismatch
        raw[:, off : off + 2] = rng.uniform(-2, 2, 64).astype(np.float16).view(np.uint8).reshape(64, 2)
    shape = (64, G.block_geometry(name)[0])
    ours = G.dequantize_tensor(raw, name, shape)
    np.testing.assert_array_equal(bits(ours), bits(gguf_decode(raw, name)))


@pytest.mark.parametrize("name", ALL)
def test_importance_bytes_decode_like_gguf(name, gauss):
    importance = np.random.default_rng(3).gamma(0.5, 1.0, 1024).astype(np.float32)
    raw = G.quantize_tensor(gauss, name, importance)
    np.testing.assert_array_equal(bits(G.dequantize_tensor(raw, name, gauss.shape)), bits(gguf_decode(raw, name)))


# ---------------------------------------------------------------- legacy bytes


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_bytes_match_gguf_quantizer(name, gauss):
    for w in (gauss, edge_rows(), gauss * 300.0):
        np.testing.assert_array_equal(G.quantize_tensor(w, name), gguf.quants.quantize(w, T[name]))


# ---------------------------------------------------------------- edge blocks


@pytest.mark.parametrize("name", ALL)
def test_zero_blocks_decode_to_exact_zeros(name):
    w = np.zeros((3, 512), dtype=np.float32)
    w[1, :] = -0.0
    for importance in (None, np.ones(512, dtype=np.float32)):
        out = G.dequantize_tensor(G.quantize_tensor(w, name, importance), name, w.shape)
        assert np.all(out == 0)


# three levels per block (the TQ types) cannot meet these accuracy bounds on Gaussian rows;
# test_ternary_types_store_bitnet_blocks_exactly checks what they are for
@pytest.mark.parametrize("name", [t for t in ALL if t not in TERNARY])
def test_constant_and_outlier_blocks(name):
    w = edge_rows()
    out = G.dequantize_tensor(G.quantize_tensor(w, name), name, w.shape)
    assert np.all(np.isfinite(out))
    assert np.abs(out[1] - 0.37).max() < 1e-3 and np.abs(out[2] + 0.37).max() < 1e-3
    assert abs(out[3, 77] - 5.0) < 2.5e-3  # the outlier itself survives
    assert rel_rmse(out[4], w[4]) < 0.35  # small weights still get usable scales
    # Far below float16's range (~6e-8 per step) a scale is simply 0: no error, no NaN.
    tiny = G.dequantize_tensor(G.quantize_tensor(w[4:5] * 1e-4, name), name, (1, 256))
    assert np.all(np.isfinite(tiny))


@pytest.mark.parametrize("name", ALL)
def test_huge_weights_raise_a_clear_error(name):
    w = np.full((2, 256), 1e9, dtype=np.float32)
    with pytest.raises(LowbitError, match=name) as e:
        G.quantize_tensor(w, name)
    assert "\n" not in str(e.value)


def test_bad_input_raises_one_line_errors():
    w = np.zeros((4, 256), dtype=np.float32)
    with pytest.raises(LowbitError, match=r"Q4_K: width 320 is not a multiple of its block size 256"):
        G.quantize_tensor(np.zeros((4, 320), np.float32), "Q4_K")
    with pytest.raises(LowbitError, match=r"Q4_0: width 48"):
        G.quantize_tensor(np.zeros((4, 48), np.float32), "Q4_0")
    for bad in (np.nan, np.inf):
        w2 = w.copy()
        w2[1, 3] = bad
        with pytest.raises(LowbitError, match=r"Q6_K: weights of width 256 contain NaN or inf"):
            G.quantize_tensor(w2, "Q6_K")
    with pytest.raises(LowbitError, match="importance"):
        G.quantize_tensor(w, "Q4_K", np.ones(255, np.float32))
    with pytest.raises(LowbitError, match="importance"):
        G.quantize_tensor(w, "Q4_K", -np.ones(256, np.float32))
    with pytest.raises(LowbitError, match="bytes"):
        G.dequantize_tensor(np.zeros(100, np.uint8), "Q4_K", (4, 256))
    with pytest.raises(LowbitError, match="matrix"):
        G.quantize_tensor(np.zeros(256, np.float32), "Q4_K")


# ---------------------------------------------------------------- quality

# Relative RMSE on N(0, 1) weights; llama.cpp's own quantizers land on the same numbers.
RMSE_BOUND = {
    "Q2_K": 0.31, "Q3_K": 0.16, "Q4_0": 0.09, "Q4_1": 0.082, "IQ4_NL": 0.08, "Q4_K": 0.075,
    "Q5_0": 0.045, "Q5_1": 0.04, "Q5_K": 0.038, "Q6_K": 0.019, "Q8_0": 0.006,
}  # fmt: skip


def test_round_trip_error_bounds_and_order():
    w = np.random.default_rng(4).standard_normal((64, 1024)).astype(np.float32)
    err = {n: rel_rmse(G.dequantize_tensor(G.quantize_tensor(w, n), n, w.shape), w) for n in ALL}
    for n, bound in RMSE_BOUND.items():
        assert err[n] < bound, (n, err[n])
    order = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    assert all(err[a] > err[b] for a, b in itertools.pairwise(order)), err
    assert err["Q4_K"] < err["Q4_0"] and err["IQ4_NL"] < err["Q4_0"] and err["Q5_K"] < err["Q5_0"]


@pytest.mark.parametrize("name", SEARCHED)
def test_importance_lowers_importance_weighted_error(name):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 512)).astype(np.float32)
    importance = rng.gamma(0.3, 1.0, 512).astype(np.float32)  # a few columns matter a lot
    plain = G.dequantize_tensor(G.quantize_tensor(w, name), name, w.shape)
    aware = G.dequantize_tensor(G.quantize_tensor(w, name, importance), name, w.shape)
    assert rel_rmse(aware, w, importance) < 0.97 * rel_rmse(plain, w, importance)


def test_q8_0_ignores_importance(gauss):
    importance = np.linspace(0, 1, 1024, dtype=np.float32)
    np.testing.assert_array_equal(G.quantize_tensor(gauss, "Q8_0", importance), G.quantize_tensor(gauss, "Q8_0"))


def test_zero_importance_columns_are_still_quantized(gauss):
    importance = np.ones(1024, dtype=np.float32)
    importance[:64] = 0  # inputs never active in calibration; the weights must not be wiped
    for name in ("Q4_0", "Q3_K", "Q6_K", "IQ4_NL"):
        out = G.dequantize_tensor(G.quantize_tensor(gauss, name, importance), name, gauss.shape)
        assert rel_rmse(out[:, :64], gauss[:, :64]) < 0.2, name


# ---------------------------------------------------------------- determinism and API


@pytest.mark.parametrize("name", ALL)
def test_same_input_same_bytes(name, gauss):
    assert np.array_equal(G.quantize_tensor(gauss, name), G.quantize_tensor(gauss.copy(), name))


def test_group_sums_run_in_c_loop_order():
    # The searches rely on numpy adding position 0, 1, 2, ... in order, like ggml's loops.
    rng = np.random.default_rng(8)
    for m, n in [(16, 1), (32, 1), (256, 2), (32, 3), (1024, 1), (16, 999)]:
        a = (rng.standard_normal((m, n)) * rng.uniform(0, 100, (m, 1))).astype(np.float32)
        acc = a[0].copy()
        for row in a[1:]:
            acc += row
        np.testing.assert_array_equal(colsum(a), acc)


def test_chunking_does_not_change_bytes(gauss, monkeypatch):
    importance = np.random.default_rng(6).uniform(0.5, 2.0, 1024).astype(np.float32)
    cases = [(n, imp) for n in ("Q4_0", "Q5_1", "Q2_K", "Q4_K", "IQ4_NL") for imp in (None, importance)]
    whole = [G.quantize_tensor(gauss, n, imp) for n, imp in cases]
    monkeypatch.setattr(gtensor, "CHUNK_WEIGHTS", 1)  # one row at a time
    for (n, imp), ref in zip(cases, whole):
        np.testing.assert_array_equal(G.quantize_tensor(gauss, n, imp), ref)


def test_any_rank_arrays_bytes_and_torch_tensors(gauss):
    w3 = gauss.reshape(4, 8, 1024)
    q = G.quantize("Q4_K", w3)
    assert q.shape == (4, 8, G.row_bytes("Q4_K", 1024))
    np.testing.assert_array_equal(q.reshape(32, -1), G.quantize_tensor(gauss, "Q4_K"))
    out = G.dequantize("Q4_K", q.tobytes(), w3.shape)
    assert out.shape == w3.shape and out.dtype == np.float32
    np.testing.assert_array_equal(G.quantize_tensor(torch.from_numpy(gauss), "Q6_K"), G.quantize_tensor(gauss, "Q6_K"))


# ---------------------------------------------------------------- ggml itself, where present


def _ggml_quantizer():
    spec = importlib.util.find_spec("libggml")  # the libggml-python wheel ships ggml's C library
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib64" / "libggml-base.so"
    if not lib.exists():
        return None
    import ctypes

    c = ctypes.CDLL(str(lib))
    c.ggml_quantize_chunk.restype = ctypes.c_size_t
    c.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]

    def quantize(w, name, importance):
        w = np.ascontiguousarray(w, dtype=np.float32)
        out = np.zeros((w.shape[0], G.row_bytes(name, w.shape[1])), np.uint8)
        imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
        c.ggml_quantize_chunk(int(T[name]), w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1],
                              None if imp is None else imp.ctypes.data)  # fmt: skip
        return out

    return quantize


def test_bytes_match_ggml_reference_where_installed(gauss):
    ggml_quantize = _ggml_quantizer()
    if ggml_quantize is None:
        pytest.skip("ggml's C library (pip install libggml-python) is not installed")
    importance = np.random.default_rng(7).gamma(0.5, 1.0, 1024).astype(np.float32) + 1e-6
    for w in (gauss, np.tile(edge_rows(), (1, 4))):
        for name in ALL:
            for imp in (None, importance):
                np.testing.assert_array_equal(G.quantize_tensor(w, name, imp), ggml_quantize(w, name, imp), err_msg=name)


@pytest.mark.parametrize("name", TERNARY)
def test_ternary_types_store_bitnet_blocks_exactly(name):
    """gamma·{-1, 0, 1} blocks (BitNet b1.58's weights) decode exactly when gamma is a
    float16; every other value rounds to the block's three levels d·{-1, 0, 1}."""
    rng = np.random.default_rng(3)
    gamma = np.float32(np.float16(0.0371))
    w = (rng.integers(-1, 2, (6, 512)) * gamma).astype(np.float32)
    w[:, 0] = gamma  # every block holds its scale
    w[:, 256] = -gamma
    assert np.array_equal(G.dequantize_tensor(G.quantize_tensor(w, name), name, w.shape), w)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    out = G.dequantize_tensor(G.quantize_tensor(x, name), name, x.shape)
    d = np.abs(x).max(axis=1, keepdims=True).astype(np.float16).astype(np.float32)
    assert np.allclose(out, np.clip(np.round(x / d), -1, 1) * d, rtol=0, atol=1e-7)
