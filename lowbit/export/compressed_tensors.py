"""Export to compressed-tensors' ``pack-quantized`` format (transformers, vLLM, llm-compressor).

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


def ct_layer(name: str, m: QuantLinear) -> dict[str, torch.Tensor]:
    gs = check_groups(name, m, "compressed-tensors")
    if not torch.equal(m.g_idx, default_g_idx(m.in_features, gs)):
        raise LowbitError(
            f"layer {name} has permuted groups (act-order g_idx), which compressed-tensors cannot store; "
            "export it as GPTQ instead"
        )
    bits = m.wspec.bits
    out = {
        f"{name}.weight_packed": pack_words(m.codes, bits),
        f"{name}.weight_scale": m.scales.contiguous(),
        f"{name}.weight_shape": torch.tensor([m.out_features, m.in_features], dtype=torch.int64),
    }
    if not m.wspec.symmetric:
        out[f"{name}.weight_zero_point"] = pack_words(m.zeros.T.contiguous(), bits).T.contiguous()
    return out


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
    """One config group per weight format. A single format targets every Linear and lists
    the float ones in ``ignore``; several formats name their layers exactly."""
    by_spec: dict[tuple, list[str]] = {}
    for name, m in qlayers.items():
        s = m.wspec
        by_spec.setdefault((s.bits, s.symmetric, s.group_size or 0), []).append(name)
    groups = {}
    for i, key in enumerate(sorted(by_spec)):
        names = sorted(by_spec[key])
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(by_spec) == 1 else names,
            "weights": _weights_args(qlayers[names[0]].wspec),
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
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
    """Write a lowbit-quantized model as a compressed-tensors pack-quantized folder."""
    qlayers = quantized_layers(model, "compressed-tensors")
    tensors = float_tensors(model, qlayers)
    for name, m in qlayers.items():
        tensors.update(ct_layer(name, m))
    qconfig = quantization_config(qlayers, float_linears(model))
    return write_export(model, tokenizer, out_dir, dict(sorted(tensors.items())), qconfig)
