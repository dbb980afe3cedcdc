"""Sparse float outliers on top of any format: W = decode(base) with a few weights replaced
by exact float16 values, stored as (row, column, value) triples.

The ``count`` (or ``fraction``) weights of largest |w| (largest importance · w^2 when an
importance is given, SqueezeLLM's sensitivity) are taken out first: the base format is fitted
on the matrix with them zeroed, so they stop widening their groups' ranges, and they decode
to their float16 value. Storage, exact: rows and columns int16 (int32 past 32767), values
float16, 6 (or 10) bytes per outlier, plus the base format's own tensors (``base.*``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError
from .base import Encoded, WeightFormat, check_weight, default_g_idx, pack_check, quantize_matrix


@dataclass
class OutlierWeight:
    """A base Encoded weight plus its outliers; decodes like Encoded."""

    fmt: WithOutliers
    base: Encoded
    rows: torch.Tensor  # [k] int64
    cols: torch.Tensor  # [k] int64
    values: torch.Tensor  # [k] float16

    @property
    def codes(self) -> torch.Tensor:
        return self.base.codes

    @property
    def g_idx(self) -> torch.Tensor:
        return self.base.g_idx

    def dequantize(self) -> torch.Tensor:
        w = self.base.dequantize().clone()
        w[self.rows, self.cols] = self.values.float()
        return w


@dataclass(frozen=True)
class WithOutliers:
    """Not in the registry by name: wraps any registered format (``WithOutliers(make_format("bcq", bits=2), 0.005)``)."""

    base: WeightFormat
    fraction: float = 0.005

    def __post_init__(self) -> None:
        if not 0 <= self.fraction < 1:
            raise LowbitError(f"outlier fraction must be in [0, 1), got {self.fraction!r}")

    @property
    def group_size(self):
        return self.base.group_size

    def describe(self) -> str:
        return f"{self.base.describe()} +{100 * self.fraction:g}% fp16 outliers"

    def quantize(self, w: torch.Tensor, name: str = "weight", importance: torch.Tensor | None = None) -> OutlierWeight:
        w = check_weight(w, name, self.base)
        k = int(round(self.fraction * w.numel()))
        score = w.pow(2) * (1 if importance is None else importance.float().unsqueeze(0))
        flat = torch.argsort(score.reshape(-1), descending=True, stable=True)[:k]
        flat = torch.sort(flat).values  # row-major order: deterministic storage
        rows, cols = flat // w.shape[1], flat % w.shape[1]
        inner = w.clone()
        inner[rows, cols] = 0
        base = quantize_matrix(self.base, inner, name, importance=importance)
        return OutlierWeight(self, base, rows, cols, w[rows, cols].to(torch.float16))

    def pack(self, ow: OutlierWeight) -> dict[str, torch.Tensor]:
        big = max(ow.base.codes.shape) > 32767
        it = torch.int32 if big else torch.int16
        out = {f"base.{k}": v for k, v in self.base.pack(ow.base).items()}
        out.update({"outlier_rows": ow.rows.to(it), "outlier_cols": ow.cols.to(it), "outlier_values": ow.values.contiguous()})
        return out

    def unpack(self, tensors, rows: int, cols: int, g_idx: torch.Tensor | None = None) -> OutlierWeight:
        pack_check(tensors, ["outlier_rows", "outlier_cols", "outlier_values"], f"format {self.describe()}")
        g_idx = default_g_idx(cols, self.base.group_size) if g_idx is None else g_idx
        base = self.base.unpack({k[5:]: v for k, v in tensors.items() if k.startswith("base.")}, rows, cols, g_idx)
        r, c, v = (tensors[k] for k in ("outlier_rows", "outlier_cols", "outlier_values"))
        if not (r.shape == c.shape == v.shape) or r.dim() != 1:
            raise LowbitError(f"format {self.describe()}: outlier rows, columns and values differ in shape")
        if r.numel() and (int(r.min()) < 0 or int(r.max()) >= rows or int(c.min()) < 0 or int(c.max()) >= cols):
            raise LowbitError(f"format {self.describe()}: outlier positions outside the {rows}x{cols} matrix")
        return OutlierWeight(self, base, r.long(), c.long(), v)

    def nbytes(self, ow: OutlierWeight) -> int:
        return sum(t.numel() * t.element_size() for t in self.pack(ow).values())

    def bits_per_weight(self, ow: OutlierWeight) -> float:
        return 8.0 * self.nbytes(ow) / ow.base.codes.numel()
