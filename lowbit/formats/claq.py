"""CLAQ's weights (Wang et al., 2024): per-column k-means codebooks, a width per column chosen
by its outliers, and the largest values of some columns kept in float16.

- **Column codebooks**: every input column has its own 2^b float16 centroids (k-means over
  the column's values, formats.codebook's fit), shared by all rows.
- **Adaptive precision** (``share_high``): columns are ranked by their outlier count, the
  number of |w| >= t · mean|W| (t = 13, the reference code's), and the top share gets
  ``high`` bits, the rest ``bits``. CLAQ's fractional settings: 2.1 bits = 5% of the
  columns at 4 bits and the rest at 2; 3.1 = 10% at 4 and the rest at 3
  (``claq_setting``).
- **Outlier reservation** (``reserve``): in the 10% of columns with the most outliers the
  top and bottom 1.4% of values, in the others 0.4%, are kept exactly in float16 (the
  reference's dynamic reservation: about 1% of the weights).

Storage, exactly counted: the codes of the columns of each width bit-packed per row
(``qweight_b{b}``), their centroids (``centroids_b{b}``, float16), ``col_bits`` (uint8 per
column), and for the kept values their rows (int16, or int32 past 32,767 rows), a count per
column (uint16) and the values (float16). The paper's bit counts leave the centroids and
the kept values' positions out; on a model of 576-wide rows the 2-bit centroids alone add
4 x 16 / 576 = 0.11 bits per weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import LowbitError
from .base import Encoded, WeightFormat, check_shape, nearest_level, pack_check, register
from .codebook import Codebook
from .packing import pack, unpack

T_OUTLIER = 13.0  # |w| >= 13 · mean|W| counts as an outlier (CLAQ's reference code)
RESERVE_TOP, RESERVE_HIGH, RESERVE_LOW = 0.10, 0.014, 0.004


def kmeans_column(col: torch.Tensor, L: int, iters: int) -> torch.Tensor:
    """float16 centroids (L, ascending) of one column's values by Lloyd's k-means.

    In one dimension each cluster is a run of the sorted values, so an iteration is a
    binary search of the L - 1 midpoints between neighbouring centroids (a value on a
    midpoint goes to the lower one; of equal centroids the first takes the values) and
    the means from prefix sums: O(L log n) after one sort. Start at the quantiles, as
    formats.codebook's fit; an empty cluster keeps its centroid; stop once the runs
    repeat (the centroids would not change)."""
    x = np.sort(col.detach().float().numpy().astype(np.float32))
    n = x.size
    cs = np.concatenate([[0.0], np.cumsum(x, dtype=np.float64)])
    rank = np.minimum(((np.arange(L, dtype=np.float32) + np.float32(0.5)) * np.float32(n) / np.float32(L)).astype(np.int64), n - 1)
    c = x[rank].astype(np.float32)
    prev = None
    for _ in range(iters):
        c = np.sort(c)
        ends = np.empty(L, dtype=np.int64)
        ends[:-1] = np.searchsorted(x, (c[:-1] + c[1:]) * np.float32(0.5), side="right")
        ends[-1] = n
        dup = np.nonzero(c[:-1] == c[1:])[0]
        for j in dup[::-1]:  # equal centroids: the first takes the run, the others stay empty
            ends[j] = ends[j + 1]
        if prev is not None and np.array_equal(ends, prev):
            break
        starts = np.concatenate([[0], ends[:-1]])
        cnt = ends - starts
        c = np.where(cnt > 0, (cs[ends] - cs[starts]) / np.maximum(cnt, 1), c).astype(np.float32)
        prev = ends
    return torch.from_numpy(np.sort(c)).to(torch.float16)


def claq_setting(avg: float) -> tuple[int, int, float]:
    """(bits, high, share_high) of CLAQ's fractional settings: 2 <= avg < 3 mixes 2 and 4
    bits, 3 <= avg <= 4 mixes 3 and 4, keeping the average code width at ``avg``."""
    if not 2 <= avg <= 4:
        raise LowbitError(f"CLAQ's adaptive precision takes 2 to 4 bits on average, got {avg}")
    return (2, 4, (avg - 2) / 2) if avg < 3 else (3, 4, avg - 3)


def outlier_counts(W: torch.Tensor, t: float = T_OUTLIER) -> torch.Tensor:
    return (W.abs() >= t * W.abs().mean()).sum(0)


def column_plan(W: torch.Tensor, bits: int, high: int, share_high: float, reserve: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(width per column uint8, share of each column's values kept at each tail)."""
    C = W.shape[1]
    order = torch.argsort(outlier_counts(W), descending=True, stable=True)
    widths = torch.full((C,), bits, dtype=torch.uint8)
    widths[order[: int(round(C * share_high))]] = high
    keep = torch.zeros(C)
    if reserve:
        keep[:] = RESERVE_LOW
        keep[order[: int(round(C * RESERVE_TOP))]] = RESERVE_HIGH
    return widths, keep


def reserved(col: torch.Tensor, share: float) -> torch.Tensor:
    """The values of one column kept exactly: at or above its round(n·share)-th largest, or
    at or below its round(n·(1 - share))-th (as the reference's quantize_outlier)."""
    if share <= 0:
        return torch.zeros_like(col, dtype=torch.bool)
    s = torch.sort(col, descending=True).values
    n = col.numel()
    upper, lower = s[min(int(round(n * share)), n - 1)], s[min(int(round(n * (1 - share))), n - 1)]
    return (col >= upper) | (col <= lower)


@register
@dataclass(frozen=True)
class CLAQ(WeightFormat):
    kind = "claq"
    shares_rows: ClassVar[bool] = True  # codebooks per column, for all rows
    column_params: ClassVar[bool] = True  # each column's width comes from a whole-matrix plan: --method claq
    method: ClassVar[str] = "claq"

    bits: int = 2
    high: int = 4
    share_high: float = 0.0
    reserve: bool = False
    iters: int = 20
    group_size: int | None = 1

    def __post_init__(self) -> None:
        if not (1 <= self.bits <= self.high <= 8):
            raise LowbitError(f"claq: widths must satisfy 1 <= bits <= high <= 8, got {self.bits} and {self.high}")
        if not 0 <= self.share_high <= 1:
            raise LowbitError(f"claq: share_high must be in [0, 1], got {self.share_high}")
        if self.group_size != 1:
            raise LowbitError(f"claq codebooks are per column (group size 1), got {self.group_size!r}")

    def describe(self) -> str:
        avg = self.bits + (self.high - self.bits) * self.share_high
        return f"claq {avg:g} bits" + (" + outliers" if self.reserve else "")

    def codebook(self, b: int) -> Codebook:
        return Codebook(bits=b, group_size=None, iters=self.iters)

    def fit_column(self, col: torch.Tensor, b: int) -> torch.Tensor:
        """2^b centroids of one column's values (k-means), padded to 2^high with the last.
        The same Lloyd iterations as formats.codebook's fit (quantile start, nearest
        centroid with ties to the lower code, means; an empty cluster keeps its centroid)
        on one column in numpy, stopped once the assignment repeats (the centroids then
        stay as they are): GPTQ's column loop calls this once per column."""
        c = kmeans_column(col, 2**b, self.iters)
        return torch.cat([c, c[-1:].expand(2**self.high - c.numel())])

    def fit_column_reference(self, col: torch.Tensor, b: int) -> torch.Tensor:
        """``fit_column`` through the batched codebook fit (tests compare the two)."""
        c = self.codebook(b).fit(col.reshape(1, 1, -1))["centroids"].reshape(-1)
        return torch.cat([c, c[-1:].expand(2**self.high - c.numel())])

    @staticmethod
    def nearest_code(col: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """Codes of one column on its ascending float16 centroids (``fit_column``'s): the
        nearest, a value on a midpoint and equal centroids to the lower code; one binary
        search per value instead of a distance to every centroid."""
        x = col.detach().float().numpy()
        c = centroids.float().numpy()
        j = np.searchsorted((c[:-1] + c[1:]) * np.float32(0.5), x, side="left")
        first = np.searchsorted(c, c, side="left")
        return torch.from_numpy(first[j].astype(np.uint8))

    # --- the matrix, round to nearest ----------------------------------------------------

    def quantize(self, w: torch.Tensor, name: str = "weight", importance=None) -> Encoded:
        from .base import check_weight

        w = check_weight(w, name, self)
        widths, keep = column_plan(w, self.bits, self.high, self.share_high, self.reserve)
        cents = torch.stack([self.fit_column(w[:, j], int(widths[j])) for j in range(w.shape[1])])
        params = {"centroids": cents.unsqueeze(0), "col_bits": widths.reshape(1, -1, 1)}
        codes = self.encode(w.unsqueeze(-1), params)[..., 0]
        kept = torch.stack([reserved(w[:, j], float(keep[j])) for j in range(w.shape[1])], 1)
        return self.with_kept(codes, params, w, kept)

    def with_kept(self, codes, params, values, kept) -> Encoded:
        cols, rows = torch.nonzero(kept.t(), as_tuple=True)  # column-major: by column, then row
        extra = {"kept_rows": rows.to(torch.int32), "kept_cols": cols.to(torch.int32),
                 "kept_values": values[rows, cols].to(torch.float16)}
        return Encoded(self, codes.to(torch.uint8), params, torch.arange(codes.shape[1], dtype=torch.int32), extra)

    def encode(self, wg, params):
        return nearest_level(wg, self.levels(params).expand(wg.shape[0], -1, -1))

    def levels(self, params):
        return params["centroids"].float()

    def decode(self, codes, params):
        return torch.gather(self.levels(params).expand(codes.shape[0], -1, -1), 2, codes.long())

    def decode_matrix(self, enc: Encoded) -> torch.Tensor:
        out = super().decode_matrix(enc)
        r, c = enc.extra.get("kept_rows"), enc.extra.get("kept_cols")
        if r is not None and r.numel():
            out[r.long(), c.long()] = enc.extra["kept_values"].float()
        return out

    # --- storage ------------------------------------------------------------------------------

    def pack(self, enc: Encoded) -> dict[str, torch.Tensor]:
        widths = enc.params["col_bits"].reshape(-1)
        out = {"col_bits": widths.contiguous()}
        for b in sorted(set(widths.tolist())):
            sel = widths == b
            out[f"qweight_b{b}"] = pack(enc.codes[:, sel].contiguous(), b)
            out[f"centroids_b{b}"] = enc.params["centroids"][0, sel, : 2**b].contiguous()
        rows, cols = enc.extra["kept_rows"], enc.extra["kept_cols"]
        if rows.numel():
            out["kept_rows"] = rows.to(torch.int16 if enc.codes.shape[0] <= 32767 else torch.int32)
            out["kept_counts"] = torch.bincount(cols.long(), minlength=enc.codes.shape[1]).to(torch.int32).to(torch.uint16)
            out["kept_values"] = enc.extra["kept_values"].contiguous()
        return out

    def unpack(self, tensors, rows, cols, g_idx):
        pack_check(tensors, ["col_bits"], f"format {self.describe()}")
        widths = check_shape(tensors["col_bits"], (cols,), "col_bits")
        if any(b not in (self.bits, self.high) for b in widths.tolist()):
            raise LowbitError(f"format {self.describe()}: column widths {sorted(set(widths.tolist()))} outside {{{self.bits}, {self.high}}}")
        codes = torch.empty(rows, cols, dtype=torch.uint8)
        cents = torch.empty(cols, 2**self.high, dtype=torch.float16)
        for b in sorted(set(widths.tolist())):
            sel = widths == b
            pack_check(tensors, [f"qweight_b{b}", f"centroids_b{b}"], f"format {self.describe()}")
            codes[:, sel] = unpack(tensors[f"qweight_b{b}"], b, int(sel.sum()))
            c = check_shape(tensors[f"centroids_b{b}"], (int(sel.sum()), 2**b), f"centroids_b{b}")
            cents[sel] = torch.cat([c, c[:, -1:].expand(-1, 2**self.high - 2**b)], 1)
        if not torch.isfinite(cents.float()).all():
            raise LowbitError(f"format {self.describe()}: non-finite centroids")
        params = {"centroids": cents.unsqueeze(0), "col_bits": widths.reshape(1, -1, 1)}
        if "kept_rows" in tensors:
            counts = check_shape(tensors["kept_counts"], (cols,), "kept_counts").to(torch.int64)
            r = tensors["kept_rows"].to(torch.int32)
            if r.numel() != int(counts.sum()) or (r.numel() and (int(r.min()) < 0 or int(r.max()) >= rows)):
                raise LowbitError(f"format {self.describe()}: kept values do not match their counts or rows")
            c = torch.repeat_interleave(torch.arange(cols, dtype=torch.int32), counts)
            extra = {"kept_rows": r, "kept_cols": c, "kept_values": check_shape(tensors["kept_values"], (r.numel(),), "kept_values")}
        else:
            extra = {"kept_rows": torch.zeros(0, dtype=torch.int32), "kept_cols": torch.zeros(0, dtype=torch.int32),
                     "kept_values": torch.zeros(0, dtype=torch.float16)}
        return Encoded(self, codes, params, g_idx.to(torch.int32), extra)
