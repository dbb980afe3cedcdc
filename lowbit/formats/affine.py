"""Affine integer grids as a format of the family: value = (q - z)·s per (row, group).

This is today's ``formats.weights`` path seen through the format interface, computed with
the same functions (``qparams_from_range``, ``mse_qparams``, ``quantize``), so codes, scales
and zero points are bit-identical with ``quantize_weight`` and the checkpoint tensors
(``qweight``, ``scales``, ``qzeros``) are the ones format version 1 writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import WeightSpec
from .base import Encoded, WeightFormat, check_shape, pack_check, register
from .integer import IntGrid, dequantize, qparams_from_range, quantize, torch_dtype
from .packing import pack, unpack
from .weights import mse_qparams


@register
@dataclass(frozen=True)
class AffineInt(WeightFormat):
    kind = "int"
    scale_keys = ("scale",)

    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = True
    restricted: bool = False
    observer: str = "minmax"
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        WeightSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, restricted=self.restricted,
                   observer=self.observer, scale_dtype=self.scale_dtype)  # validates

    @classmethod
    def from_spec(cls, spec: WeightSpec) -> AffineInt:
        return cls(spec.bits, spec.group_size, spec.symmetric, spec.restricted, spec.observer, spec.scale_dtype)

    @property
    def grid(self) -> IntGrid:
        return IntGrid(self.bits, symmetric=self.symmetric, restricted=self.restricted)

    def describe(self) -> str:
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        kind = ("sym-restricted" if self.restricted else "sym") if self.symmetric else "asym"
        return f"int{self.bits} {g} {kind}"

    def fit(self, wg, mask=None, importance=None):
        wg = wg.float()
        if mask is None:
            lo, hi = wg.amin(-1), wg.amax(-1)
        else:
            pad = mask == 0
            lo = wg.masked_fill(pad, float("inf")).amin(-1)
            hi = wg.masked_fill(pad, float("-inf")).amax(-1)
        sdt = torch_dtype(self.scale_dtype)
        if self.observer == "minmax":
            scale, zero = qparams_from_range(lo, hi, self.grid, sdt)
        else:  # the clipping search of formats.weights, on the grouped layout
            rows, groups, width = wg.shape
            g_idx = torch.arange(groups, dtype=torch.int32).repeat_interleave(width)
            scale, zero = mse_qparams(wg.reshape(rows, groups * width), lo, hi, self.grid, sdt, g_idx, groups)
        return {"scale": scale, "zero": zero}

    def encode(self, wg, params):
        return quantize(wg, params["scale"].float().unsqueeze(-1), params["zero"].float().unsqueeze(-1), self.grid)

    def decode(self, codes, params):
        return dequantize(codes, params["scale"].float().unsqueeze(-1), params["zero"].float().unsqueeze(-1))

    def levels(self, params):
        q = torch.arange(self.grid.qmin, self.grid.qmax + 1, dtype=torch.float32)
        lv = (q - params["zero"].float().unsqueeze(-1)) * params["scale"].float().unsqueeze(-1)
        if self.grid.qmin:  # codes index levels directly: pad code 0 with its clamped value
            lv = torch.cat([lv[..., :1], lv], -1)
        return lv

    def pack(self, enc: Encoded) -> dict[str, torch.Tensor]:
        out = {"qweight": pack(enc.codes, self.bits), "scales": enc.params["scale"].contiguous()}
        if not self.symmetric:
            out["qzeros"] = pack(enc.params["zero"].to(torch.uint8), self.bits)
        return out

    def unpack(self, tensors, rows, cols, g_idx):
        pack_check(tensors, ["qweight", "scales"] + ([] if self.symmetric else ["qzeros"]), f"format {self.describe()}")
        n_groups = int(g_idx.max()) + 1 if g_idx.numel() else 1
        scale = check_shape(tensors["scales"], (rows, n_groups), "scales")
        if self.symmetric:
            zero = torch.full((rows, n_groups), float(self.grid.sym_zero))
        else:
            zero = unpack(tensors["qzeros"], self.bits, n_groups).float()
        codes = unpack(tensors["qweight"], self.bits, cols)
        return Encoded(self, codes, {"scale": scale, "zero": zero}, g_idx.to(torch.int32))
