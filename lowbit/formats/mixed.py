"""Per-group mixed bit widths inside one matrix (SliM-LLM's 1/2/3-bit groups).

Each group of ``group_size`` input columns (shared by all rows) gets its own width from
``choices``; within a group every (row, group) is an asymmetric integer grid of that width
(scale float16, zero point), exactly as the ``int`` format. importance is the Hessian
diagonal when GPTQ passes it (SliM-LLM runs on GPTQ), else 1.

Allocation (``alloc``):
- ``"error"`` (default): the budget is per weight, ``target`` bits on average (default the
  middle choice: 2 for 1/2/3), counted over the real columns, so a narrower last group
  (SmolLM2's 576 = 4 x 128 + 64) costs what it holds. Each group's salience-weighted error
  sum(importance · (w - Q_b(w))^2) is measured at every width b, and the widths with the
  least total error within the budget are chosen exactly (formats.budget, a knapsack).
  SliM-LLM's own search moves groups up and down in pairs around the mean, which on five
  groups of unequal width has one move left; this keeps its objective (salience-weighted
  error, average kept at the target) without that restriction.
- ``"share"``: the salience rule of the paper's first step: groups ranked by sum(importance
  · w^2), the top ``share`` take the widest choice, the bottom ``share`` the narrowest.

Quantizer calibration (SliM-LLM's SQC, ``clip_search``): each (row, group)'s range is
shrunk by the ratio in 1.0, 0.95, ..., 0.55 with the least importance-weighted error.

Storage, exact: for each width b the codes of the groups of that width, bit-packed per row
(``qweight_b{b}``); ``group_bits`` uint8 per group; scales float16 and zero points uint8
per (row, group).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import LowbitError
from .base import Encoded, WeightFormat, check_shape, group_weights, pack_check, register
from .integer import IntGrid, qparams_from_range
from .packing import pack, unpack


def allocate_bits(salience: torch.Tensor, choices: tuple[int, ...], share: float) -> torch.Tensor:
    """Width per group from its salience: the top ``share`` get the widest choice, the bottom
    ``share`` the narrowest, the rest the middle one (ties by group index)."""
    G = salience.numel()
    lo, mid, hi = min(choices), sorted(choices)[len(choices) // 2], max(choices)
    order = torch.argsort(salience, descending=True, stable=True)
    k = int(round(share * G))
    bits = torch.full((G,), mid, dtype=torch.uint8)
    bits[order[:k]] = hi
    if k:
        bits[order[G - k :]] = lo
    return bits


@register
@dataclass(frozen=True)
class MixedInt(WeightFormat):
    kind = "mixed"
    static_params: ClassVar[bool] = True  # widths are chosen over the whole matrix

    choices: tuple[int, ...] = (1, 2, 3)
    group_size: int | None = 64
    share: float = 0.25
    alloc: str = "error"
    target: float | None = None  # average bits per weight of the codes; None: the middle choice
    clip_search: bool = True

    def __post_init__(self) -> None:
        if not self.choices or any(not isinstance(b, int) or not 1 <= b <= 8 for b in self.choices):
            raise LowbitError(f"mixed: bit choices must be integers 1 to 8, got {self.choices!r}")
        if not 0 <= self.share <= 0.5:
            raise LowbitError(f"mixed: share must be in [0, 0.5], got {self.share!r}")
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.alloc not in ("error", "share"):
            raise LowbitError(f"mixed: alloc must be error or share, got {self.alloc!r}")
        if self.target is not None and not min(self.choices) <= self.target <= max(self.choices):
            raise LowbitError(f"mixed: target {self.target} outside the choices {self.choices}")

    def describe(self) -> str:
        return f"mixed{'/'.join(map(str, self.choices))} g{self.group_size or 'row'}" + (" (share rule)" if self.alloc == "share" else "")

    def fit(self, wg, mask=None, importance=None):
        rows, G, W = wg.shape
        m = group_weights(wg, mask, importance)  # [1, G, W]: mask times importance
        w = wg.float()
        pad = None if mask is None else (mask == 0)
        lo = (w if pad is None else w.masked_fill(pad, float("inf"))).amin(-1)
        hi = (w if pad is None else w.masked_fill(pad, float("-inf"))).amax(-1)
        fits = {b: self._fit_width(w, m, lo, hi, b) for b in sorted(set(self.choices))}
        if self.alloc == "share":
            salience = (w.pow(2) * m).sum((0, 2))
            bits = allocate_bits(salience, self.choices, self.share)
        else:
            widths = torch.full((G,), float(W)) if mask is None else mask.float().sum(-1)
            bits = self._allocate_by_error(fits, widths)
        scale = torch.empty(rows, G, dtype=torch.float16)
        zero = torch.empty(rows, G)
        for b in sorted(set(bits.tolist())):
            sel = bits == b
            scale[:, sel], zero[:, sel] = fits[b][0][:, sel], fits[b][1][:, sel]
        qmax = (2 ** bits.float() - 1).expand(rows, G).contiguous()
        return {"scale": scale, "zero": zero, "qmax": qmax}

    def _fit_width(self, w, m, lo, hi, b):
        """(scale, zero, error per group) of every (row, group) at width b: the min-max range,
        shrunk by the ratio with the least importance-weighted error when clip_search is on."""
        grid = IntGrid(b, symmetric=False)
        best = None
        for r in (1.0 - 0.05 * i for i in range(10 if self.clip_search else 1)):
            s, z = qparams_from_range(lo * r, hi * r, grid, torch.float16)
            q = torch.clamp(torch.round(w / s.float().unsqueeze(-1)) + z.unsqueeze(-1), 0, 2**b - 1)
            err = ((w - (q - z.unsqueeze(-1)) * s.float().unsqueeze(-1)).pow(2) * m).sum(-1)  # [rows, G]
            if best is None:
                best = [s, z, err]
            else:
                better = err < best[2]
                best[0], best[1], best[2] = torch.where(better, s, best[0]), torch.where(better, z, best[1]), torch.minimum(err, best[2])
        return best[0], best[1], best[2].sum(0)  # error summed over rows, per group

    def _allocate_by_error(self, fits, widths):
        """Widths per group: least total error with sum(b_g · real columns_g) <= target · columns."""
        from .budget import solve

        G = widths.numel()
        choices = sorted(set(self.choices))
        target = self.target if self.target is not None else sorted(self.choices)[len(self.choices) // 2]
        table = {g: [(str(b), float(fits[b][2][g]), int(b * int(widths[g]))) for b in choices] for g in range(G)}
        choice = solve(table, target * float(widths.sum()))
        return torch.tensor([choices[choice[g]] for g in range(G)], dtype=torch.uint8)

    def encode(self, wg, params):
        s, z, qmax = (params[k].float().unsqueeze(-1) for k in ("scale", "zero", "qmax"))
        q = torch.round(wg.float() / s) + z
        return torch.minimum(torch.clamp(q, min=0), qmax).to(torch.uint8)

    def decode(self, codes, params):
        return (codes.float() - params["zero"].float().unsqueeze(-1)) * params["scale"].float().unsqueeze(-1)

    def levels(self, params):
        L = 2 ** max(self.choices)
        q = torch.arange(L, dtype=torch.float32)
        q = torch.minimum(q, params["qmax"].float().unsqueeze(-1))  # codes past a group's width repeat its top
        return (q - params["zero"].float().unsqueeze(-1)) * params["scale"].float().unsqueeze(-1)

    def _col_bits(self, enc: Encoded) -> torch.Tensor:
        group_bits = (enc.params["qmax"][0] + 1).log2().round().to(torch.uint8)
        return group_bits, group_bits[enc.g_idx.long()]

    def pack(self, enc: Encoded) -> dict[str, torch.Tensor]:
        group_bits, col_bits = self._col_bits(enc)
        out = {"group_bits": group_bits.contiguous(), "scales": enc.params["scale"].contiguous(), "zeros": enc.params["zero"].to(torch.uint8).contiguous()}
        for b in sorted(set(group_bits.tolist())):
            out[f"qweight_b{b}"] = pack(enc.codes[:, col_bits == b].contiguous(), b)
        return out

    def unpack(self, tensors, rows, cols, g_idx):
        pack_check(tensors, ["group_bits", "scales", "zeros"], f"format {self.describe()}")
        G = int(g_idx.max()) + 1 if g_idx.numel() else 1
        group_bits = check_shape(tensors["group_bits"], (G,), "group_bits")
        if any(b not in self.choices for b in group_bits.tolist()):
            raise LowbitError(f"format {self.describe()}: group widths {sorted(set(group_bits.tolist()))} outside {self.choices}")
        col_bits = group_bits[g_idx.long()]
        codes = torch.empty(rows, cols, dtype=torch.uint8)
        for b in sorted(set(group_bits.tolist())):
            sel = col_bits == b
            pack_check(tensors, [f"qweight_b{b}"], f"format {self.describe()}")
            codes[:, sel] = unpack(tensors[f"qweight_b{b}"], b, int(sel.sum()))
        params = {
            "scale": check_shape(tensors["scales"], (rows, G), "scales"),
            "zero": check_shape(tensors["zeros"], (rows, G), "zeros").float(),
            "qmax": (2 ** group_bits.float() - 1).expand(rows, G).contiguous(),
        }
        return Encoded(self, codes, params, g_idx.to(torch.int32))
