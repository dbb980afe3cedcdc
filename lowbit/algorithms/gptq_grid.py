"""GPTQ onto a fixed per-weight grid: error compensation for GGUF block types.

llama.cpp's quantizers (and lowbit's GGML codecs) choose each block's scales by a search
and then round every weight to the nearest code. GPTQ keeps those scales (chosen once,
from the original weights, weighted by the importance matrix) and only changes how the
codes are chosen: one input column at a time, in act-order, each column's rounding error
is pushed onto the columns not yet quantized through the inverse Hessian, exactly as in
``gptq.gptq_quantize`` with static groups. The grid is arbitrary per weight (scale,
offset, zero, code range: ``lowbit.formats.gguf.grid.AffineGrid``), so rows of different
GGML types (q, k and v sharing one input) are solved together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LowbitError
from .gptq import inverse_hessian_cholesky, single_thread


@dataclass
class GridSolve:
    codes: np.ndarray  # int32 [rows, cols], on the grid
    loss: float  # GPTQ's proxy loss, summed over rows
    damp: float


def gptq_on_grid(W, H: torch.Tensor, grid, damp_percent: float = 0.01, block_size: int = 128, act_order: bool = True,
                 name: str = "layer") -> GridSolve:
    """Codes for W [rows, cols] on ``grid`` (an AffineGrid of W's shape) that keep the
    layer output on the calibration inputs (Hessian H [cols, cols]) close. Pure function."""
    W = torch.as_tensor(np.asarray(W, dtype=np.float32)).clone()
    rows, n = W.shape
    if H.shape != (n, n):
        raise LowbitError(f"layer {name}: Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    if grid.scale.shape != (rows, n):
        raise LowbitError(f"layer {name}: grid of shape {grid.scale.shape} does not match weight {tuple(W.shape)}")
    H = H.detach().float().clone()
    dead = torch.diagonal(H) == 0  # inputs always zero: their weights never matter
    H[dead, dead] = 1
    S = torch.from_numpy(np.ascontiguousarray(grid.scale, np.float32))
    B = torch.from_numpy(np.ascontiguousarray(grid.offset, np.float32))
    live = S != 0
    step = torch.where(live, S, torch.ones_like(S))
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(n)
    W, H, S, B, step, live = W[:, perm], H[perm][:, perm], S[:, perm], B[:, perm], step[:, perm], live[:, perm]
    Hinv, damp = inverse_hessian_cholesky(H, damp_percent, name)

    # Column j of each matrix is row j of its transpose: contiguous in the loop below.
    Wt, St, Bt, stept, livet = (x.t().contiguous() for x in (W, S, B, step, live))
    codes = torch.empty(n, rows)
    loss = 0.0
    z = float(grid.zero)
    with single_thread():  # a dozen small ops per column: threads cost more than they save
        for i1 in range(0, n, block_size):
            i2 = min(i1 + block_size, n)
            W1 = Wt[i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                w = W1[i]
                q = torch.round((w - Bt[col]) / stept[col]) + z
                q = torch.where(livet[col], q.clamp_(grid.qmin, grid.qmax), torch.full_like(q, z))
                codes[col] = q
                err = Err1[i]
                torch.sub(w, St[col] * (q - z) + Bt[col], out=err)
                err.div_(Hinv1[i, i])
                W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
            loss += float(Err1.pow(2).sum()) / 2
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)
    codes = codes.t()[:, torch.argsort(perm)]
    return GridSolve(codes.numpy().astype(np.int32), loss, damp)
