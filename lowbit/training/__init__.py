"""Training: quantization-aware training (qat)."""
