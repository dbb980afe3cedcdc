"""QuantLinear: the module that replaces nn.Linear in a quantized model.

It holds integer weight codes with their scales and zero points (or the float weight, when
only activations are quantized) and an optional activation quantizer for its input. The
forward pass dequantizes the weight and runs a float matmul: this is the reference compute
path, exact by construction, that evaluation uses and that faster kernels are tested
against. Codes are kept unpacked (one uint8 per weight) in memory; bit packing happens only
when a checkpoint is written (``lowbit.export.checkpoint``). Biases stay in float32.

``set_kernel(model, "int8")`` (or ``with use_kernel(model, "int8")``) switches the layers
that quantize both weights and activations to real int8 x int8 -> int32 products
(``lowbit.nn.int8``); ``set_kernel(model, "int4")`` runs weights of at most 4 bits packed,
two codes per byte, through torch's CPU int4 matmul (``lowbit.nn.int4``). The kernel is a
run-time choice, not part of the state dict. ``set_kernel(..., keep_codes=False)`` drops
the unpacked codes once the packed copy exists, so the model holds its weights at their
packed size (what ``lowbit.load(..., kernel=...)`` does for generation); such a layer can
no longer go back to the reference path or be saved.
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
from . import int4 as int4_path
from . import int8 as int8_path

KERNELS = ("reference", "int8", "int4")

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
        self.kernel = "reference"  # or "int8", "int4": see set_kernel
        self._int8 = None  # (state key, Int8Weight) while the int8 kernel is in use
        self._int4 = None  # (state key, Int4Weight) while the int4 kernel is in use
        self.packed_only = False  # the unpacked codes were dropped after packing (keep_codes=False)

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

    def _require_codes(self) -> None:
        """The one-line error for reading codes a packed-only layer no longer has."""
        if self.packed_only:
            raise LowbitError(
                f"this layer keeps only its packed {self.kernel} weights (loaded with keep_codes=False); "
                "load the checkpoint again with the reference kernel to read its codes"
            )

    def quantized_weight(self) -> QuantizedWeight:
        assert self.wspec is not None
        self._require_codes()
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
        self._require_codes()
        if self.holds_format:
            if self.encoded is None:
                raise LowbitError(f"layer holding {self.wspec.format} weights has none yet")
            return self.encoded.dequantize()
        return self.quantized_weight().dequantize()

    def _state_key(self) -> tuple:
        # in-place changes bump a tensor's _version, so a stale cache is never used
        if self.packed_only:
            return ("packed",)
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

    def _stored_weight(self):
        """The weight as stored: a QuantizedWeight (integer grid), an Encoded (a format of
        the family) or None (float)."""
        if self.wspec is None:
            return None
        if self.holds_format:
            self._require_codes()
            return self.encoded
        return self.quantized_weight()

    def int4_unsupported(self) -> str | None:
        """Why this layer cannot use the int4 kernel (None: it can)."""
        return int4_path.unsupported_reason(self._stored_weight())

    def int4_weight(self) -> int4_path.Int4Weight:
        key = self._state_key()
        if self._int4 is None or self._int4[0] != key:
            self._int4 = (key, int4_path.prepare_weight(self._stored_weight()))
        return self._int4[1]

    def drop_codes(self) -> None:
        """Free the unpacked codes, scales and zero points; only the packed copy of the
        current kernel remains (see set_kernel's keep_codes). LLM.int8() layers keep their
        codes: their outlier columns are dequantized from them at run time."""
        if self.kernel == "int8":
            if self.aspec is not None and self.aspec.outlier_threshold is not None:
                return  # LLM.int8()'s outlier columns are multiplied by dequantized codes at run time
            self.int8_weight()
        elif self.kernel == "int4":
            self.int4_weight()
        else:
            raise LowbitError("only a layer on a packed kernel (int8, int4) can drop its codes")
        for name in ("codes", "scales", "zeros", "g_idx"):
            self._buffers.pop(name, None)
        self.encoded = None
        self._dequant_cache = None
        self.packed_only = True
        key = ("packed",)
        self._int8 = None if self._int8 is None else (key, self._int8[1])
        self._int4 = None if self._int4 is None else (key, self._int4[1])

    def _dequant_columns(self, cols: torch.Tensor) -> torch.Tensor:
        """Dequantized weight columns [out, n_cols] (LLM.int8()'s outlier columns)."""
        q = self.quantized_weight()
        g = q.g_idx[cols].long()
        return (q.codes[:, cols].float() - q.zero_points()[:, g]) * q.scale.float()[:, g]

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.aspec is None:
            return x
        if self.aspec.dynamic:
            return fake_quantize_act(x, self.aspec)
        return fake_quantize_act(x, self.aspec, self.act_scale, self.act_zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int4":
            # weight-only kernel: quantized activations are rounded as on the reference path
            y = int4_path.int4_matmul(self._quantize_input(x), self.int4_weight()).to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        if self.kernel == "int8":
            static = self.aspec is not None and not self.aspec.dynamic
            y = int8_path.int8_matmul(
                x, self.int8_weight(), self.aspec,
                self.act_scale if static else None, self.act_zero if static else None, self._dequant_columns,
            )
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype)
        x = self._quantize_input(x)
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        if self.wspec is not None:
            parts.append(self.wspec.describe())
        if self.aspec is not None:
            parts.append(self.aspec.describe())
        return ", ".join(parts)


def set_kernel(model: nn.Module, kernel: str, keep_codes: bool = True) -> list[str]:
    """Select the compute path of every QuantLinear in ``model``: "reference" (dequantize,
    float matmul), "int8" (integer products where weights and activations are both
    quantized, see lowbit.nn.int8) or "int4" (weights of at most 4 bits kept packed, torch's
    CPU int4 matmul, see lowbit.nn.int4). Layers a kernel cannot run stay on the reference
    path, with a logged note. keep_codes=False frees the unpacked codes of the switched
    layers (the model then holds them packed only). kernel="auto" gives each layer the first
    of int4, int8 it can run (else the reference). Returns the names of the layers switched."""
    if kernel == "auto":
        return _set_auto(model, keep_codes)
    if kernel not in KERNELS:
        raise LowbitError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}, or auto")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise LowbitError("the model has no quantized layers to run on a kernel")
    packed = [n for n, m in layers.items() if m.packed_only and m.kernel != kernel]
    if packed:
        raise LowbitError(f"layer {packed[0]} keeps only its packed {layers[packed[0]].kernel} weights; it cannot switch to {kernel}")
    switched, refused = [], {}
    for name, m in layers.items():
        reason = {"int8": m.int8_unsupported, "int4": m.int4_unsupported}.get(kernel, lambda: None)()
        if reason is None:
            m.kernel = kernel
            switched.append(name)
        else:
            m.kernel = "reference"
            refused[name] = reason
        if m.kernel != "int8":
            m._int8 = None
        if m.kernel != "int4":
            m._int4 = None
    if refused:
        first = next(iter(refused.items()))
        if not switched:
            raise LowbitError(f"no layer can use the {kernel} kernel: {first[0]}: {first[1]}")
        log.info("%d layers stay on the reference path (e.g. %s: %s)", len(refused), *first)
    if not keep_codes and kernel != "reference":
        for name in switched:
            layers[name].drop_codes()
    return switched


def _set_auto(model: nn.Module, keep_codes: bool) -> list[str]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise LowbitError("the model has no quantized layers to run on a kernel")
    switched = []
    for name, m in layers.items():
        kernel = next((k for k, why in (("int4", m.int4_unsupported), ("int8", m.int8_unsupported)) if why() is None), "reference")
        if m.packed_only and m.kernel != kernel:
            raise LowbitError(f"layer {name} keeps only its packed {m.kernel} weights; it cannot switch to {kernel}")
        set_kernel(m, kernel, keep_codes=keep_codes)
        if kernel != "reference":
            switched.append(name)
    return switched


def kernel_counts(model: nn.Module) -> dict[str, int]:
    """How many QuantLinear layers run on each kernel."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            counts[m.kernel] = counts.get(m.kernel, 0) + 1
    return counts


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
            if k != "int4":
                m._int4 = None


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
