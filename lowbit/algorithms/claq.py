"""CLAQ (Wang et al., 2024): GPTQ's column loop with a k-means codebook fitted to each
error-updated column, widths per column by outliers, and reserved float16 outliers.

The plan (each column's width and how much of it is kept exactly) is fixed up front from
the original weights (formats.claq.column_plan); then, in act-order, each column's 2^b
centroids are fitted to its values as the solve reaches it, the column is rounded to them
(kept values stay as they are, so they feed no error forward), and the error flows on
through the inverse Hessian's Cholesky factor as in GPTQ. Defaults are the reference code's
(fayuge/CLAQ, llama.py --act-order, damping 0.01, lazy batches of 128).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import LowbitError
from ..formats.base import Encoded, check_weight
from ..formats.claq import CLAQ, column_plan, reserved
from .base import option, register
from .gptq import FormatSolver, inverse_hessian_cholesky, output_errors, single_thread


def claq_quantize(W: torch.Tensor, H: torch.Tensor, fmt: CLAQ, damp_percent: float = 0.01, act_order: bool = True,
                  block_size: int = 128, name: str = "layer") -> Encoded:
    W = check_weight(W, name, fmt).clone()
    rows, n = W.shape
    if H.shape != (n, n):
        raise LowbitError(f"layer {name}: Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    H = H.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    widths, keep = column_plan(W, fmt.bits, fmt.high, fmt.share_high, fmt.reserve)
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    U, _ = inverse_hessian_cholesky(H, damp_percent, name)
    Q = torch.zeros_like(W)
    kept = torch.zeros(rows, n, dtype=torch.bool)
    cents = torch.empty(n, 2**fmt.high, dtype=torch.float16)
    codes = torch.empty(rows, n, dtype=torch.uint8)
    with single_thread():
        for i1 in range(0, n, block_size):
            i2 = min(i1 + block_size, n)
            W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
            Err1 = torch.zeros_like(W1)
            for i in range(i2 - i1):
                j, col = i1 + i, int(perm[i1 + i])
                w = W1[:, i]
                c = fmt.fit_column(w, int(widths[col]))
                cents[j] = c
                code = fmt.nearest_code(w, c)
                q = c.float()[code.long()]
                k = reserved(w, float(keep[col]))
                q = torch.where(k, w.to(torch.float16).float(), q)
                codes[:, j], kept[:, j], Q[:, j] = code, k, q
                Err1[:, i] = (w - q) / U1[i, i]
                W1[:, i + 1 :].addr_(Err1[:, i], U1[i, i + 1 :], alpha=-1)
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    inv = torch.argsort(perm)
    params = {"centroids": cents[inv].unsqueeze(0), "col_bits": widths.reshape(1, -1, 1)}
    return fmt.with_kept(codes[:, inv], params, Q[:, inv], kept[:, inv])


@dataclass(frozen=True)
class CLAQOptions:
    damp_percent: float = option(0.01, "Hessian damping as a fraction of its mean diagonal, in (0, 1)")
    act_order: bool = option(True, "solve columns by decreasing Hessian diagonal; true/false")

    def __post_init__(self) -> None:
        if not 0 < self.damp_percent < 1:
            raise LowbitError(f"damp_percent must be in (0, 1), got {self.damp_percent}")


@register
class CLAQMethod(FormatSolver):
    name = "claq"
    summary = "CLAQ: GPTQ with per-column k-means codebooks, outlier-guided widths per column, float16 outliers kept"
    Options = CLAQOptions
    default_weight = {"format": "claq2.1", "group_size": 1}
    defaults_source = "2.1 bits (5% of columns at 4 bits by outlier count, t = 13), act-order, damping 0.01: the reference code's (fayuge/CLAQ) --outlierorder 2.1; claq2.05-or adds its dynamic outlier reservation"

    label, format_class = "CLAQ", CLAQ
    format_hint = "quantizes into the claq format, not {} (use --format claq2.1, claq3.1, ...)"

    def solve_format(self, name: str, module: nn.Module, fmt, stats: Any):
        return claq_quantize(module.weight, stats.H, fmt, self.options.damp_percent, self.options.act_order, name=name)

    def layer_record(self, name: str, module: nn.Module, qweight, stats: Any) -> dict:
        W = module.weight.detach().float()
        rtn = qweight.fmt.quantize(W, name).dequantize()
        err, rtn_err = output_errors(W, [qweight.dequantize(), rtn], stats.H)
        return {"output_rel_error": err, "rtn_output_rel_error": rtn_err, "kept_values": int(qweight.extra["kept_rows"].numel())}
