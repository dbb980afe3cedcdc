"""Fake-quantized Linear layers for quantization-aware training, on any weight format.

With an activation format (``act``, dynamic: BitNet's 8-bit absmax per token) the input is
fake-quantized too, straight through. The forward uses w + lam·(q(w) - w), where q(w) is the weight rounded in its format and the
rounding is straight-through (gradient 1). lam blends quantization in during a warm-up
(0: the float layer; 1: fully quantized). Two ways to get q:

- ``scales="fixed"``: every forward refits the format's parameters on the current weights
  (``round_to_nearest``), as the format's own RTN does; works on every format.
- ``scales="learned"`` (LSQ-style): the parameters p0 are fixed when training starts (from
  RTN, or from the PTQ result it starts from) and a learned multiplier m per (row, group)
  scales them: q(w) = m · Q(w / m; p0). Straight-through rounding gives m the gradient
  sum (Q(u) - u) over its group (u = w / m), LSQ's, times LSQ's gradient scale
  1 / sqrt(group weights · levels). The formats whose values scale with a parameter name it
  in ``scale_keys`` (affine int, NF4/FP4 without double quantization, BCQ, ternary,
  per-group codebooks); for those the final weights store p0's scale parameters times m.

``to_quant_linear`` turns the layer into lowbit's QuantLinear holding exactly the codes the
last forward used (learned: parameters rounded to their storage dtype first).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ActSpec, WeightSpec
from ..formats.activations import fake_quantize_act
from ..errors import LowbitError
from ..formats.base import Encoded, GroupLayout, quantize_matrix
from ..formats.names import format_of, round_to_nearest
from ..formats.weights import QuantizedWeight
from .qlinear import QuantLinear


def learnable_reason(fmt) -> str | None:
    """Why a format cannot learn its scales (None: it can)."""
    if not getattr(fmt, "scale_keys", ()):
        return f"format {fmt.describe()} has no parameter that scales its values (use scales=fixed, --scales fixed)"
    if getattr(fmt, "shares_rows", False) or getattr(fmt, "static_params", False) or getattr(fmt, "double_quant", False) or hasattr(fmt, "quantize"):
        return f"format {fmt.describe()} fits its parameters over the whole matrix or across rows (use scales=fixed, --scales fixed)"
    return None


def encoded_of(q: QuantLinear) -> Encoded:
    """A QuantLinear's weight as an Encoded of its format (affine grids included)."""
    if q.holds_format:
        return q.encoded
    qw = q.quantized_weight()
    fmt = format_of(q.wspec)
    return Encoded(fmt, qw.codes.clone(), {"scale": qw.scale.clone(), "zero": qw.zero_points()}, qw.g_idx.clone())


class FakeQuantLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: WeightSpec, scales: str = "learned",
                 init: Encoded | None = None, name: str = "layer", act: ActSpec | None = None):
        super().__init__()
        if scales not in ("learned", "fixed"):
            raise LowbitError(f"scales must be learned or fixed, got {scales!r}")
        if act is not None and not act.dynamic:
            raise LowbitError(f"layer {name}: QAT fake-quantizes activations dynamically (per token or tensor); static scales need calibration, not training")
        self.spec, self.scales, self.name, self.act = spec, scales, name, act
        self.fmt = format_of(spec)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.lam = 1.0
        if scales == "learned":
            reason = learnable_reason(self.fmt)
            if reason:
                raise LowbitError(f"layer {name}: {reason}")
            enc = init if init is not None else quantize_matrix(self.fmt, self.weight.detach(), name)
            self.g_idx = enc.g_idx.clone()
            self.p0 = {k: v.clone() for k, v in enc.params.items()}
            n_groups = next(iter(self.p0.values())).shape[1]
            self.layout = GroupLayout(self.g_idx, n_groups)
            self.mult = nn.Parameter(torch.ones(self.out_features, n_groups))
            per_group = self.in_features / n_groups
            levels = self.fmt.levels(self.p0).shape[-1]
            self.grad_scale = 1.0 / math.sqrt(per_group * max(levels - 1, 1))

    def quantized_weight(self) -> torch.Tensor:
        """q(w) with straight-through rounding (gradients reach w, and m when learned)."""
        w = self.weight
        if self.scales == "fixed":
            with torch.no_grad():
                q = round_to_nearest(w.detach(), self.spec, self.name).dequantize()
            return q + (w - w.detach())  # the value q exactly, the gradient of w
        g = self.grad_scale
        m = self.mult * g + (self.mult - self.mult * g).detach()  # LSQ's gradient scale
        m_cols = self.layout.scatter(m.unsqueeze(-1).expand(-1, -1, self.layout.width))
        u = w / m_cols
        with torch.no_grad():
            ug = self.layout.gather(u.detach())
            qu = self.layout.scatter(self.fmt.decode(self.fmt.encode(ug, self.p0), self.p0))
        return m_cols * (qu + (u - u.detach()))  # the value m·Q(u) exactly; d/dm = Q(u) - u, d/dw = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:  # straight through the activations' rounding too
            x = fake_quantize_act(x.detach(), self.act) + (x - x.detach())
        w = self.weight
        if self.lam > 0:
            q = self.quantized_weight()
            w = q if self.lam >= 1 else w + self.lam * (q - w)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def final_encoded(self) -> Encoded:
        w = self.weight.detach()
        if self.scales == "fixed":
            return quantize_matrix(self.fmt, w, self.name)  # the affine grid too: AffineInt is today's integer RTN
        m = self.mult.detach().clamp(min=1e-8)
        params = {}
        for k, v in self.p0.items():
            if k in self.fmt.scale_keys or k == "absmax_fit":
                mm = m if v.dim() == 2 else m.unsqueeze(-1)
                params[k] = (v.float() * mm).to(v.dtype)
            else:
                params[k] = v
        codes = self.layout.scatter(self.fmt.encode(self.layout.gather(w), params))
        return Encoded(self.fmt, codes.to(torch.uint8), params, self.g_idx.clone())

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        enc = self.final_encoded()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        if self.spec.in_family:
            return QuantLinear.from_linear(lin, enc, self.spec, self.act)
        zero = None if self.spec.symmetric else enc.params["zero"].to(torch.uint8)
        qw = QuantizedWeight(enc.codes, enc.params["scale"], zero, enc.g_idx, self.fmt.grid, self.spec.group_size)
        return QuantLinear.from_linear(lin, qw, self.spec, self.act)

