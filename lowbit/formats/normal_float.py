"""NF4 and FP4 as bitsandbytes defines them, with its double quantization of the constants.

A block of ``blocksize`` (64) weights of one row stores its absmax (float32) and one 4-bit
index per weight into a fixed 16-value table; value = table[code] * absmax. The tables are
those of the QLoRA paper / bitsandbytes: NF4 the normal-quantile table, FP4 the values of a
1-2-1 (sign, exponent, mantissa) float with bias 2, in bit-pattern order, scaled to max 1.

Rounding as bitsandbytes' quantize_4bit (CPU/default backend): scaled = clamp(w * (1 /
max(absmax, 1e-38)), -1, 1), code = bucketize(scaled, midpoints of the sorted table), so a
value exactly on a midpoint takes the lower value; FP4 maps sorted positions back to its
bit-pattern codes (a stable sort: +0 before -0). An all-zero block gets absmax 0 and the
code of 0.

Double quantization (``double_quant``, QLoRA): the absmax constants of the whole matrix,
in row-major block order, minus their mean (the offset), are quantized in blocks of 256 to
8 bits on bitsandbytes' signed dynamic map, as its CPU kernel does: a 65,536-bin table of
nearest map entries over [-1, 1]. Decoding uses absmax = map[q2] * absmax2 + offset.
Blocks are per row: where a row's width is a multiple of 64 this is exactly bitsandbytes'
blocking of the flattened weight; otherwise the last block of each row is narrower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import LowbitError
from .base import Encoded, WeightFormat, check_shape, pack_check, register
from .packing import pack, unpack

NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# FP4 (e2m1, bias 2) in bit-pattern order before normalization by its max, 12
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
NESTED_BLOCK = 256


def table(kind: str) -> torch.Tensor:
    if kind == "nf4":
        t = torch.tensor(NF4_TABLE, dtype=torch.float32)
    else:
        t = torch.tensor(FP4_RAW, dtype=torch.float32)
    return t / t.abs().max()


@lru_cache(maxsize=4)
def _bounds(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = table(kind)
    order = torch.argsort(code, stable=True)
    return (code[order[:-1]] + code[order[1:]]) / 2, order


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(True, 7, 8)): for
    exponent i = 0..6, the midpoints of linspace(0.1, 1, 2^i + 1) times 10^(i-6), both
    signs, plus 0 and 1; 256 sorted values."""
    data: list[float] = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@lru_cache(maxsize=1)
def _dynamic_lut() -> tuple[torch.Tensor, torch.Tensor]:
    """(map, lut): lut[i] = index of the map entry for the value -1 + 2i/65535, i.e. the
    number of map midpoints below it (bitsandbytes' CPU quantize_blockwise table)."""
    code = dynamic_map()
    mid = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(65536, dtype=torch.float32)
    val = -1.0 + (2.0 * i) / 65535
    lut = torch.searchsorted(mid, val, right=False)  # count of midpoints strictly below val
    return code, lut.clamp(max=255).to(torch.uint8)


def quantize_dynamic_blockwise(a: torch.Tensor, blocksize: int = NESTED_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes and per-block absmax of the 1-D float32 ``a``, as bitsandbytes' CPU
    kernel: idx = uint16((clamp(a / absmax, -1, 1) + 1) * 0.5 * 65535 + 0.5), code = lut[idx]."""
    _, lut = _dynamic_lut()
    n = a.numel()
    nb = -(-n // blocksize)
    padded = torch.nn.functional.pad(a.float(), (0, nb * blocksize - n)).reshape(nb, blocksize)
    absmax = padded.abs().amax(-1)
    inv = 1.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny)
    v = (padded * inv.unsqueeze(-1)).clamp(-1.0, 1.0)
    idx = ((v + 1.0) * 0.5 * 65535 + 0.5).to(torch.int64)  # truncation, as the C cast
    q = lut[idx]
    q = torch.where((absmax == 0).unsqueeze(-1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n], absmax


def dequantize_dynamic_blockwise(q: torch.Tensor, absmax: torch.Tensor, blocksize: int = NESTED_BLOCK) -> torch.Tensor:
    code, _ = _dynamic_lut()
    n = q.numel()
    vals = code[q.long()]
    scale = absmax.repeat_interleave(blocksize)[:n]
    return vals * scale


@dataclass(frozen=True)
class _FourBitTable(WeightFormat):
    scale_keys = ("absmax",)
    group_size: int | None = 64
    double_quant: bool = False

    def __post_init__(self) -> None:
        gs = self.group_size
        if gs is not None and (not isinstance(gs, int) or gs <= 0):
            raise LowbitError(f"{self.kind}: block size must be a positive integer, got {gs!r}")

    def describe(self) -> str:
        return f"{self.kind} b{self.group_size or 'row'}" + (" +dq" if self.double_quant else "")

    def fit(self, wg, mask=None, importance=None):
        a = wg.float().abs()
        if mask is not None:
            a = a * mask
        absmax = a.amax(-1)
        return {"absmax": absmax, "absmax_fit": absmax}

    def levels(self, params):
        return table(self.kind) * params["absmax"].float().unsqueeze(-1)

    def encode(self, wg, params):
        bounds, order = _bounds(self.kind)
        am = params.get("absmax_fit", params["absmax"]).float().unsqueeze(-1)
        scaled = torch.clamp(wg.float() * (1.0 / am.clamp(min=1e-38)), -1, 1)
        q = torch.bucketize(scaled, bounds)
        if self.kind != "nf4":
            q = order[q]
        return q.to(torch.uint8)

    def decode(self, codes, params):
        return table(self.kind)[codes.long()] * params["absmax"].float().unsqueeze(-1)

    def finish(self, enc: Encoded) -> Encoded:
        if not self.double_quant:
            return enc
        absmax = enc.params["absmax"].float()
        rows, groups = absmax.shape
        flat = absmax.reshape(-1)
        offset = flat.mean()
        q2, absmax2 = quantize_dynamic_blockwise(flat - offset)
        enc.extra = {"absmax_q": q2, "absmax2": absmax2, "offset": offset.reshape(1)}
        dq = (dequantize_dynamic_blockwise(q2, absmax2) + offset).reshape(rows, groups)
        enc.params = {"absmax": dq, "absmax_fit": absmax}
        return enc

    def pack(self, enc: Encoded) -> dict[str, torch.Tensor]:
        out = {"qweight": pack(enc.codes, 4)}
        if self.double_quant:
            if not enc.extra:
                raise LowbitError(f"{self.describe()}: encoded weight lacks its nested constants")
            out.update({"absmax_q": enc.extra["absmax_q"], "absmax2": enc.extra["absmax2"], "offset": enc.extra["offset"]})
        else:
            out["absmax"] = enc.params["absmax"].float().contiguous()
        return out

    def unpack(self, tensors, rows, cols, g_idx):
        n_groups = int(g_idx.max()) + 1 if g_idx.numel() else 1
        where = f"format {self.describe()}"
        if self.double_quant:
            pack_check(tensors, ["qweight", "absmax_q", "absmax2", "offset"], where)
            q2 = check_shape(tensors["absmax_q"], (rows * n_groups,), "absmax_q")
            a2 = check_shape(tensors["absmax2"], (math.ceil(rows * n_groups / NESTED_BLOCK),), "absmax2")
            off = check_shape(tensors["offset"], (1,), "offset")
            absmax = (dequantize_dynamic_blockwise(q2, a2) + off[0]).reshape(rows, n_groups)
            extra = {"absmax_q": q2, "absmax2": a2, "offset": off}
        else:
            pack_check(tensors, ["qweight", "absmax"], where)
            absmax, extra = check_shape(tensors["absmax"], (rows, n_groups), "absmax"), {}
        if not torch.isfinite(absmax).all():
            raise LowbitError(f"{where}: non-finite block constants")
        return Encoded(self, unpack(tensors["qweight"], 4, cols), {"absmax": absmax}, g_idx.to(torch.int32), extra)


@register
@dataclass(frozen=True)
class NF4(_FourBitTable):
    kind = "nf4"


@register
@dataclass(frozen=True)
class FP4(_FourBitTable):
    kind = "fp4"
