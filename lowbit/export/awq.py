"""Export to the AWQ "GEMM" checkpoint layout (AutoAWQ's WQLinear_GEMM; read by
transformers, vLLM and GPTQModel).

Per quantized Linear ``L`` (W = [out, in], G groups of ``group_size`` input columns):

    L.qweight  int32 [in, out*bits/32]   codes packed along the OUTPUT dimension
    L.qzeros   int32 [G, out*bits/32]    zero points, packed the same way
    L.scales   float16 [G, out]
    L.bias     as the model holds it

and a weight is ``scales[i // group_size, j] * (code[i, j] - zero[i // group_size, j])``:
lowbit's convention (unsigned codes, zero 2**(bits-1) for symmetric grids, stored as is,
no "minus one" as in GPTQ v1), so export only repacks. The layout is the transpose of
GPTQ's qweight: AWQ packs along the output dimension.

Packing facts, from the loaders' sources:
- 4 bits (the format's classic width, the only one AutoAWQ and vLLM read): each int32
  holds 8 consecutive output columns, nibble k (bits 4k..4k+3) holding column
  ORDER_4BIT[k] of the 8, the interleave AWQ's GEMM kernels dequantize in.
- other widths (2, 3, 5-8; GPTQModel's torch AWQ kernel only): a plain little-endian bit
  stream along the output dimension, no interleave (``pack_words``).
There is no g_idx: groups are contiguous, so act-order models are refused, and so is a
group size that does not divide the input width.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LowbitError
from ..formats.weights import default_g_idx
from ..models.arch import decoder_layers
from ..nn.qlinear import QuantLinear
from .gptq import _uniform_spec, check_groups, float_linears, float_tensors, lowbit_version, pack_words, quantized_layers, unpack_words, write_export

ORDER_4BIT = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds column ORDER_4BIT[k]
AWQ_BITS = (2, 3, 4, 5, 6, 7, 8)


def pack_awq(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 values [rows, n] (n along the output dimension) -> int32 [rows, n*bits/32]."""
    if bits == 4:
        rows, n = values.shape
        values = values.reshape(rows, n // 8, 8)[..., list(ORDER_4BIT)].reshape(rows, n)
    return pack_words(values.contiguous(), bits)


def unpack_awq(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_awq."""
    values = unpack_words(words, bits, n)
    if bits == 4:
        inverse = [ORDER_4BIT.index(k) for k in range(8)]
        values = values.reshape(values.shape[0], n // 8, 8)[..., inverse].reshape(-1, n)
    return values


def awq_layer(name: str, m: QuantLinear) -> dict[str, torch.Tensor]:
    bits = m.wspec.bits
    gs = check_groups(name, m, "AWQ")
    if not torch.equal(m.g_idx, default_g_idx(m.in_features, gs)):
        raise LowbitError(f"layer {name} has permuted groups (act-order g_idx), which the AWQ layout cannot store; export it as GPTQ instead")
    if m.out_features * bits % 32:
        raise LowbitError(f"layer {name}: output width {m.out_features} does not fill whole 32-bit words at {bits} bits")
    scales = m.scales.to(torch.float16)
    if not torch.equal(scales.to(m.scales.dtype), m.scales):
        dt = str(m.scales.dtype).removeprefix("torch.")
        raise LowbitError(f"layer {name}: its {dt} scales are not exactly representable in float16, which AWQ stores; quantize with --scale-dtype float16")
    zeros = m.zeros if hasattr(m, "zeros") else torch.full_like(m.scales, 2 ** (bits - 1), dtype=torch.uint8)
    return {
        f"{name}.qweight": pack_awq(m.codes.T.contiguous(), bits),
        f"{name}.qzeros": pack_awq(zeros.T.contiguous(), bits),
        f"{name}.scales": scales.T.contiguous(),
    }


def export_awq(model, tokenizer, out_dir: str | Path) -> Path:
    """Write a lowbit-quantized model (any method; AWQ is the usual one) as an AWQ GEMM folder."""
    qlayers = quantized_layers(model, "AWQ")
    bits, gs, _ = _uniform_spec(qlayers)
    if bits not in AWQ_BITS:
        raise LowbitError(f"AWQ stores {AWQ_BITS[0]}- to {AWQ_BITS[-1]}-bit weights, not {bits}-bit")
    blocks, _ = decoder_layers(model)
    floats = float_linears(model)
    decoder_floats = [n for n in floats if n.startswith(blocks + ".")]
    if decoder_floats:
        raise LowbitError(f"AWQ export needs every decoder Linear quantized; {decoder_floats[0]} is left in float")
    tensors = float_tensors(model, qlayers)
    for name, m in qlayers.items():
        tensors.update(awq_layer(name, m))
    qconfig = {
        "quant_method": "awq",
        "version": "gemm",
        "bits": bits,
        "group_size": -1 if gs is None else gs,
        "zero_point": True,  # every layer stores zero points (symmetric ones hold 2**(bits-1))
        "modules_to_not_convert": None,
        "meta": {"quantizer": [f"lowbit:{lowbit_version()}"]},
    }
    # AWQ kernels compute in float16, the dtype its scales hold exactly
    return write_export(model, tokenizer, out_dir, dict(sorted(tensors.items())), qconfig, dtype="float16")
