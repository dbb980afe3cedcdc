"""Binary-coding quantization (BCQ): W ≈ offset + Σ_{i=1..k} alpha_i·b_i, b_i ∈ {-1, +1}.

Per (row, group) k scales alpha_i (float16) and, with ``offset``, one shift (float16); per
weight a k-bit code whose bit i is 1 where b_i = +1. The 2^k representable values of a
group are the sums offset ± alpha_1 ± ... ± alpha_k.

Fit (Xu et al. 2018, "Alternating multi-bit quantization"; LUT-GEMM, Park et al. 2022):
greedy first, alpha_i = mean |r|, b_i = sign(r), r -= alpha_i·b_i (r starting from
w - mean(w) with the offset, else w); then ``iters`` rounds of alternating least squares:
with the b fixed, (alpha, offset) = the least-squares solution (weighted by the importance
where given); with alpha fixed, each weight takes its nearest representable value. Each
half-step minimizes the squared error exactly, so it never increases; a group whose codes
come back unchanged has reached its fixed point and sits out the later rounds. The scales are rounded
to float16 last, and the codes re-chosen on the rounded values.
``fit_reference`` is the same fit one group at a time, the plain form tests hold ``fit`` to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError
from .base import Encoded, WeightFormat, check_shape, group_weights, nearest_level, pack_check, register
from .integer import torch_dtype
from .packing import pack, unpack


def signs_of_codes(k: int) -> torch.Tensor:
    """[2^k, k] the ±1 pattern of each code: bit i of the code set means b_i = +1."""
    c = torch.arange(2**k).unsqueeze(-1)
    return (((c >> torch.arange(k)) & 1) * 2 - 1).float()


def _lstsq(A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least-squares x of A x ≈ y, batched ([..., n, p], [..., n]); minimum norm where A is
    rank deficient (a constant group, equal sign patterns). Through the p x p normal
    equations, pinv(A^T A) A^T y (the same minimum-norm solution, p <= 5 here), in float64
    so that squaring the condition number costs nothing visible."""
    A64, y64 = A.double(), y.double()
    G = A64.transpose(-1, -2) @ A64
    return (torch.linalg.pinv(G, hermitian=True) @ (A64.transpose(-1, -2) @ y64.unsqueeze(-1))).to(A.dtype)


@register
@dataclass(frozen=True)
class BCQ(WeightFormat):
    kind = "bcq"
    scale_keys = ("alpha", "offset")

    bits: int = 3
    group_size: int | None = 64
    offset: bool = False
    iters: int = 10
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 4:
            raise LowbitError(f"bcq bits must be 1 to 4, got {self.bits!r}")
        if not isinstance(self.iters, int) or self.iters < 0:
            raise LowbitError(f"bcq iters must be a non-negative integer, got {self.iters!r}")
        torch_dtype(self.scale_dtype)

    def describe(self) -> str:
        return f"bcq{self.bits} g{self.group_size or 'row'}" + (" +offset" if self.offset else "")

    def _design(self, codes: torch.Tensor) -> torch.Tensor:
        """[..., W] codes -> [..., W, k(+1)] columns b_1..b_k (and 1 for the offset)."""
        B = signs_of_codes(self.bits)[codes.long()]
        return torch.cat([B, torch.ones_like(B[..., :1])], -1) if self.offset else B

    def _params(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"alpha": x[..., : self.bits]}
        if self.offset:
            out["offset"] = x[..., self.bits]
        return out

    def fit(self, wg, mask=None, importance=None):
        w = wg.float()
        m = group_weights(wg, mask, importance).expand_as(w)
        r = w.clone()
        off = (w * m).sum(-1) / m.sum(-1).clamp(min=1e-30) if self.offset else torch.zeros(w.shape[:2])
        r = r - off.unsqueeze(-1)
        alphas, code = [], torch.zeros(w.shape, dtype=torch.long)
        for i in range(self.bits):  # greedy
            a = (r.abs() * m).sum(-1) / m.sum(-1).clamp(min=1e-30)
            b = torch.where(r >= 0, 1.0, -1.0)
            code |= (b > 0).long() << i
            r = r - a.unsqueeze(-1) * b
            alphas.append(a)
        x = torch.stack(alphas + ([off] if self.offset else []), -1)
        # alternating least squares, on the groups whose codes still move: a group whose codes
        # repeat gets the same solution again, so it sits out the later rounds
        n, p = w.shape[-1], x.shape[-1]
        W, S, C, X = w.reshape(-1, 1, n), m.sqrt().reshape(-1, 1, n), code.reshape(-1, 1, n), x.reshape(-1, 1, p).clone()
        live = torch.arange(W.shape[0])
        for _ in range(self.iters):
            wl, sl = W[live], S[live]
            xl = _lstsq(self._design(C[live]) * sl.unsqueeze(-1), wl * sl).squeeze(-1)
            X[live] = xl
            cl = nearest_level(wl, self.levels(self._params(xl))).long()
            moved = (cl != C[live]).flatten(1).any(-1)
            C[live] = cl
            live = live[moved]
            if live.numel() == 0:
                break
        x = X.reshape(x.shape)
        sdt = torch_dtype(self.scale_dtype)
        return {k: v.to(sdt) for k, v in self._params(x).items()}

    def fit_reference(self, wg, mask=None, importance=None):
        """The same fit one (row, group) at a time, with plain lstsq on the tall system."""
        rows, groups, width = wg.shape
        m_all = group_weights(wg, mask, importance).expand_as(wg)
        S = signs_of_codes(self.bits)
        out = torch.zeros(rows, groups, self.bits + int(self.offset))
        for r_ in range(rows):
            for g in range(groups):
                real = m_all[r_, g] > 0
                w, m = wg[r_, g][real].float(), m_all[r_, g][real]
                off = float((w * m).sum() / m.sum()) if self.offset else 0.0
                res, bs, alphas = w - off, [], []
                for _ in range(self.bits):
                    alphas.append(float((res.abs() * m).sum() / m.sum()))
                    bs.append(torch.where(res >= 0, 1.0, -1.0))
                    res = res - alphas[-1] * bs[-1]
                x = torch.tensor(alphas + ([off] if self.offset else []))
                B = torch.stack(bs, -1)
                for _ in range(self.iters):
                    A = torch.cat([B, torch.ones(len(w), 1)], -1) if self.offset else B
                    x = torch.linalg.lstsq(A * m.sqrt().unsqueeze(-1), (w * m.sqrt()).unsqueeze(-1), driver="gelsd").solution[:, 0]
                    values = S @ x[: self.bits] + (x[self.bits] if self.offset else 0.0)
                    B = S[torch.argmin((w.unsqueeze(-1) - values).abs(), -1)]
                out[r_, g] = x
        sdt = torch_dtype(self.scale_dtype)
        return {k: v.to(sdt) for k, v in self._params(out).items()}

    def levels(self, params):
        lv = params["alpha"].float() @ signs_of_codes(self.bits).t()  # [R, G, 2^k]
        if self.offset:
            lv = lv + params["offset"].float().unsqueeze(-1)
        return lv

    def pack(self, enc: Encoded) -> dict[str, torch.Tensor]:
        out = {"qweight": pack(enc.codes, self.bits), "alpha": enc.params["alpha"].contiguous()}
        if self.offset:
            out["offset"] = enc.params["offset"].contiguous()
        return out

    def unpack(self, tensors, rows, cols, g_idx):
        pack_check(tensors, ["qweight", "alpha"] + (["offset"] if self.offset else []), f"format {self.describe()}")
        n_groups = int(g_idx.max()) + 1 if g_idx.numel() else 1
        params = {"alpha": check_shape(tensors["alpha"], (rows, n_groups, self.bits), "alpha")}
        if self.offset:
            params["offset"] = check_shape(tensors["offset"], (rows, n_groups), "offset")
        return Encoded(self, unpack(tensors["qweight"], self.bits, cols), params, g_idx.to(torch.int32))
