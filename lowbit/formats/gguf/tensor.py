"""Row-level entry points: whole weight matrices in, GGUF tensor bytes out, and back.

A GGUF tensor of type T and shape [rows, cols] is simply its rows one after another,
each row being cols / block_size blocks of type_size bytes; there is no padding, which
is why cols must be a multiple of the block size.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType

from ...errors import LowbitError
from .common import F32
from .search import seq_rowsum
from .table import BlockCodec, codec_for

# Rows are quantized in chunks of about this many weights: large enough that numpy's
# per-call overhead vanishes, small enough that the searches' temporaries stay in cache.
CHUNK_WEIGHTS = 1 << 17

TypeLike = str | int | GGMLQuantizationType


def _as_float32(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().to("cpu").float().numpy()
    return np.asarray(a, dtype=F32)


def _check_width(codec: type[BlockCodec], cols: int) -> None:
    if cols <= 0 or cols % codec.block_size:
        raise LowbitError(f"{codec.name}: width {cols} is not a multiple of its block size {codec.block_size}")


def _prepare_importance(importance, codec: type[BlockCodec], cols: int) -> np.ndarray | None:
    """Validate per-column importance; returns it as (cols/block_size, block_size).

    Any run of 16 columns whose importance is all zero (inputs never seen active during
    calibration) gets the mean of the positive entries instead. With zero weights some of
    llama.cpp's searches return a zero scale and wipe those weights out, although other
    inputs may well reach them; a neutral weight keeps them quantized normally.
    """
    if importance is None:
        return None
    imp = _as_float32(importance)
    if imp.shape != (cols,):
        raise LowbitError(f"{codec.name}: importance has shape {tuple(imp.shape)}, expected ({cols},) for width {cols}")
    if not np.isfinite(imp).all() or (imp < 0).any():
        raise LowbitError(f"{codec.name}: importance for width {cols} must be finite and non-negative")
    groups = imp.reshape(-1, 16)
    dead = groups.max(axis=1) == 0
    if dead.any():
        positive = imp[imp > 0]
        fill = positive.mean(dtype=np.float64) if positive.size else 1.0
        groups = np.where(dead[:, None], F32(fill), groups)
    # Every search decision is invariant to scaling all weights, and scaling by a power
    # of two is exact in floating point; bringing the largest entry into [0.5, 1) keeps
    # an imatrix with huge entries from overflowing float32 sums, and changes no byte.
    groups = np.ldexp(groups, -np.frexp(groups.max())[1]).astype(F32)
    return groups.reshape(-1, codec.block_size)


def quantize_tensor(w, qtype: TypeLike, importance=None) -> np.ndarray:
    """Quantize a [rows, cols] matrix to GGML type ``qtype``: uint8 [rows, row_bytes].

    ``importance`` is one non-negative number per column (an imatrix: e.g. the mean of
    x^2 over calibration inputs), or None for llama.cpp's default weighting.
    """
    codec = codec_for(qtype)
    w = _as_float32(w)
    if w.ndim != 2:
        raise LowbitError(f"{codec.name}: expected a [rows, cols] matrix, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    _check_width(codec, cols)
    if not np.isfinite(w).all():
        raise LowbitError(f"{codec.name}: weights of width {cols} contain NaN or inf")
    imp = _prepare_importance(importance, codec, cols)
    out = np.empty((rows, cols // codec.block_size * codec.type_size), dtype=np.uint8)
    # Every division in the codecs is guarded, so a floating-point exception can only
    # mean float32 overflow inside a search: weights far beyond any LLM's (~1e6 and up,
    # depending on the type). ggml would carry on with inf and write garbage; we stop.
    try:
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            _quantize_rows(codec, w, imp, out)
    except FloatingPointError:
        raise LowbitError(
            f"{codec.name}: weights of width {cols} up to {float(np.abs(w).max()):.4g} overflow float32 while "
            f"searching scales; values this large are not supported"
        ) from None
    return out


def _quantize_rows(codec: type[BlockCodec], w: np.ndarray, imp: np.ndarray | None, out: np.ndarray) -> None:
    rows, cols = w.shape
    per_row = cols // codec.block_size
    step = max(1, CHUNK_WEIGHTS // cols)
    for r0 in range(0, rows, step):
        part = w[r0 : r0 + step]
        n = len(part)
        kwargs = {}
        if imp is not None:
            kwargs["importance"] = np.broadcast_to(imp, (n, per_row, codec.block_size)).reshape(-1, codec.block_size)
            if codec.needs_row_sigma2:
                sigma2 = seq_rowsum(part * part) / F32(cols)
                kwargs["row_sigma2"] = np.repeat(sigma2.astype(F32), per_row)
        q = codec.quantize_blocks(part.reshape(-1, codec.block_size), **kwargs)
        out[r0 : r0 + n] = q.reshape(n, -1)


def dequantize_tensor(raw, qtype: TypeLike, shape) -> np.ndarray:
    """Decode GGUF tensor bytes of type ``qtype`` into a float32 array of ``shape``."""
    codec = codec_for(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise LowbitError(f"{codec.name}: cannot decode to a 0-d shape")
    _check_width(codec, shape[-1])
    if isinstance(raw, (bytes, bytearray, memoryview)):
        data = np.frombuffer(raw, dtype=np.uint8)
    else:
        data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    n_blocks = int(np.prod(shape, dtype=np.int64)) // codec.block_size
    if data.size != n_blocks * codec.type_size:
        raise LowbitError(f"{codec.name}: {data.size} bytes do not hold shape {shape} (needs {n_blocks * codec.type_size})")
    return codec.dequantize_blocks(data.reshape(n_blocks, codec.type_size)).reshape(shape)


def quantize(qtype: TypeLike, array, importance=None) -> np.ndarray:
    """Quantize an array of any rank along its last axis: uint8 [..., row_bytes]."""
    a = _as_float32(array)
    if a.ndim == 0:
        raise LowbitError(f"{codec_for(qtype).name}: cannot quantize a 0-d array")
    q = quantize_tensor(a.reshape(-1, a.shape[-1]), qtype, importance)
    return q.reshape(*a.shape[:-1], q.shape[-1])


def dequantize(qtype: TypeLike, raw, shape) -> np.ndarray:
    return dequantize_tensor(raw, qtype, shape)
