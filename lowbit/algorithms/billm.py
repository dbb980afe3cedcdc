"""BiLLM (Huang et al., 2024): post-training binarization with GPTQ-style error feedback.

Per block of 128 input columns, in natural order (the salient mask is a set of columns of
the block): the Cholesky factor U of the damped inverse Hessian gives each column's
salience weight 1 / U_jj^2; the format (formats.billm) chooses the block's salient columns
and break point on the error-updated weights when the solve reaches the block, then codes
each weight. Errors flow on as in GPTQ, (w - q) / U_jj times U's rows:

- ``feedback="block"`` (default: the reference code's BRAGPTQ): the whole block is coded at
  once from its weights as they stand when the solve reaches it, and its errors go to the
  blocks after it;
- ``feedback="column"``: inside the block too, column by column (GPTQ's own loop), so each
  column's error is compensated by the block's remaining columns.

The layer's report row adds the exact stored bits per weight next to the paper's count
(signs only) and the share of salient columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import LowbitError
from ..formats.base import Encoded, check_weight
from ..formats.billm import BiLLMFormat
from .base import option, register
from .gptq import FormatSolver, inverse_hessian_cholesky, output_errors, single_thread


def billm_quantize(W: torch.Tensor, H: torch.Tensor, fmt: BiLLMFormat, damp_percent: float = 0.01,
                   feedback: str = "block", name: str = "layer") -> tuple[Encoded, float]:
    """W [out, in] binarized in ``fmt`` under the Hessian H [in, in]; (encoded, damping)."""
    W = check_weight(W, name, fmt).clone()
    rows, n = W.shape
    if H.shape != (n, n):
        raise LowbitError(f"layer {name}: Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    H = H.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    U, damp = inverse_hessian_cholesky(H, damp_percent, name)
    bs = fmt.group_size
    codes = torch.empty(rows, n, dtype=torch.uint8)
    groups: list[dict[str, torch.Tensor]] = []
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        p = fmt.fit(W1.unsqueeze(1), None, (1.0 / d.pow(2)).unsqueeze(0))  # the searches: all threads
        groups.append(p)
        Err1 = torch.zeros_like(W1)
        if feedback == "block":
            c = fmt.encode(W1.unsqueeze(1), p)
            codes[:, i1:i2] = c[:, 0]
            Err1 = (W1 - fmt.decode(c, p)[:, 0]) / d
        else:
            W1 = W1.clone()
            with single_thread():  # small per-column steps: threads only add overhead
                for j in range(i2 - i1):
                    pj = {k: (v[:, :, j : j + 1] if k == "salient" else v) for k, v in p.items()}
                    c = fmt.encode(W1[:, j].reshape(rows, 1, 1), pj)
                    codes[:, i1 + j] = c.reshape(rows)
                    Err1[:, j] = (W1[:, j] - fmt.decode(c, pj).reshape(rows)) / d[j]
                    W1[:, j + 1 :].addr_(Err1[:, j], U1[j, j + 1 :], alpha=-1)
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    width = min(bs, n)  # a narrower last block: its salient mask padded, as GroupLayout pads
    last = groups[-1]["salient"]
    groups[-1]["salient"] = torch.cat([last, torch.zeros(1, 1, width - last.shape[-1], dtype=torch.bool)], -1)
    params = {k: torch.cat([g[k] for g in groups], 1) for k in groups[0]}
    g_idx = (torch.arange(n) // bs).to(torch.int32)
    return Encoded(fmt, codes, params, g_idx), damp


@dataclass(frozen=True)
class BiLLMOptions:
    damp_percent: float = option(0.01, "Hessian damping as a fraction of its mean diagonal, in (0, 1)")
    feedback: str = option("block", "where rounding errors go: block (the reference: to later blocks only) or column (also inside the block, GPTQ's loop)")

    def __post_init__(self) -> None:
        if not 0 < self.damp_percent < 1:
            raise LowbitError(f"damp_percent must be in (0, 1), got {self.damp_percent}")
        if self.feedback not in ("block", "column"):
            raise LowbitError(f"feedback must be block or column, got {self.feedback!r}")


@register
class BiLLM(FormatSolver):
    name = "billm"
    summary = "BiLLM: 1-bit post-training binarization (salient columns by residual binarization, the rest split at a break point), GPTQ error feedback"
    Options = BiLLMOptions
    default_weight = {"format": "billm", "group_size": 128}
    defaults_source = "blocks of 128 columns, Hessian salience, up to 49 salient columns, 81 break points, damping 0.01: the reference code's (Aaronhuang-778/BiLLM) run.sh"

    label, format_class = "BiLLM", BiLLMFormat
    format_hint = "binarizes into the billm format, not {} (use --format billm or billm-int8)"

    def __init__(self, config):
        super().__init__(config)
        self._extra: dict[int, tuple] = {}

    def solve_format(self, name: str, module: nn.Module, fmt, stats: Any):
        enc, damp = billm_quantize(module.weight, stats.H, fmt, self.options.damp_percent, self.options.feedback, name)
        self._extra[id(module)] = damp
        return enc

    def layer_record(self, name: str, module: nn.Module, qweight, stats: Any) -> dict:
        from ..formats.base import quantize_matrix

        W = module.weight.detach().float()
        rtn = quantize_matrix(qweight.fmt, W, name=name).dequantize()
        err, rtn_err = output_errors(W, [qweight.dequantize(), rtn], stats.H)
        sal = qweight.params["salient"]
        return {
            "output_rel_error": err,
            "rtn_output_rel_error": rtn_err,
            "damp": self._extra.pop(id(module), None),
            "bits_per_weight": qweight.fmt.bits_per_weight(qweight),
            "paper_bits_per_weight": qweight.fmt.signs_only_bits(qweight),
            "salient_column_share": float(sal.sum()) / max(W.shape[1], 1),
        }
