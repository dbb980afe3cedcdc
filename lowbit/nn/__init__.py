"""Modules of quantized models (QuantLinear) and their compute paths."""
