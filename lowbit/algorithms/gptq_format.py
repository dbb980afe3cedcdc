"""GPTQ on any weight format of the family (lowbit.formats.base).

The same solve as ``gptq.gptq_quantize``: columns in act-order, lazy batches, the Cholesky
form of the inverse Hessian, each column's rounding error pushed onto the columns not yet
quantized. What changes is only the rounding: column j goes to the nearest value its
group's format can represent (``fmt.encode`` then ``fmt.decode``), with the group's
parameters chosen by ``fmt.fit`` from the error-updated weights when the solve reaches the
group (groups along the solve order, as gptq.py without static groups), or fixed up front
from the original weights (``static_groups``, and always for formats whose parameters need
the whole matrix, e.g. NF4's double quantization). For the affine integer format this is
arithmetic-for-arithmetic ``gptq_quantize`` (the tests hold the two equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import LowbitError
from ..formats.base import Encoded, WeightFormat, default_g_idx, quantize_matrix
from .gptq import inverse_hessian_cholesky, single_thread


@dataclass
class FormatSolve:
    enc: Encoded
    loss: torch.Tensor  # per row, GPTQ's proxy loss
    damp: float
    dead: int = 0


def needs_static(fmt: WeightFormat) -> bool:
    return fmt.static_params or bool(getattr(fmt, "double_quant", False))


def _slice(params: dict[str, torch.Tensor], g: int) -> dict[str, torch.Tensor]:
    return {k: v[:, g : g + 1] for k, v in params.items() if k != "absmax_fit"}


def gptq_format(
    W: torch.Tensor,
    H: torch.Tensor,
    fmt: WeightFormat,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    static_groups: bool = False,
    name: str = "layer",
    outliers: float = 0.0,
) -> FormatSolve:
    """Quantize W [out, in] in ``fmt`` with GPTQ under the Hessian H [in, in]. Pure function.

    outliers: share of weights kept as exact float16 values on top of ``fmt``
    (formats.outliers, as SpQR): the largest by w^2 * diag(H) (SqueezeLLM's sensitivity)
    are chosen up front, left out of every group's fit, and when the solve reaches one
    it keeps its error-updated value in float16, so it feeds (almost) no error forward."""
    if getattr(fmt, "column_params", False):
        raise LowbitError(f"layer {name}: GPTQ cannot round in {fmt.describe()} column by column (its code depends on the column's "
                          f"place in its block or a whole-matrix plan); use its own method (--method {getattr(fmt, 'method', '?')})")
    W = W.detach().float().clone()
    n_rows, n = W.shape
    if H.shape != (n, n):
        raise LowbitError(f"layer {name}: Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise LowbitError(f"layer {name} has NaN/inf weights; refusing to quantize it")
    H = H.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gs = fmt.group_size or n
    n_groups = math.ceil(n / gs)
    natural_g = default_g_idx(n, fmt.group_size)
    static = static_groups or needs_static(fmt)
    keep = _outlier_mask(W, torch.diagonal(H), outliers)  # [rows, cols] bool, or None
    # fixed up front: weighted by the Hessian diagonal where the format weighs its fit
    fixed = None
    if static:
        inner = W if keep is None else W.masked_fill(keep, 0.0)
        fixed = quantize_matrix(fmt, inner, name, importance=torch.diagonal(H) if fmt.static_params else None)
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
        keep = None if keep is None else keep[:, perm]
    keep_t = None if keep is None else keep.t().contiguous()
    kept = None if keep is None else torch.zeros(n, n_rows, dtype=torch.float16)
    Hinv, damp = inverse_hessian_cholesky(H, damp_percent, name)

    group_params: list[dict[str, torch.Tensor]] = []
    codes = torch.empty(n, n_rows, dtype=torch.uint8)
    losses = torch.zeros(n_rows)
    Wt = W.t().contiguous()
    p = None
    with single_thread():
        for i1 in range(0, n, block_size):
            i2 = min(i1 + block_size, n)
            W1 = Wt[i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diagonal(Hinv1).tolist()
            for i in range(i2 - i1):
                col = i1 + i
                if static:
                    g = int(natural_g[perm[col]] if perm is not None else natural_g[col])
                    p = _slice(fixed.params, g)
                elif col % gs == 0:  # the group's parameters from the current weights
                    cur = torch.cat([W1[i:], Wt[i2:]])[:gs]
                    if keep_t is not None:  # outliers stay out of the fit
                        cur = cur.masked_fill(keep_t[col : col + gs], 0.0)
                    p = _slice(fmt.fit(cur.t().unsqueeze(1)), 0)
                    group_params.append(p)
                w = W1[i]
                c = fmt.encode(w.reshape(n_rows, 1, 1), p)
                codes[col] = c.reshape(n_rows)
                q = fmt.decode(c, p).reshape(n_rows)
                if keep_t is not None and keep_t[col].any():
                    kept[col] = w.to(torch.float16)
                    q = torch.where(keep_t[col], kept[col].float(), q)
                err = Err1[i]
                torch.sub(w, q, out=err).div_(d[i])
                W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
            losses += Err1.pow(2).sum(0) / 2
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)
    codes = codes.t()
    if static:
        params, g_idx, extra = _slice_all(fixed.params), natural_g.clone(), fixed.extra
    else:
        params = {k: torch.cat([gp[k] for gp in group_params], 1) for k in group_params[0]}
        g_idx, extra = (torch.arange(n) // gs).to(torch.int32), {}
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv].contiguous()
        if not static:
            g_idx = g_idx[inv]
    enc = Encoded(fmt, codes, params, g_idx.to(torch.int32), extra)
    if keep is not None:
        from ..formats.outliers import OutlierWeight, WithOutliers

        inv = torch.argsort(perm) if perm is not None else torch.arange(n)
        mask, values = keep[:, inv], kept.t()[:, inv]
        flat = torch.nonzero(mask.reshape(-1)).reshape(-1)  # row-major order, as formats.outliers stores them
        rows, cols = flat // n, flat % n
        enc = OutlierWeight(WithOutliers(fmt, outliers), enc, rows, cols, values[rows, cols])
    return FormatSolve(enc, losses, damp, int(dead.sum()))


def _outlier_mask(W: torch.Tensor, hdiag: torch.Tensor, share: float) -> torch.Tensor | None:
    """The ``share`` of weights with the largest w^2 * diag(H), as formats.outliers picks
    them with that importance (same count, same order of ties)."""
    if not share:
        return None
    k = int(round(share * W.numel()))
    score = W.pow(2) * hdiag.float().unsqueeze(0)
    flat = torch.argsort(score.reshape(-1), descending=True, stable=True)[:k]
    mask = torch.zeros(W.numel(), dtype=torch.bool)
    mask[flat] = True
    return mask.reshape(W.shape)


def _slice_all(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in params.items() if k != "absmax_fit"}
