"""QuantLinear: the module that replaces nn.Linear in a quantized model.

It holds integer weight codes with their scales and zero points (or the float weight, when
only activations are quantized) and an optional activation quantizer for its input. The
forward pass dequantizes the weight and runs a float matmul: this is the reference compute
path, exact by construction, that evaluation uses and that faster kernels are tested
against. Codes are kept unpacked (one uint8 per weight) in memory; bit packing happens only
when a checkpoint is written (``lowbit.export.checkpoint``). Biases stay in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ActSpec, WeightSpec
from ..formats.activations import fake_quantize_act
from ..formats.integer import torch_dtype
from ..formats.weights import QuantizedWeight, default_g_idx, grid_of


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        wspec: WeightSpec | None,
        aspec: ActSpec | None,
        n_groups: int = 1,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.wspec = wspec
        self.aspec = aspec
        if wspec is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        else:
            self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=torch_dtype(wspec.scale_dtype)))
            if not wspec.symmetric:
                self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8))
            self.register_buffer("g_idx", default_g_idx(in_features, wspec.group_size))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        if aspec is not None and not aspec.dynamic:
            self.register_buffer("act_scale", torch.ones(()))
            self.register_buffer("act_zero", torch.zeros(()))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        qweight: QuantizedWeight | None,
        wspec: WeightSpec | None,
        aspec: ActSpec | None = None,
        act_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> QuantLinear:
        n_groups = 1 if qweight is None else qweight.scale.shape[1]
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, wspec, aspec, n_groups)
        if qweight is None:
            m.weight.data.copy_(linear.weight.detach().float())
        else:
            m.codes.copy_(qweight.codes)
            m.scales.copy_(qweight.scale)
            if qweight.zero is not None:
                m.zeros.copy_(qweight.zero)
            m.g_idx.copy_(qweight.g_idx)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach().float())
        if act_qparams is not None:
            m.act_scale.copy_(act_qparams[0].reshape(()))
            m.act_zero.copy_(act_qparams[1].reshape(()))
        return m

    def quantized_weight(self) -> QuantizedWeight:
        assert self.wspec is not None
        return QuantizedWeight(
            codes=self.codes,
            scale=self.scales,
            zero=getattr(self, "zeros", None),
            g_idx=self.g_idx,
            grid=grid_of(self.wspec),
            group_size=self.wspec.group_size,
        )

    def dequantized_weight(self) -> torch.Tensor:
        if self.wspec is None:
            return self.weight
        cache = getattr(self, "_dequant_cache", None)
        if cache is not None:
            key = self._state_key()
            if cache.get("key") == key:
                return cache["w"]
            w = self.quantized_weight().dequantize()
            self._dequant_cache = {"key": key, "w": w}
            return w
        return self.quantized_weight().dequantize()

    def _state_key(self) -> tuple:
        # in-place changes bump a tensor's _version, so a stale cache is never used
        ts = [self.codes, self.scales, self.g_idx] + ([self.zeros] if hasattr(self, "zeros") else [])
        return tuple((id(t), t._version) for t in ts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aspec is not None:
            if self.aspec.dynamic:
                x = fake_quantize_act(x, self.aspec)
            else:
                x = fake_quantize_act(x, self.aspec, self.act_scale, self.act_zero)
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        if self.wspec is not None:
            parts.append(self.wspec.describe())
        if self.aspec is not None:
            parts.append(self.aspec.describe())
        return ", ".join(parts)


@contextlib.contextmanager
def dequant_cache(model: nn.Module) -> Iterator[None]:
    """Keep each QuantLinear's dequantized weight between forward passes (evaluation runs
    many of them); costs one float32 copy of the quantized weights while active."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m._dequant_cache = {}
    try:
        yield
    finally:
        for m in layers:
            m._dequant_cache = None


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
