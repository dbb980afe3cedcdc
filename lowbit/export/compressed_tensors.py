"""Export to compressed-tensors (transformers, vLLM, llm-compressor): weight-only layers as
``pack-quantized``, layers that also quantize their inputs (W8A8: SmoothQuant, ZeroQuant)
as ``int-quantized``.

Per quantized Linear ``L`` (W = [out, in], G groups) the safetensors file holds

    L.weight_packed      int32 [out, ceil(in*bits/32)]   codes packed along each row
    L.weight_scale       [out, G] in lowbit's scale dtype (G = 1 for strategy "channel")
    L.weight_zero_point  int32 [ceil(out*bits/32), G]    asymmetric only, packed along out
    L.weight_shape       int64 [2] = (out, in)

Facts taken from compressed-tensors (0.20) itself:
- Values are signed, q in [-2**(bits-1), 2**(bits-1) - 1], and a weight is
  (q - zero_point) * scale; packing adds 2**(bits-1) to each value first. lowbit's codes
  and zero points are that value plus 2**(bits-1) already, so they are packed unchanged.
- Packing is a little-endian bit stream cut into 32-bit words (``pack_words``), for every
  width since compressed-tensors 0.18. Earlier releases packed 32//bits values per word,
  which is the same for 2, 4 and 8 bits but not for 3, 5, 6 and 7: a 3-bit file written
  here reads correctly with compressed-tensors >= 0.18 only. (vLLM's kernels for this
  format take 4 and 8 bits.)
- Group quantization needs the group size to divide the input width (a narrower last
  group is an error when decompressing), and there is no g_idx: act-order column
  permutations were removed. Both are refused here.
- The scale is loaded into a parameter of the model's dtype and the weight dequantized in
  that dtype: loaded in float32, the result is lowbit's float32 weight exactly.
- ``int-quantized`` (compressed-tensors' writer for schemes with input activations) stores
  ``L.weight`` as int8 holding the signed values q - 2**(bits-1), ``L.weight_scale``
  [out, G], ``L.weight_zero_point`` int8 [out, G] unpacked (asymmetric only), and for static
  activations ``L.input_scale`` [1] and ``L.input_zero_point`` int8 [1] (asymmetric only).
  Its activation quantizer is lowbit's: symmetric scale absmax / ((2**bits - 1) / 2),
  asymmetric scale (max - min) / (2**bits - 1) with the range holding 0 and a rounded
  zero point, round half to even, so a dynamic per-token file computes what lowbit does.
  vLLM's int8 W8A8 kernels want symmetric per-channel (or per-tensor) 8-bit weights;
  ``vllm_warnings`` names the layers that are not.
- LLM.int8()'s outlier decomposition and per-token activation groups have no
  compressed-tensors scheme: refused.
- Asymmetric files follow compressed-tensors' own writer (zero points packed along the
  output dimension), which transformers 5.23 with compressed-tensors 0.20 loads only with
  ``CompressedTensorsConfig(dequantize=True)``: its default path sizes weight_zero_point
  unpacked. That path dequantizes in the scale's dtype, i.e. lowbit's weight rounded to it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LowbitError
from ..formats.weights import default_g_idx
from ..nn.qlinear import QuantLinear
from .gptq import check_groups, float_linears, float_tensors, pack_words, quantized_layers, write_export

# the first compressed-tensors release whose pack-quantized layout this exporter writes
FORMAT_VERSION = "0.18.0"


def layer_format(m: QuantLinear) -> str:
    """The compressed-tensors format a layer is written in: int-quantized when it also
    quantizes its inputs, pack-quantized otherwise."""
    return "pack-quantized" if m.aspec is None else "int-quantized"


def _check_layout(name: str, m: QuantLinear) -> None:
    """Refuse what neither format holds: ragged groups, act-order column permutations."""
    gs = check_groups(name, m, "compressed-tensors")
    if not torch.equal(m.g_idx, default_g_idx(m.in_features, gs)):
        raise LowbitError(
            f"layer {name} has permuted groups (act-order g_idx), which compressed-tensors cannot store; "
            "export it as GPTQ instead"
        )


def _signed(t: torch.Tensor, bits: int) -> torch.Tensor:
    """lowbit's unsigned codes (or zero points) as compressed-tensors' signed int8 values."""
    return (t.round().to(torch.int16) - 2 ** (bits - 1)).to(torch.int8).contiguous()


def ct_layer(name: str, m: QuantLinear) -> dict[str, torch.Tensor]:
    _check_layout(name, m)
    bits = m.wspec.bits
    out = {
        f"{name}.weight_packed": pack_words(m.codes, bits),
        f"{name}.weight_scale": m.scales.contiguous(),
        f"{name}.weight_shape": torch.tensor([m.out_features, m.in_features], dtype=torch.int64),
    }
    if not m.wspec.symmetric:
        out[f"{name}.weight_zero_point"] = pack_words(m.zeros.T.contiguous(), bits).T.contiguous()
    return out


def ct_int_layer(name: str, m: QuantLinear) -> dict[str, torch.Tensor]:
    """The int-quantized tensors of a layer that quantizes its inputs too (see above)."""
    _check_layout(name, m)
    _act_args(name, m.aspec)  # refuses what has no scheme
    bits = m.wspec.bits
    out = {
        f"{name}.weight": _signed(m.codes, bits),
        f"{name}.weight_scale": m.scales.contiguous(),
    }
    if not m.wspec.symmetric:
        out[f"{name}.weight_zero_point"] = _signed(m.zeros, bits)
    if not m.aspec.dynamic:
        out[f"{name}.input_scale"] = m.act_scale.detach().float().reshape(1).clone()
        if not m.aspec.symmetric:
            out[f"{name}.input_zero_point"] = _signed(m.act_zero.detach().reshape(1), m.aspec.bits)
    return out


def _act_args(name: str, spec) -> dict:
    """QuantizationArgs of an activation format (per token or per tensor, dynamic or static)."""
    if spec.outlier_threshold is not None:
        raise LowbitError(
            f"layer {name} keeps LLM.int8() outlier columns in float ({spec.describe()}), which compressed-tensors cannot "
            "express; export a weight-only model or quantize without the outlier threshold"
        )
    if spec.group_size is not None:
        raise LowbitError(f"layer {name} quantizes its inputs in groups of {spec.group_size} per token, which lowbit's compressed-tensors export does not write")
    return {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "strategy": spec.granularity,
        "group_size": None,
        "dynamic": spec.dynamic,
    }


def vllm_warnings(qlayers: dict[str, QuantLinear]) -> list[str]:
    """What vLLM's int8 W8A8 kernels will not take, one line per kind of layer."""
    bad = sorted(n for n, m in qlayers.items() if m.aspec is not None and (not m.wspec.symmetric or m.wspec.bits != 8 or m.wspec.group_size is not None))
    if not bad:
        return []
    return [f"{len(bad)} layers quantize their activations with weights that are not 8-bit symmetric per channel (e.g. {bad[0]}): "
            "vLLM's int8 W8A8 kernels refuse them; quantize with --bits 8 --sym and no group size for vLLM"]


def _weights_args(spec) -> dict:
    """QuantizationArgs of a weight format: per-channel is strategy "channel" (one scale
    per row, no group size), grouped is strategy "group"."""
    strategy = "channel" if spec.group_size is None else "group"
    return {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "strategy": strategy,
        "group_size": spec.group_size,
        "dynamic": False,
    }


def quantization_config(qlayers: dict[str, QuantLinear], ignore: list[str]) -> dict:
    """One config group per (weight format, activation format). A single group targets
    every Linear and lists the float ones in ``ignore``; several groups name their layers
    exactly. Groups with activations are int-quantized, the others pack-quantized."""
    by_spec: dict[tuple, list[str]] = {}
    for name, m in qlayers.items():
        s, a = m.wspec, m.aspec
        akey = () if a is None else (a.bits, a.dynamic, a.granularity, a.symmetric)
        by_spec.setdefault((s.bits, s.symmetric, s.group_size or 0, akey), []).append(name)
    groups = {}
    formats = set()
    for i, key in enumerate(sorted(by_spec)):
        names = sorted(by_spec[key])
        first = qlayers[names[0]]
        fmt = layer_format(first)
        formats.add(fmt)
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(by_spec) == 1 else names,
            "weights": _weights_args(first.wspec),
            "input_activations": None if first.aspec is None else _act_args(names[0], first.aspec),
            "output_activations": None,
            "format": fmt,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": FORMAT_VERSION,
    }


def export_compressed_tensors(model, tokenizer, out_dir: str | Path) -> Path:
    """Write a lowbit-quantized model as a compressed-tensors folder (pack-quantized
    weight-only layers, int-quantized W8A8-style layers)."""
    qlayers = quantized_layers(model, "compressed-tensors", activations=True)
    tensors = float_tensors(model, qlayers)
    for name, m in qlayers.items():
        tensors.update(ct_layer(name, m) if layer_format(m) == "pack-quantized" else ct_int_layer(name, m))
    qconfig = quantization_config(qlayers, float_linears(model))
    return write_export(model, tokenizer, out_dir, dict(sorted(tensors.items())), qconfig)
