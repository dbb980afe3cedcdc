"""Learned codebooks: 2^k centroids (float16) per (row, group); group_size=None, one per row.

Each group's values are clustered by 1-D k-means (Lloyd's algorithm, weighted by the
importance where given, as SqueezeLLM / CLAQ weigh by the Hessian diagonal or Fisher
information); a weight's code is the index of its nearest centroid. Initialization is
deterministic, no random draw: centroid j starts at the sorted group's value of rank
floor((j + 1/2)·n / 2^k) (its (j + 1/2)/2^k quantile). A centroid that loses all its
members keeps its place. After ``iters`` rounds (a group whose codes repeat has stopped
moving and sits out the rest) the centroids are rounded to float16 and the codes re-chosen
on the rounded values.

``codebook-col`` (ColumnCodebook) is CLAQ's column-wise variant: centroids per input
column, shared by all rows.
``kmeans_reference`` is the plain one-group-at-a-time loop that tests hold ``fit`` to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import LowbitError
from .base import Encoded, WeightFormat, check_shape, group_weights, nearest_level, pack_check, register
from .integer import torch_dtype
from .packing import pack, unpack


@register
@dataclass(frozen=True)
class Codebook(WeightFormat):
    kind = "codebook"
    scale_keys = ("centroids",)

    bits: int = 4
    group_size: int | None = 64
    iters: int = 20
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise LowbitError(f"codebook bits must be 1 to 8, got {self.bits!r}")
        torch_dtype(self.scale_dtype)

    def describe(self) -> str:
        return f"codebook{self.bits} g{self.group_size or 'row'}"

    def fit(self, wg, mask=None, importance=None):
        w = wg.float()
        L = 2**self.bits
        real = (torch.ones(w.shape[1:]) if mask is None else mask.float()).unsqueeze(0).expand_as(w)
        m = group_weights(wg, mask, importance).expand_as(w)
        n = real.sum(-1).long()  # real entries per group
        srt = torch.sort(torch.where(real > 0, w, torch.full_like(w, float("inf"))), -1).values
        rank = ((torch.arange(L) + 0.5).unsqueeze(0).unsqueeze(0) * n.unsqueeze(-1) / L).long().clamp(max=w.shape[-1] - 1)
        c = torch.gather(srt, -1, rank)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))  # an empty group
        # Lloyd's rounds on the groups whose codes still move: a group whose codes repeat has
        # reached its fixed point (the same members give the same means), so it is left out
        # of later rounds, with the result of running every round on every group.
        W, M = w.reshape(-1, 1, w.shape[-1]), m.reshape(-1, 1, w.shape[-1])  # one group per row
        C = c.reshape(-1, 1, L).clone()
        live, prev = torch.arange(W.shape[0]), None
        for _ in range(self.iters):
            a = nearest_level(W[live], C[live]).long()
            if prev is not None:
                moved = (a != prev).flatten(1).any(-1)
                live, a = live[moved], a[moved]
                if live.numel() == 0:
                    break
            wl, ml, cl = W[live], M[live], C[live]
            num = torch.zeros_like(cl).scatter_add_(-1, a, wl * ml)
            den = torch.zeros_like(cl).scatter_add_(-1, a, ml)
            C[live] = torch.where(den > 0, num / den.clamp(min=1e-30), cl)
            prev = a
        c = C.reshape(c.shape)
        return {"centroids": c.to(torch_dtype(self.scale_dtype))}

    def kmeans_reference(self, wg, mask=None, importance=None):
        rows, groups, _ = wg.shape
        L = 2**self.bits
        m_all = group_weights(wg, mask, importance).expand_as(wg)
        real_all = (torch.ones(wg.shape[1:]) if mask is None else mask.float()).unsqueeze(0).expand_as(wg)
        out = torch.zeros(rows, groups, L)
        for r in range(rows):
            for g in range(groups):
                keep = real_all[r, g] > 0
                w, m = wg[r, g][keep].float(), m_all[r, g][keep]
                srt = torch.sort(w).values
                c = torch.stack([srt[min(int((j + 0.5) * len(w) / L), len(w) - 1)] for j in range(L)])
                for _ in range(self.iters):
                    a = torch.argmin((w.unsqueeze(-1) - c).abs(), -1)
                    for j in range(L):
                        sel = a == j
                        if float(m[sel].sum()) > 0:
                            c[j] = (w[sel] * m[sel]).sum() / m[sel].sum()
                out[r, g] = c
        return {"centroids": out.to(torch_dtype(self.scale_dtype))}

    def levels(self, params):
        return params["centroids"].float()

    def pack(self, enc: Encoded) -> dict[str, torch.Tensor]:
        return {"qweight": pack(enc.codes, self.bits), "centroids": enc.params["centroids"].contiguous()}

    def unpack(self, tensors, rows, cols, g_idx):
        pack_check(tensors, ["qweight", "centroids"], f"format {self.describe()}")
        n_groups = int(g_idx.max()) + 1 if g_idx.numel() else 1
        c = check_shape(tensors["centroids"], (rows, n_groups, 2**self.bits), "centroids")
        if not torch.isfinite(c.float()).all():
            raise LowbitError(f"format {self.describe()}: non-finite centroids")
        return Encoded(self, unpack(tensors["qweight"], self.bits, cols), {"centroids": c}, g_idx.to(torch.int32))


@register
@dataclass(frozen=True)
class ColumnCodebook(Codebook):
    """CLAQ's column-wise codebooks: 2^k centroids per input column, shared by every row
    (params [1, cols, 2^k]). A group is one column (``group_size`` 1), so GPTQ's column
    loop fits each column's codebook to its error-updated values when it reaches it. The
    k-means is Codebook's, run on the column's values across rows. Storage: the codes, plus
    2^k float16 centroids per column (16·2^k / rows bits per weight)."""

    kind = "codebook-col"
    shares_rows: ClassVar[bool] = True  # one parameter set for all rows: never solve stacked matrices

    group_size: int | None = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size != 1:
            raise LowbitError(f"column codebooks group one column at a time (group size 1), got {self.group_size!r}")

    def describe(self) -> str:
        return f"codebook{self.bits}-col"

    @staticmethod
    def _columns(wg, mask):
        rows, groups, width = wg.shape
        x = wg.permute(1, 0, 2).reshape(1, groups, rows * width)
        m = None if mask is None else mask.repeat(1, rows)
        return x, m

    def fit(self, wg, mask=None, importance=None):
        x, m = self._columns(wg, mask)
        return super().fit(x, m)  # a per-column importance weighs every value of the column alike

    def kmeans_reference(self, wg, mask=None, importance=None):
        x, m = self._columns(wg, mask)
        return super().kmeans_reference(x, m)

    def encode(self, wg, params):
        return nearest_level(wg, self.levels(params).expand(wg.shape[0], -1, -1))

    def decode(self, codes, params):
        return torch.gather(self.levels(params).expand(codes.shape[0], -1, -1), 2, codes.long())

    def unpack(self, tensors, rows, cols, g_idx):
        pack_check(tensors, ["qweight", "centroids"], f"format {self.describe()}")
        n_groups = int(g_idx.max()) + 1 if g_idx.numel() else 1
        c = check_shape(tensors["centroids"], (1, n_groups, 2**self.bits), "centroids")
        if not torch.isfinite(c.float()).all():
            raise LowbitError(f"format {self.describe()}: non-finite centroids")
        return Encoded(self, unpack(tensors["qweight"], self.bits, cols), {"centroids": c}, g_idx.to(torch.int32))
