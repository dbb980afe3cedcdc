"""QuantLinear: the module that replaces nn.Linear in a quantized model.

It holds integer weight codes with their scales and zero points (or the float weight, when
only activations are quantized) and an optional activation quantizer for its input. The
forward pass dequantizes the weight and runs a float matmul: this is the reference compute
path, exact by construction, that evaluation uses and that faster kernels are tested
against. Codes are kept unpacked (one uint8 per weight) in memory; bit packing happens only
when a checkpoint is written (``lowbit.export.checkpoint``). Biases stay in float32.

``set_kernel(model, "int8")`` (or ``with use_kernel(model, "int8")``) switches the layers
that quantize both weights and activations to real int8 x int8 -> int32 products
(``lowbit.nn.int8``); the kernel is a run-time choice, not part of the state dict.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ActSpec, WeightSpec
from ..formats.activations import fake_quantize_act
from ..formats.integer import torch_dtype
from ..errors import LowbitError
from ..formats.weights import QuantizedWeight, default_g_idx, grid_of
from . import int8 as int8_path

log = logging.getLogger(__name__)


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
        self.encoded = None  # formats other than "int": the Encoded weight (lowbit.formats.base)
        if wspec is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        elif wspec.format != "int" or wspec.outliers:
            from ..formats.names import format_of

            self.fmt = format_of(wspec)
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
        self.kernel = "reference"  # or "int8": see set_kernel
        self._int8 = None  # (state key, Int8Weight) while the int8 kernel is in use

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        qweight: QuantizedWeight | None,
        wspec: WeightSpec | None,
        aspec: ActSpec | None = None,
        act_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> QuantLinear:
        n_groups = 1 if qweight is None or not hasattr(qweight, "scale") else qweight.scale.shape[1]
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, wspec, aspec, n_groups)
        if qweight is None:
            m.weight.data.copy_(linear.weight.detach().float())
        elif m.holds_format:
            m.encoded = qweight
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

    @property
    def holds_format(self) -> bool:
        """Whether the weight is in a format of the family other than the affine grid."""
        return self.wspec is not None and (self.wspec.format != "int" or bool(self.wspec.outliers))

    def quantized_weight(self) -> QuantizedWeight:
        assert self.wspec is not None
        if self.holds_format:
            raise LowbitError(f"this layer holds {self.wspec.format} weights, not an integer grid")
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
            w = self._decode()
            self._dequant_cache = {"key": key, "w": w}
            return w
        return self._decode()

    def _decode(self) -> torch.Tensor:
        if self.holds_format:
            if self.encoded is None:
                raise LowbitError(f"layer holding {self.wspec.format} weights has none yet")
            return self.encoded.dequantize()
        return self.quantized_weight().dequantize()

    def _state_key(self) -> tuple:
        # in-place changes bump a tensor's _version, so a stale cache is never used
        if self.holds_format:
            return (id(self.encoded),)
        ts = [self.codes, self.scales, self.g_idx] + ([self.zeros] if hasattr(self, "zeros") else [])
        return tuple((id(t), t._version) for t in ts)

    def int8_unsupported(self) -> str | None:
        """Why this layer cannot use the int8 kernel (None: it can)."""
        if self.holds_format:
            return f"{self.wspec.format} weights are not an integer grid"
        return int8_path.unsupported_reason(None if self.wspec is None else self.quantized_weight(), self.aspec)

    def int8_weight(self) -> int8_path.Int8Weight:
        key = self._state_key()
        if self._int8 is None or self._int8[0] != key:
            self._int8 = (key, int8_path.prepare_weight(self.quantized_weight()))
        return self._int8[1]

    def _dequant_columns(self, cols: torch.Tensor) -> torch.Tensor:
        """Dequantized weight columns [out, n_cols] (LLM.int8()'s outlier columns)."""
        q = self.quantized_weight()
        g = q.g_idx[cols].long()
        return (q.codes[:, cols].float() - q.zero_points()[:, g]) * q.scale.float()[:, g]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int8":
            static = self.aspec is not None and not self.aspec.dynamic
            y = int8_path.int8_matmul(
                x, self.int8_weight(), self.aspec,
                self.act_scale if static else None, self.act_zero if static else None, self._dequant_columns,
            )
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype)
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


def set_kernel(model: nn.Module, kernel: str) -> list[str]:
    """Select the compute path of every QuantLinear in ``model``: "reference" (dequantize,
    float matmul) or "int8" (integer products, see lowbit.nn.int8). Layers that cannot
    run int8 (float weights, float activations, activation groups, act-order groups) stay
    on the reference path, with a logged note. Returns the names of the layers switched."""
    if kernel not in int8_path.KERNELS:
        raise LowbitError(f"unknown kernel {kernel!r}; expected one of {', '.join(int8_path.KERNELS)}")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise LowbitError("the model has no quantized layers to run on a kernel")
    switched, refused = [], {}
    for name, m in layers.items():
        reason = m.int8_unsupported() if kernel == "int8" else None
        if reason is None:
            m.kernel = kernel
            switched.append(name)
        else:
            m.kernel, m._int8 = "reference", None
            refused[name] = reason
    if kernel == "reference":
        for m in layers.values():
            m._int8 = None
    if refused:
        first = next(iter(refused.items()))
        if not switched:
            raise LowbitError(f"no layer can use the int8 kernel: {first[0]}: {first[1]}")
        log.info("%d layers stay on the reference path (e.g. %s: %s)", len(refused), *first)
    return switched


@contextlib.contextmanager
def use_kernel(model: nn.Module, kernel: str) -> Iterator[list[str]]:
    """``set_kernel`` for the duration of a with-block, then back to each layer's previous kernel."""
    before = {m: m.kernel for m in model.modules() if isinstance(m, QuantLinear)}
    try:
        yield set_kernel(model, kernel)
    finally:
        for m, k in before.items():
            m.kernel = k
            if k != "int8":
                m._int8 = None


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
