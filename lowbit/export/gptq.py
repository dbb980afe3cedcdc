"""Export to the GPTQ checkpoint layout read by GPTQModel, AutoGPTQ, transformers and vLLM.

Per quantized Linear ``L`` (W = [out, in], G groups) the safetensors file holds

    L.qweight  int32 [in*bits/32, out]    codes packed along the input dimension
    L.qzeros   int32 [G, out*bits/32]     zero points packed along the output dimension
    L.scales   float16 [G, out]
    L.g_idx    int32 [in]                 group of each input column
    L.bias     as the model holds it

and a weight is ``scales[g_idx[i], j] * (code[i, j] - zero[g_idx[i], j])``: lowbit's own
convention (unsigned codes, zero 2**(bits-1) for symmetric grids), so export only repacks.

Packing facts, from the loaders' sources: every 32-bit word holds consecutive values, the
first in the lowest bits. For 2/4/8 bits that is 32/bits values per word. For 3 bits the
loaders read three words per 32 values (10 values, then one split across the word
boundary, 10, split, 10): that is exactly a little-endian bit stream of 3-bit values cut
into 32-bit words, so one bit-stream packer (``pack_words``) serves every width. The same
stream, packed along rows instead, is compressed-tensors' ``pack-quantized`` layout.

``checkpoint_format`` "gptq" (v1, what vLLM and AutoGPTQ read) stores zero - 1 in each
qzeros field and loaders add the 1 back; "gptq_v2" (GPTQModel) stores zeros as they are.
A v1 field cannot hold zero 0 (zero - 1 would borrow from its neighbour, and loaders
disagree about reading that back), so such models must use gptq_v2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..cache import atomic_path
from ..errors import LowbitError
from ..formats.packing import pack, packed_row_bytes, unpack
from ..formats.weights import default_g_idx
from ..models.arch import decoder_layers
from ..nn.qlinear import QuantLinear
from .checkpoint import _tied_names

GPTQ_BITS = (2, 3, 4, 8)  # 5-7 bits exist only in GPTQModel's "gptq_p" planar format
FORMATS = ("gptq", "gptq_v2")
WEIGHTS_FILE = "model.safetensors"


# --- 32-bit words: a little-endian bit stream, shared by both exporters --------------------


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes [..., n] into int32 words [..., ceil(n*bits/32)] along the last
    dimension: value i occupies bits [i*bits, (i+1)*bits) of the row's stream, word w holds
    stream bits [32w, 32w+32). Built from lowbit's byte packer (the same stream in bytes);
    bytes are combined arithmetically, so the result does not depend on host byte order."""
    b = pack(codes.contiguous(), bits)
    nwords = (codes.shape[-1] * bits + 31) // 32
    b = nn.functional.pad(b, (0, 4 * nwords - b.shape[-1])).to(torch.int64)
    b = b.reshape(*b.shape[:-1], nwords, 4)
    words = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_words(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_words: int32 [..., ceil(n*bits/32)] -> uint8 codes [..., n]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    b = torch.stack([(w >> s) & 0xFF for s in (0, 8, 16, 24)], dim=-1).reshape(*w.shape[:-1], -1)
    return unpack(b[..., : packed_row_bytes(n, bits)].to(torch.uint8), bits, n)


# --- plumbing shared by both exporters --------------------------------------------------


def quantized_layers(model: nn.Module, fmt: str, activations: bool = False) -> dict[str, QuantLinear]:
    """The weight-quantized layers. Unless the format writes activation schemes
    (``activations``), refuses activation quantization: it changes what the model computes,
    so dropping it would be a wrong file."""
    layers = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        if m.aspec is not None and m.wspec is None:
            raise LowbitError(f"layer {name} quantizes its activations ({m.aspec.describe()}) but not its weights, which the {fmt} export cannot express")
        if m.aspec is not None and not activations:
            raise LowbitError(
                f"layer {name} quantizes its activations ({m.aspec.describe()}), which the {fmt} export "
                "cannot express; export a weight-only model"
            )
        if m.wspec is not None:
            layers[name] = m
    if not layers:
        raise LowbitError(f"the model has no quantized weights to export as {fmt}")
    return layers


def float_linears(model: nn.Module) -> list[str]:
    """Names of the Linear layers left in float (lm_head, ignored layers)."""
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) or (isinstance(m, QuantLinear) and m.wspec is None))


def float_tensors(model: nn.Module, qlayers: dict[str, QuantLinear]) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict that is not part of a quantized layer's weight, tied
    copies left out (config.json's tie_word_embeddings restores them)."""
    tied = _tied_names(model)
    out = {}
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if name in tied or (owner in qlayers and leaf != "bias"):
            continue
        out[name] = t.detach().contiguous()
    return out


def check_groups(name: str, m: QuantLinear, fmt: str) -> int | None:
    """The layer's group size (None: per-channel) after refusing what ``fmt`` cannot hold:
    a narrower last group (loaders size every group alike)."""
    if m.holds_format:
        raise LowbitError(f"layer {name} holds {m.wspec.format} weights, which {fmt} cannot store (integer grids only)")
    gs = m.wspec.group_size
    if gs is not None and m.in_features % gs:
        raise LowbitError(
            f"layer {name}: group size {gs} does not divide the input width {m.in_features} (the last group is narrower), "
            f"which {fmt} loaders cannot read; quantize with a group size that divides every width"
        )
    return gs


def write_export(
    model,
    tokenizer,
    out_dir: str | Path,
    tensors: dict[str, torch.Tensor],
    qconfig: dict,
    extra_files: dict[str, dict] | None = None,
    dtype: str | None = None,
) -> Path:
    """Write tensors, config.json (with ``quantization_config``; ``dtype`` replaces the
    config's default loading dtype), generation config and tokenizer into a temporary
    folder renamed to ``out_dir`` when complete."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not _is_export(out_dir, qconfig["quant_method"]))):
        raise LowbitError(f"output {out_dir} exists and is not a {qconfig['quant_method']} export; refusing to overwrite it")
    with atomic_path(out_dir, is_dir=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = qconfig
        if dtype is not None:
            cfg["dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for fname, content in (extra_files or {}).items():
            (tmp / fname).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def _is_export(folder: Path, quant_method: str) -> bool:
    try:
        return json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == quant_method
    except (OSError, ValueError, KeyError, TypeError):
        return False


def lowbit_version() -> str:
    from .. import __version__

    return __version__


# --- GPTQ -------------------------------------------------------------------------------


def _uniform_spec(qlayers: dict[str, QuantLinear]) -> tuple[int, int | None, bool]:
    specs = {(m.wspec.bits, m.wspec.group_size, m.wspec.symmetric) for m in qlayers.values()}
    if len(specs) > 1:
        shown = ", ".join(f"{b}-bit g{g or 'channel'} {'sym' if s else 'asym'}" for b, g, s in sorted(specs, key=str))
        raise LowbitError(f"GPTQ export needs one weight format for all layers; this model mixes {shown}")
    return specs.pop()


def gptq_layer(name: str, m: QuantLinear, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales, g_idx of one layer (bias handled with the float tensors)."""
    bits = m.wspec.bits
    gs = check_groups(name, m, "GPTQ")
    for what, n in (("input", m.in_features), ("output", m.out_features)):
        if n * bits % 32:
            raise LowbitError(
                f"layer {name}: {what} width {n} does not fill whole 32-bit words at {bits} bits "
                f"(it must be a multiple of {32 // math.gcd(bits, 32)})"
            )
    n_groups = m.scales.shape[1]
    expected = 1 if gs is None else m.in_features // gs
    if n_groups != expected:
        raise LowbitError(f"layer {name}: {n_groups} groups where GPTQ expects {expected} for group size {gs}")
    scales = m.scales.to(torch.float16)
    if not torch.equal(scales.to(m.scales.dtype), m.scales):
        dt = str(m.scales.dtype).removeprefix("torch.")
        raise LowbitError(
            f"layer {name}: its {dt} scales are not exactly representable in float16, which GPTQ stores; "
            "quantize with --scale-dtype float16"
        )
    zeros = m.zeros if hasattr(m, "zeros") else torch.full_like(m.scales, 2 ** (bits - 1), dtype=torch.uint8)
    if checkpoint_format == "gptq":
        if bool((zeros == 0).any()):
            raise LowbitError(
                f"layer {name} has zero points equal to 0, which the GPTQ v1 format (it stores zero - 1) "
                "cannot hold; export with checkpoint format gptq_v2"
            )
        zeros = zeros - 1
    return {
        f"{name}.qweight": pack_words(m.codes, bits).T.contiguous(),
        f"{name}.qzeros": pack_words(zeros.T.contiguous(), bits),
        f"{name}.scales": scales.T.contiguous(),
        f"{name}.g_idx": m.g_idx.to(torch.int32).contiguous(),
    }


def export_gptq(model, tokenizer, out_dir: str | Path, checkpoint_format: str = "gptq") -> Path:
    """Write a lowbit-quantized model as a GPTQ checkpoint folder (see module doc)."""
    if checkpoint_format not in FORMATS:
        raise LowbitError(f"GPTQ checkpoint format must be one of {', '.join(FORMATS)}, got {checkpoint_format!r}")
    qlayers = quantized_layers(model, "GPTQ")
    bits, gs, sym = _uniform_spec(qlayers)
    if bits not in GPTQ_BITS:
        raise LowbitError(f"GPTQ stores {', '.join(map(str, GPTQ_BITS))}-bit weights, not {bits}-bit")
    # loaders quantize every Linear of the decoder blocks and nothing outside them
    blocks, _ = decoder_layers(model)
    decoder_floats = [n for n in float_linears(model) if n.startswith(blocks + ".")]
    if decoder_floats:
        raise LowbitError(f"GPTQ export needs every decoder Linear quantized; {decoder_floats[0]} is left in float")
    tensors = float_tensors(model, qlayers)
    desc_act = False
    for name, m in qlayers.items():
        tensors.update(gptq_layer(name, m, checkpoint_format))
        # GPTQ loaders without act-order assume g_idx = i // group_size and ignore the file's
        desc_act |= not torch.equal(m.g_idx, default_g_idx(m.in_features, gs))
    qconfig = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": -1 if gs is None else gs,
        "desc_act": desc_act,
        "sym": sym,
        "lm_head": False,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"lowbit:{lowbit_version()}"]},
    }
    # Older readers (AutoGPTQ, early vLLM) look for quantize_config.json beside config.json.
    # GPTQ kernels compute in float16, the dtype its scales are stored in: say so, so that
    # loaders choosing a dtype from the config pick one that holds the scales exactly
    # (from float32 GPTQModel would pick bfloat16). Float tensors keep lowbit's float32.
    extra = {"quantize_config.json": qconfig}
    return write_export(model, tokenizer, out_dir, dict(sorted(tensors.items())), qconfig, extra, dtype="float16")
