"""Per-group mixed bit widths inside one matrix (SliM-LLM's 1/2/3-bit groups).

Each group of ``group_size`` input columns (shared by all rows) gets its own width from
``choices``; within a group every (row, group) is an asymmetric integer grid of that width
(scale float16, zero point), exactly as the ``int`` format. Allocation, as SliM-LLM's
salience rule: groups are ranked by salience sum(importance · w^2) (importance: the
Hessian diagonal when GPTQ passes it, else 1), and with choices (1, 2, 3) the top
``share`` of groups take 3 bits, the bottom ``share`` 1 bit and the rest 2, so the mean
code width stays 2 bits.

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

    def __post_init__(self) -> None:
        if not self.choices or any(not isinstance(b, int) or not 1 <= b <= 8 for b in self.choices):
            raise LowbitError(f"mixed: bit choices must be integers 1 to 8, got {self.choices!r}")
        if not 0 <= self.share <= 0.5:
            raise LowbitError(f"mixed: share must be in [0, 0.5], got {self.share!r}")
        object.__setattr__(self, "choices", tuple(self.choices))

    def describe(self) -> str:
        return f"mixed{'/'.join(map(str, self.choices))} g{self.group_size or 'row'}"

    def fit(self, wg, mask=None, importance=None):
        rows, G, _ = wg.shape
        m = group_weights(wg, mask, importance)
        salience = (wg.float().pow(2) * m).sum((0, 2))
        bits = allocate_bits(salience, self.choices, self.share)
        pad = None if mask is None else (mask == 0)
        w = wg.float()
        lo = (w if pad is None else w.masked_fill(pad, float("inf"))).amin(-1)
        hi = (w if pad is None else w.masked_fill(pad, float("-inf"))).amax(-1)
        scale = torch.empty(rows, G, dtype=torch.float16)
        zero = torch.empty(rows, G)
        for b in sorted(set(bits.tolist())):
            sel = bits == b
            s, z = qparams_from_range(lo[:, sel], hi[:, sel], IntGrid(b, symmetric=False), torch.float16)
            scale[:, sel], zero[:, sel] = s, z
        qmax = (2 ** bits.float() - 1).expand(rows, G).contiguous()
        return {"scale": scale, "zero": zero, "qmax": qmax}

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
