"""Export NF4 / FP4 weights to the 4-bit layout transformers reloads with bitsandbytes.

A model saved by transformers after ``load_in_4bit`` holds, per quantized Linear ``L``
(W = [out, in], n = out * in weights, blocks of ``blocksize`` over the row-major
flattened weight; the facts are bitsandbytes' QuantState.as_dict(packed=True)):

    L.weight                               uint8 [ceil(n/2), 1]  two codes per byte,
                                           the first weight in the high nibble
    L.weight.absmax                        float32 [n_blocks]; with double quantization
                                           uint8 codes on the 8-bit dynamic map instead
    L.weight.quant_map                     float32 [16], the table (NF4 or FP4)
    L.weight.nested_absmax                 (double quant) float32, per block of 256 constants
    L.weight.nested_quant_map              (double quant) float32 [256], the dynamic map
    L.weight.quant_state.bitsandbytes__nf4 uint8, UTF-8 JSON of the rest: quant_type,
                                           blocksize, dtype, shape (and nested_blocksize,
                                           nested_dtype, nested_offset)

and config.json's ``quantization_config`` (quant_method bitsandbytes, load_in_4bit, the
quant type, double quant, compute dtype float32, skipped modules). lowbit's NF4/FP4
blocks run along rows, so a row width that 64 divides gives exactly bitsandbytes'
blocks; codes and constants are then copied as they are (they equal bitsandbytes' own on
the same weights: tests/test_bnb_oracle.py). Act-order groups (GPTQ without
static_groups) and narrower last blocks cannot be stored and are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import LowbitError
from ..formats.normal_float import NESTED_BLOCK, dynamic_map, table
from ..formats.weights import default_g_idx
from ..nn.qlinear import QuantLinear
from .gptq import float_linears, float_tensors, quantized_layers, write_export


def _layout(qlayers: dict[str, QuantLinear]) -> tuple[str, int, bool]:
    kinds = set()
    for name, m in qlayers.items():
        fmt = m.fmt
        if not m.holds_format or getattr(fmt, "kind", None) not in ("nf4", "fp4"):
            raise LowbitError(f"layer {name} holds {m.wspec.describe()} weights; the bitsandbytes 4-bit layout stores nf4, nf4-dq, fp4 or fp4-dq only")
        gs = fmt.group_size
        if gs is None or m.in_features % gs:
            raise LowbitError(f"layer {name}: bitsandbytes blocks run over the flattened weight, so the block size ({gs}) must divide the input width {m.in_features}")
        if not torch.equal(m.encoded.g_idx, default_g_idx(m.in_features, gs)):
            raise LowbitError(f"layer {name} has permuted groups (act-order), which bitsandbytes cannot store; quantize with --option static_groups=true")
        kinds.add((fmt.kind, gs, bool(fmt.double_quant)))
    if len(kinds) > 1:
        mixed = ", ".join(f"{k} b{g}" + (" +dq" if d else "") for k, g, d in sorted(kinds))
        raise LowbitError(f"bitsandbytes holds one 4-bit format per model; this one mixes {mixed}")
    return kinds.pop()


def bnb_layer(name: str, m: QuantLinear) -> dict[str, torch.Tensor]:
    fmt, enc = m.fmt, m.encoded
    codes = enc.codes.reshape(-1)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.reshape(-1, 2)
    w = f"{name}.weight"
    state = {"quant_type": fmt.kind, "blocksize": fmt.group_size, "dtype": "float32", "shape": [m.out_features, m.in_features]}
    out = {w: ((pairs[:, 0] << 4) | pairs[:, 1]).to(torch.uint8).reshape(-1, 1), f"{w}.quant_map": table(fmt.kind)}
    if fmt.double_quant:
        out[f"{w}.absmax"] = enc.extra["absmax_q"].to(torch.uint8).contiguous()
        out[f"{w}.nested_absmax"] = enc.extra["absmax2"].float().contiguous()
        out[f"{w}.nested_quant_map"] = dynamic_map()
        state.update({"nested_blocksize": NESTED_BLOCK, "nested_dtype": "float32", "nested_offset": float(enc.extra["offset"][0])})
    else:
        out[f"{w}.absmax"] = enc.params["absmax"].float().reshape(-1).contiguous()
    out[f"{w}.quant_state.bitsandbytes__{fmt.kind}"] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return out


def export_bnb(model, tokenizer, out_dir: str | Path) -> Path:
    """Write a model whose quantized layers are nf4/fp4 (any method) as a bitsandbytes 4-bit folder."""
    qlayers = quantized_layers(model, "bitsandbytes")
    kind, _, double_quant = _layout(qlayers)
    tensors = float_tensors(model, qlayers)
    for name, m in qlayers.items():
        tensors.update(bnb_layer(name, m))
    qconfig = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_quant_type": kind,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": float_linears(model) or None,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }
    return write_export(model, tokenizer, out_dir, dict(sorted(tensors.items())), qconfig, dtype="float32")
