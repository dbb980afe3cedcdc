"""GGUF block codecs in numpy: quantize weights to GGML block types and decode them.

    from lowbit.formats.gguf import quantize_tensor, dequantize_tensor
    raw = quantize_tensor(w, "Q4_K", importance=imatrix_column)   # uint8 [rows, row_bytes]
    w_hat = dequantize_tensor(raw, "Q4_K", w.shape)

Types: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 (legacy, blocks of 32), Q2_K Q3_K Q4_K Q5_K Q6_K
(super-blocks of 256), IQ4_NL (blocks of 32), TQ1_0 TQ2_0 (ternary, super-blocks of 256). The legacy quantizers match ggml's
reference bytes exactly; the k-quant and IQ4_NL quantizers follow llama.cpp's searches.
Decoding of every type is checked bit-exactly against gguf-py. ``grid_of``/``with_codes``
expose the code grid a quantized tensor's scales define, for algorithms (GPTQ) that pick
the codes themselves.
"""

from . import iq4nl, kquants, legacy, ternary  # noqa: F401  (importing registers the codecs)
from .table import (
    QK_K,
    BlockCodec,
    block_geometry,
    codec_for,
    fallback_type,
    resolve_type,
    row_bytes,
    supported_types,
)
from .grid import AffineGrid, grid_of, grid_types, with_codes
from .tensor import dequantize, dequantize_tensor, quantize, quantize_tensor

__all__ = [
    "AffineGrid",
    "grid_of",
    "grid_types",
    "with_codes",
    "QK_K",
    "BlockCodec",
    "block_geometry",
    "codec_for",
    "dequantize",
    "dequantize_tensor",
    "fallback_type",
    "quantize",
    "quantize_tensor",
    "resolve_type",
    "row_bytes",
    "supported_types",
]
