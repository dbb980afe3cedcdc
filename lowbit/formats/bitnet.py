"""BitNet's weights, as the papers define them: one scale for the whole matrix.

- ``bitnet`` (BitNet, Wang et al. 2023, BitLinear): W~ = Sign(W - alpha), alpha = mean(W),
  and the layer's output scaled by beta = mean |W|: the value of a weight is beta·(±1).
- ``bitnet158`` (BitNet b1.58, Ma et al. 2024): W~ = RoundClip(W / (gamma + eps), -1, 1),
  gamma = mean |W|, eps = 1e-5: the value is gamma·{-1, 0, 1}.

Both papers take the statistics over the whole matrix, so the parameters are one per
matrix ([1, 1], shared by every row: ``shares_rows``), stored in float32 (beta and alpha, or
gamma). Codes: 1 bit (packed 8 per byte) or a trit (packed 4 per byte, 2 bits, as the
2-bit ternary format). Their activations are 8-bit absmax per token (ActSpec bits=8,
symmetric, per token), which ``lowbit qat --act-bits 8`` trains with. Ternarizing or
binarizing a pretrained model without training leaves it near random: these formats are
meant for QAT (lowbit.training.qat), and ``--method rtn`` only gives its starting point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import LowbitError
from .base import Encoded, WeightFormat, check_shape, group_weights, pack_check, register
from .packing import pack, unpack

EPS = 1e-5


@register
@dataclass(frozen=True)
class BitNet(WeightFormat):
    kind = "bitnet"
    shares_rows: ClassVar[bool] = True  # one scale per matrix

    ternary: bool = False  # False: BitNet's 1 bit; True: BitNet b1.58's trits
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.group_size is not None:
            raise LowbitError(f"BitNet scales whole matrices (no groups), got group size {self.group_size!r}")

    def describe(self) -> str:
        return "bitnet b1.58 (ternary, per tensor)" if self.ternary else "bitnet (1-bit, per tensor)"

    def fit(self, wg, mask=None, importance=None):
        m = group_weights(wg, mask, None).expand_as(wg)
        n = m.sum().clamp(min=1)
        w = wg.float()
        scale = ((w.abs() * m).sum() / n).reshape(1, 1)
        if self.ternary:
            return {"gamma": scale}
        return {"beta": scale, "alpha": ((w * m).sum() / n).reshape(1, 1)}

    def encode(self, wg, params):
        w = wg.float()
        if self.ternary:
            g = params["gamma"].float().unsqueeze(-1)
            return (torch.round(w / (g + EPS)).clamp(-1, 1) + 1).to(torch.uint8)
        return (w - params["alpha"].float().unsqueeze(-1) >= 0).to(torch.uint8)

    def levels(self, params):
        if self.ternary:
            return torch.tensor([-1.0, 0.0, 1.0]) * params["gamma"].float().unsqueeze(-1)
        return torch.tensor([-1.0, 1.0]) * params["beta"].float().unsqueeze(-1)

    def decode(self, codes, params):
        lv = self.levels(params).expand(codes.shape[0], codes.shape[1], -1)
        return torch.gather(lv, 2, codes.long())

    def affine(self, enc):
        rows = enc.codes.shape[0]
        if self.ternary:  # gamma·(code - 1)
            g = enc.params["gamma"].float().reshape(1, 1).expand(rows, 1).contiguous()
            return g, torch.ones_like(g), 2
        b = enc.params["beta"].float().reshape(1, 1).expand(rows, 1).contiguous()  # beta·(2·code - 1)
        return 2 * b, torch.full_like(b, 0.5), 1

    def pack(self, enc: Encoded) -> dict[str, torch.Tensor]:
        keys = ("gamma",) if self.ternary else ("beta", "alpha")
        return {"qweight": pack(enc.codes, 2 if self.ternary else 1), **{k: enc.params[k].contiguous() for k in keys}}

    def unpack(self, tensors, rows, cols, g_idx):
        keys = ["gamma"] if self.ternary else ["beta", "alpha"]
        pack_check(tensors, ["qweight", *keys], f"format {self.describe()}")
        params = {k: check_shape(tensors[k], (1, 1), k) for k in keys}
        if not all(torch.isfinite(v).all() for v in params.values()):
            raise LowbitError(f"format {self.describe()}: non-finite scale")
        codes = unpack(tensors["qweight"], 2 if self.ternary else 1, cols)
        if self.ternary and codes.numel() and int(codes.max()) > 2:
            raise LowbitError(f"format {self.describe()}: codes outside {{0, 1, 2}}")
        return Encoded(self, codes, params, g_idx.to(torch.int32))
