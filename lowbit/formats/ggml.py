"""GGML block types (llama.cpp's Q4_0 ... Q8_0, Q2_K ... Q6_K) as formats of the family.

A GGML type stores each row as blocks: a legacy block of 32 weights with one fp16 scale
(and min), or a k-quant super-block of 256 weights whose sub-blocks of 16 or 32 carry
small integer scales multiplied by the super-block's fp16 ``d`` (and ``dmin``). Every
weight then decodes as an affine function of its integer code (formats.gguf.grid):

    weight = scale * (code - zero) + offset,   constant over one sub-block

So in the family's terms a *group* is a sub-block (``group_size`` = 32 or 16), and its
parameters are that (scale, offset). What sets the type apart is that the parameters are
not free per group: a super-block's sub-block scales are quantized together, against
``d``. They are therefore chosen for the whole matrix at once, by lowbit's GGML codec
(``quantize_tensor``: llama.cpp's searches, weighted by the importance when one is given,
and by a uniform importance under ``search="weighted"``), which is what
``static_params`` tells GPTQ: it fixes them up front and picks the codes on them.

The stored form is exactly the GGUF tensor's bytes (``ggml``, uint8 [rows, row_bytes]),
codes written into the scale fields the codec chose; ``lowbit export gguf`` copies them
into the file unchanged. Encoded.codes hold ``code - qmin`` (Q8_0's codes run -127..127).

IQ4_NL (a non-uniform table) is not in the family yet: it has no affine grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import LowbitError
from .base import Encoded, WeightFormat, check_shape, check_weight, default_g_idx, pack_check, register
from .gguf import codec_for, quantize_tensor
from .gguf.grid import _entry, codes_of, grid_of, grid_types, with_codes

SEARCHES = ("weighted", "llama.cpp")


def sub_block(qtype: str) -> int:
    """Width of the runs of weights that share one (scale, offset)."""
    codec = codec_for(qtype)
    return 16 if codec.name in ("Q2_K", "Q3_K", "Q6_K") else 32


@register
@dataclass(frozen=True)
class GGMLType(WeightFormat):
    kind = "ggml"
    static_params: ClassVar[bool] = True

    type: str = "Q4_K"
    search: str = "weighted"  # tensors without an importance: llama.cpp's searches with a uniform one, or its plain rounding

    def __post_init__(self) -> None:
        if self.type not in grid_types():
            raise LowbitError(f"GGML type {self.type!r} is not a lowbit weight format; choose from {', '.join(grid_types())}")
        if self.search not in SEARCHES:
            raise LowbitError(f"GGML search must be one of {', '.join(SEARCHES)}, got {self.search!r}")

    @property
    def group_size(self) -> int:  # type: ignore[override]
        return sub_block(self.type)

    @property
    def block_size(self) -> int:
        return codec_for(self.type).block_size

    def _grid(self):
        _, (_, zero, qmin, qmax, _, _) = _entry(self.type)
        return zero, qmin, qmax

    def describe(self) -> str:
        return self.type

    def to_dict(self):
        return {"kind": self.kind, "type": self.type, "search": self.search}

    # --- the whole matrix at once ---------------------------------------------------

    def quantize(self, w: torch.Tensor, name: str = "weight", importance: torch.Tensor | None = None) -> Encoded:
        """The codec's own quantization of w [rows, cols]: its scales and its codes."""
        w = check_weight(w, name, self)
        rows, cols = w.shape
        if cols % self.block_size:
            raise LowbitError(
                f"layer {name}: input width {cols} is not a multiple of {self.type}'s {self.block_size}-wide blocks "
                f"(a llama.cpp mixture such as Q4_K_M falls back to a type that fits)"
            )
        imp = None
        if importance is not None:
            imp = importance.detach().float().numpy()
        elif self.search == "weighted":
            imp = np.ones(cols, dtype=np.float32)
        raw = quantize_tensor(w.numpy(), self.type, imp)
        return self.from_raw(torch.from_numpy(raw), rows, cols)

    def from_raw(self, raw: torch.Tensor, rows: int, cols: int) -> Encoded:
        """An Encoded weight from GGUF tensor bytes (uint8 [rows, row_bytes])."""
        r = raw.numpy()
        grid = grid_of(r, self.type, (rows, cols))
        _, qmin, _ = self._grid()
        gs = self.group_size
        params = {
            "scale": torch.from_numpy(np.ascontiguousarray(grid.scale.reshape(rows, cols // gs, gs)[:, :, :1])),
            "offset": torch.from_numpy(np.ascontiguousarray(grid.offset.reshape(rows, cols // gs, gs)[:, :, :1])),
        }
        codes = torch.from_numpy((codes_of(r, self.type, (rows, cols)) - qmin).astype(np.uint8))
        return Encoded(self, codes, params, default_g_idx(cols, gs), {"ggml": raw.clone()})

    def fit(self, wg, mask=None, importance=None):
        raise LowbitError(f"{self.type}: scales are chosen for whole matrices (quantize_matrix), not group by group")

    # --- per weight -------------------------------------------------------------------

    def encode(self, wg, params):
        """Nearest code on the group's grid (a group whose scale is 0 takes code ``zero``),
        with the arithmetic of formats.gguf.grid.AffineGrid.nearest."""
        zero, qmin, qmax = self._grid()
        scale, offset = params["scale"].float(), params["offset"].float()
        live = scale != 0
        step = torch.where(live, scale, torch.ones_like(scale))
        q = torch.round((wg.float() - offset) / step) + zero
        q = torch.where(live, q.clamp(qmin, qmax), torch.full_like(q, float(zero)))
        return (q - qmin).to(torch.uint8)

    def decode(self, codes, params):
        """scale * (code - zero) + offset in float32, operation for operation the GGML decoder's."""
        zero, qmin, _ = self._grid()
        return params["scale"].float() * (codes.to(torch.int32) + (qmin - zero)).float() + params["offset"].float()

    def levels(self, params):
        zero, qmin, qmax = self._grid()
        q = torch.arange(qmin - zero, qmax - zero + 1, dtype=torch.float32)
        return params["scale"].float() * q + params["offset"].float()

    # --- storage ----------------------------------------------------------------------

    def pack(self, enc: Encoded) -> dict[str, torch.Tensor]:
        _, qmin, _ = self._grid()
        raw = enc.extra.get("ggml")
        if raw is None:
            raise LowbitError(f"{self.type}: this weight has no GGML scale fields to write its codes into")
        codes = enc.codes.numpy().astype(np.int32) + qmin
        return {"ggml": torch.from_numpy(with_codes(raw.numpy(), self.type, codes))}

    def unpack(self, tensors, rows, cols, g_idx):
        pack_check(tensors, ["ggml"], f"format {self.type}")
        codec = codec_for(self.type)
        if cols % codec.block_size:
            raise LowbitError(f"format {self.type}: width {cols} is not a multiple of its block size {codec.block_size}")
        raw = check_shape(tensors["ggml"], (rows, cols // codec.block_size * codec.type_size), f"{self.type} bytes")
        if raw.dtype != torch.uint8:
            raise LowbitError(f"format {self.type}: bytes must be uint8, got {raw.dtype}")
        return self.from_raw(raw.contiguous(), rows, cols)
