"""The packed 4-bit weight-only path: torch's own CPU int4 matmul on weights kept packed.

The reference path (QuantLinear.forward) dequantizes the codes to a float32 matrix and
multiplies floats. This path keeps each weight as two 4-bit codes per byte in the layout of
``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` and multiplies with
``torch.ops.aten._weight_int4pack_mm_for_cpu`` (maintained in PyTorch, vectorized for
AVX2/AVX512 with bfloat16 operands). That kernel dequantizes a code c of group slot k as

    w = (c - 8) * scale[k] + offset[k]

so an affine weight (q - z) * s (lowbit's integer grids; ternary and BitNet weights,
whose levels are affine in their codes: ``WeightFormat.affine``) is the same number with c = q + d, scale = s and
offset = (8 - z - d) * s for any shift d that keeps c within 0..15. Any grid of at most 4
bits fits. Each group's shift is the integer nearest 8 - z that the code width allows (0
for 4-bit codes; up to 12 for 2-bit ones), so the offset stays small and its bfloat16
rounding costs little (2-bit codes without the shift: 1.4% output error; with it: 0.3%).

The kernel takes groups of 32, 64, 128 or 256 contiguous columns, output widths that 16
divides, and bfloat16 (or float16/float32, far slower here) activations. lowbit's layouts
are mapped onto it once, when the weight is prepared:

- a group whose width one of those sizes divides becomes several kernel slots with the
  same scale (per-channel weights: slots of 64 with one scale per row);
- act-order groups (permuted g_idx) are gathered so each group's columns are contiguous,
  and ragged groups (a last group narrower than the rest, widths 32 does not divide) are
  padded with zero columns; the input is scattered into the same layout at run time (zero
  inputs add nothing);
- output rows are padded to a multiple of 16 and cut off again.

Numbers: activations, scales and offsets are rounded to bfloat16 and the result is
bfloat16, so this path agrees with the reference to bfloat16 rounding, not bit for bit
(``int4_reference`` computes exactly what the kernel should, for the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError
from ..formats.base import Encoded
from ..formats.weights import QuantizedWeight

KERNEL_GROUPS = (256, 128, 64, 32)
ROW_MULTIPLE = 16
COMPUTE_DTYPE = torch.bfloat16


@dataclass
class AffineView:
    """A weight whose every value is (code - zero) * scale per (row, group): what the kernel
    can hold. Integer grids are such weights, and so are formats of the family whose levels
    are affine in the code (ternary, BitNet's binary and ternary weights)."""

    codes: torch.Tensor  # [out, in] uint8, values below 2**bits
    scale: torch.Tensor  # [out, n_groups] float32
    zero: torch.Tensor  # [out, n_groups] float32 (need not be an integer)
    g_idx: torch.Tensor  # [in]
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @classmethod
    def of(cls, weight: QuantizedWeight | Encoded) -> AffineView | None:
        """The affine view of an integer grid or a format's weight (None: not affine)."""
        if isinstance(weight, QuantizedWeight):
            return cls(weight.codes, weight.scale.float(), weight.zero_points(), weight.g_idx, weight.grid.bits)
        affine = weight.fmt.affine(weight)
        if affine is None:
            return None
        scale, zero, bits = affine
        return cls(weight.codes, scale, zero, weight.g_idx, bits)


@dataclass
class Int4Weight:
    """A QuantizedWeight in the kernel's packed layout."""

    packed: torch.Tensor  # uint8 [rows_padded, k_padded / 2], torch's int4pack layout
    scale_offset: torch.Tensor  # bfloat16 [k_padded / slot, rows_padded, 2]
    slot: int  # the kernel's group size
    out_features: int
    in_features: int
    order: torch.Tensor | None  # input columns in layout order; None: the identity layout
    dest: torch.Tensor | None  # their positions in the padded input
    k_padded: int

    def nbytes(self) -> int:
        extra = 0 if self.order is None else (self.order.numel() + self.dest.numel()) * self.order.element_size()
        return self.packed.numel() + self.scale_offset.numel() * self.scale_offset.element_size() + extra


def unsupported_reason(weight: QuantizedWeight | Encoded | None) -> str | None:
    """Why a layer cannot run on the int4 path (None: it can)."""
    if weight is None:
        return "its weights are float (only activations are quantized)"
    view = AffineView.of(weight)
    if view is None:
        return f"{weight.fmt.describe()} weights are not affine in their codes (no packed kernel for them yet)"
    if view.bits > 4:
        return f"its weights have {view.bits} bits (the int4 kernel holds at most 4)"
    return None


def _layout(g_idx: torch.Tensor, n_groups: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(slot, order, dest, slot_group, k_padded) for columns with group indices g_idx."""
    g = g_idx.long()
    counts = torch.bincount(g, minlength=n_groups)
    widths = counts[counts > 0]
    slot = next((k for k in KERNEL_GROUPS if bool((widths % k == 0).all())), KERNEL_GROUPS[-1])
    padded = (counts + slot - 1) // slot * slot
    order = torch.argsort(g, stable=True)
    g_sorted = g[order]
    first_col = torch.cumsum(counts, 0) - counts  # first sorted position of each group
    first_slot = torch.cumsum(padded, 0) - padded  # first padded position of each group
    rank = torch.arange(g.numel()) - first_col[g_sorted]
    dest = first_slot[g_sorted] + rank
    slot_group = torch.repeat_interleave(torch.arange(n_groups), padded // slot)
    return slot, order, dest, slot_group, int(padded.sum())


def _shift(w: AffineView) -> torch.Tensor:
    """Per (row, group) code shift d (see the module notes), as float."""
    return torch.clamp(torch.round(8.0 - w.zero), 0, 16 - 2**w.bits)


def prepare_weight(weight: QuantizedWeight | Encoded) -> Int4Weight:
    reason = unsupported_reason(weight)
    if reason is not None:
        raise LowbitError(f"the int4 kernel cannot hold this weight: {reason}")
    qweight = AffineView.of(weight)
    n, k = qweight.shape
    n_groups = qweight.scale.shape[1]
    slot, order, dest, slot_group, k_padded = _layout(qweight.g_idx, n_groups)
    rows = n + (-n) % ROW_MULTIPLE
    d = _shift(qweight)
    g = qweight.g_idx.long()
    codes = torch.zeros(rows, k_padded, dtype=torch.int32)
    codes[:n, dest] = (qweight.codes.to(torch.int32) + d[:, g].to(torch.int32))[:, order]
    s = qweight.scale.float()
    offset = (8.0 - qweight.zero - d) * s
    so = torch.zeros(slot_group.numel(), rows, 2)
    so[:, :n, 0] = s[:, slot_group].t()
    so[:, :n, 1] = offset[:, slot_group].t()
    identity = k_padded == k and torch.equal(order, torch.arange(k))
    return Int4Weight(
        packed=torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
        scale_offset=so.to(COMPUTE_DTYPE).contiguous(),
        slot=slot,
        out_features=n,
        in_features=k,
        order=None if identity else order,
        dest=None if identity else dest,
        k_padded=k_padded,
    )


def _kernel_input(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    x2 = x.reshape(-1, w.in_features).to(COMPUTE_DTYPE)
    if w.order is None:
        return x2.contiguous()
    xp = x2.new_zeros(x2.shape[0], w.k_padded)
    xp[:, w.dest] = x2[:, w.order]
    return xp


def int4_matmul(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x [..., in] times the packed weight: [..., out] in bfloat16."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(_kernel_input(x, w), w.packed, w.slot, w.scale_offset)
    return y[:, : w.out_features].reshape(*x.shape[:-1], w.out_features)


def int4_reference(x: torch.Tensor, weight: QuantizedWeight | Encoded) -> torch.Tensor:
    """What the kernel computes, written plainly: the input, each weight's scale and
    offset rounded to bfloat16 as the kernel stores them, then an exact float64 product."""
    qweight = AffineView.of(weight)
    d = _shift(qweight)
    s = qweight.scale.float().to(COMPUTE_DTYPE).double()
    offset = ((8.0 - qweight.zero - d) * qweight.scale.float()).to(COMPUTE_DTYPE).double()
    g = qweight.g_idx.long()
    w = (qweight.codes.double() + d[:, g].double() - 8.0) * s[:, g] + offset[:, g]
    return x.to(COMPUTE_DTYPE).double() @ w.t()
