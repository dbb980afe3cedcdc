"""Modules of quantized models (QuantLinear) and their compute paths: the reference
(dequantize, float matmul), real int8 products (``set_kernel(model, "int8")``) and packed
4-bit weights on torch's CPU int4 matmul (``set_kernel(model, "int4")``)."""

from .qlinear import KERNELS, QuantLinear, set_kernel, use_kernel

__all__ = ["KERNELS", "QuantLinear", "set_kernel", "use_kernel"]
