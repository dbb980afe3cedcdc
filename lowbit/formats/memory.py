"""Byte accounting: what a weight matrix or a whole model occupies in a given format.

Bits per weight are always derived from byte counts of the stored arrays (packed codes,
scales, packed zero points, a group map when it is not the trivial one), never from the
nominal bit width alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..config import WeightSpec
from ..errors import LowbitError
from .floats import FLOAT_FORMATS
from .packing import packed_row_bytes

_SCALE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class StorageBytes:
    codes: int
    scales: int
    zeros: int
    g_idx: int
    n_weights: int

    @property
    def total(self) -> int:
        return self.codes + self.scales + self.zeros + self.g_idx

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total / self.n_weights


def weight_storage(out_features: int, in_features: int, spec: WeightSpec, stores_g_idx: bool = False) -> StorageBytes:
    """Bytes of a quantized [out, in] weight as lowbit stores it: codes packed per row,
    one scale per (row, group), zero points packed per row at the weight bit width."""
    gs = spec.group_size
    n_groups = 1 if gs is None else math.ceil(in_features / gs)
    return StorageBytes(
        codes=out_features * packed_row_bytes(in_features, spec.bits),
        scales=out_features * n_groups * _SCALE_BYTES[spec.scale_dtype],
        zeros=0 if spec.symmetric else out_features * packed_row_bytes(n_groups, spec.bits),
        g_idx=4 * in_features if stores_g_idx else 0,
        n_weights=out_features * in_features,
    )


def format_bits(fmt: str) -> float:
    """Nominal bits per parameter of a format name used by ``lowbit memory``:
    fp32/fp16/bf16, or int<k>[-g<size>] (integer codes plus one fp16 scale per group;
    without -g, per-channel, whose scale cost is negligible and left out)."""
    f = fmt.lower()
    if f in FLOAT_FORMATS:
        return float(FLOAT_FORMATS[f].bits)
    m = re.fullmatch(r"int([1-8])(?:-g(\d+))?", f)
    if not m:
        raise LowbitError(f"unknown format {fmt!r}; use fp32, fp16, bf16 or int<k>[-g<group>] such as int4-g64")
    bits = int(m.group(1))
    return bits + (16 / int(m.group(2)) if m.group(2) else 0.0)


def parse_count(text: str) -> int:
    """'70B', '7e9', '135M', '1.5b' -> number of parameters."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", text.lower())
    if not m:
        raise LowbitError(f"cannot read a parameter count from {text!r}; try 70B, 135M or 7e9")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2)]
    return int(round(float(m.group(1)) * scale))


def model_bytes(n_params: int, fmt: str) -> float:
    return n_params * format_bits(fmt) / 8


def human_bytes(n: float) -> str:
    """Decimal units, as model cards and the guide use (70B x 4 bytes = 280 GB)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
