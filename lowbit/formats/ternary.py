"""Ternary weights alpha·{-1, 0, 1} with BitNet b1.58's absmean scale.

alpha = mean |W| over the group (BitNet b1.58 takes it over the whole matrix; here per
(row, group), group_size=None for one per row), stored in float16; the code is
q = RoundClip(W / alpha, -1, 1) + 1 in {0, 1, 2}, which is also the nearest of the three
values. An all-zero group gets alpha 0 and codes of 0.

Two packings of the codes, per row:
    pack="2bit": four codes per byte (formats.packing, 2 bits each)
    pack="tq1":  five trits per byte (1.6 bits), as llama.cpp's TQ1_0 stores them: the
                 base-3 number v = t0·81 + t1·27 + t2·9 + t3·3 + t4 (v < 243) is kept as
                 byte = ceil(v·256 / 243), so trit j is ((byte·3^j mod 256)·3) >> 8.
A row whose width is not a multiple of 5 is padded with zero trits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError
from .base import Encoded, WeightFormat, check_shape, group_weights, pack_check, register
from .integer import torch_dtype
from .packing import pack, unpack

POW3 = (81, 27, 9, 3, 1)


def pack_trits(t: torch.Tensor) -> torch.Tensor:
    """[rows, n] trits in {0, 1, 2} -> [rows, ceil(n / 5)] bytes."""
    rows, n = t.shape
    t = torch.nn.functional.pad(t.to(torch.int32), (0, (-n) % 5)).reshape(rows, -1, 5)
    v = (t * torch.tensor(POW3, dtype=torch.int32)).sum(-1)
    return ((v * 256 + 242) // 243).to(torch.uint8)


def unpack_trits(b: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_trits by TQ1_0's multiply-and-shift extraction."""
    x = b.to(torch.int32)
    parts = [((((x * (3**j)) & 0xFF) * 3) >> 8) for j in range(5)]
    return torch.stack(parts, -1).reshape(b.shape[0], -1)[:, :n].to(torch.uint8)


def unpack_trits_reference(b: torch.Tensor, n: int) -> torch.Tensor:
    """The plain inverse: v = floor(byte·243 / 256), then base-3 digits."""
    v = (b.to(torch.int64) * 243) // 256
    digits = [(v // p) % 3 for p in POW3]
    return torch.stack(digits, -1).reshape(b.shape[0], -1)[:, :n].to(torch.uint8)


@register
@dataclass(frozen=True)
class Ternary(WeightFormat):
    kind = "ternary"
    scale_keys = ("alpha",)

    group_size: int | None = 64
    packing: str = "2bit"
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.packing not in ("2bit", "tq1"):
            raise LowbitError(f"ternary packing must be 2bit or tq1, got {self.packing!r}")
        torch_dtype(self.scale_dtype)

    def describe(self) -> str:
        return f"ternary g{self.group_size or 'row'} {self.packing}"

    def fit(self, wg, mask=None, importance=None):
        m = group_weights(wg, mask, None)
        alpha = (wg.float().abs() * m).sum(-1) / m.sum(-1).clamp(min=1)
        return {"alpha": alpha.to(torch_dtype(self.scale_dtype))}

    def encode(self, wg, params):
        a = params["alpha"].float().unsqueeze(-1)
        q = torch.where(a > 0, torch.round(wg.float() / torch.where(a > 0, a, 1.0)).clamp(-1, 1), torch.zeros_like(wg))
        return (q + 1).to(torch.uint8)

    def levels(self, params):
        return torch.tensor([-1.0, 0.0, 1.0]) * params["alpha"].float().unsqueeze(-1)

    def decode(self, codes, params):
        return (codes.float() - 1) * params["alpha"].float().unsqueeze(-1)

    def affine(self, enc):
        alpha = enc.params["alpha"].float()
        return alpha, torch.ones_like(alpha), 2

    def pack(self, enc: Encoded) -> dict[str, torch.Tensor]:
        q = pack(enc.codes, 2) if self.packing == "2bit" else pack_trits(enc.codes)
        return {"qweight": q, "alpha": enc.params["alpha"].contiguous()}

    def unpack(self, tensors, rows, cols, g_idx):
        pack_check(tensors, ["qweight", "alpha"], f"format {self.describe()}")
        n_groups = int(g_idx.max()) + 1 if g_idx.numel() else 1
        alpha = check_shape(tensors["alpha"], (rows, n_groups), "alpha")
        q = tensors["qweight"]
        codes = unpack(q, 2, cols) if self.packing == "2bit" else unpack_trits(check_shape(q, (rows, -(-cols // 5)), "qweight"), cols)
        if codes.numel() and int(codes.max()) > 2:
            raise LowbitError(f"format {self.describe()}: codes outside {{0, 1, 2}}")
        return Encoded(self, codes, {"alpha": alpha}, g_idx.to(torch.int32))
