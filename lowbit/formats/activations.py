"""Activation quantization: the per-token and per-tensor fake quantizers of a Linear input.

Dynamic quantization computes the range from the tensor being quantized (per token: one
scale per row of the flattened input; per tensor: one for all of it). Static quantization
uses a scale and zero point fixed beforehand from calibration data (see
``lowbit.calibration.observers``). Activation scales stay in float32: they are computed at
run time, not stored at low precision.

LLM.int8()'s mixed-precision decomposition (``ActSpec.outlier_threshold``) is a fake
quantizer too: the columns holding an outlier keep their float values and the rest are
quantized per token with the outliers left out of the range. Zero always quantizes to
exactly zero, so ``linear(decomposed x, W)`` equals the paper's sum of an int8 product over
the regular columns and a float product over the outlier columns.
"""

from __future__ import annotations

import torch

from ..config import ActSpec
from .integer import IntGrid, fake_quantize, qparams_from_range


def act_grid(spec: ActSpec) -> IntGrid:
    return IntGrid(spec.bits, symmetric=spec.symmetric, restricted=False)


def dynamic_qparams(x: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of x per token (last dim reduced, kept) or per tensor."""
    xf = x.detach().float()
    if spec.granularity == "token":
        lo, hi = xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True)
    else:
        lo, hi = xf.amin(), xf.amax()
    return qparams_from_range(lo, hi, act_grid(spec), torch.float32)


def _to_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """[..., n] -> [..., ceil(n/group), group], zero-padded. Zeros change no group's range:
    asymmetric ranges always hold 0, and 0 never raises an absmax."""
    n = x.shape[-1]
    pad = (-n) % group
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, group), n


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool mask [in] of the input columns where any token of ``x`` [..., in] has
    |x| > threshold: decided per input, at run time, as LLM.int8() does."""
    return (x.detach().abs() > threshold).reshape(-1, x.shape[-1]).any(0)


def fake_quantize_act(
    x: torch.Tensor, spec: ActSpec, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None
) -> torch.Tensor:
    """Fake-quantize an activation: dynamically, or with static (scale, zero) when given."""
    if spec.outlier_threshold is not None and scale is None:
        cols = outlier_columns(x, spec.outlier_threshold)
        if bool(cols.any()):  # (outlier thresholds come with per-token, ungrouped scales)
            regular = x.masked_fill(cols, 0.0)
            scale, zero = dynamic_qparams(regular, spec)
            return torch.where(cols, x, fake_quantize(regular, scale, zero, act_grid(spec)))
    if scale is not None:
        return fake_quantize(x, scale, zero, act_grid(spec))
    if spec.group_size is None:
        scale, zero = dynamic_qparams(x, spec)
        return fake_quantize(x, scale, zero, act_grid(spec))
    xg, n = _to_groups(x, spec.group_size)
    scale, zero = dynamic_qparams(xg, spec)
    out = fake_quantize(xg, scale, zero, act_grid(spec))
    return out.reshape(*x.shape[:-1], -1)[..., :n]
