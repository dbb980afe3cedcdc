"""Modules of quantized models (QuantLinear) and their compute paths: the reference
(dequantize, float matmul) and real int8 products (``set_kernel(model, "int8")``)."""

from .qlinear import QuantLinear, set_kernel, use_kernel

__all__ = ["QuantLinear", "set_kernel", "use_kernel"]
