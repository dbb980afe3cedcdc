"""Quantize for llama.cpp through lowbit's one runner, then write the GGUF file.

    lowbit export gguf MODEL --type Q4_K_M [--smooth A] [--imatrix | --gptq] -o out.gguf

is, in this order (the library owns it; the CLI only parses and prints):

1. ``--smooth A``: SmoothQuant's migration folded into the float model (the function is
   unchanged; llama.cpp, which rounds each Linear's input to 8 bits, then loses less);
2. ``--gptq``: ``lowbit.quantize`` with method gptq on the file type's plan of GGML
   formats (gguf_plan: one type per decoder Linear), float32 calibration matmuls;
   ``--imatrix``: the same with method rtn and its ``imatrix`` option (each format's
   scale search weighted by mean x^2 of the layer's inputs, as the runner feeds them);
3. the writer: decoder Linears copied as the codes step 2 chose (no requantization), every
   other tensor quantized by the plan (search "weighted" or llama.cpp's plain rounding).

``lowbit quantize MODEL --method gptq --format Q4_K_M -o CKPT`` followed by ``lowbit
export gguf CKPT`` writes the same bytes as step 2 + 3 (``stored_ggml`` reads the codes
back out of the checkpoint's layers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LowbitError

log = logging.getLogger(__name__)


def stored_ggml(model: torch.nn.Module) -> dict[str, tuple]:
    """{HF weight name: (GGML type, uint8 bytes [rows, row_bytes])} of every Linear that
    holds a GGML format (lowbit.quantize with a GGML type, or a checkpoint of one)."""
    from gguf import GGMLQuantizationType as T

    from ..nn.qlinear import QuantLinear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.holds_format and getattr(m.fmt, "kind", "") == "ggml":
            out[f"{name}.weight"] = (T[m.fmt.type], np.ascontiguousarray(m.fmt.pack(m.encoded)["ggml"].numpy()))
    return out


def checkpoint_plan(meta: dict) -> tuple[str | None, bool]:
    """(file type, whether its fits were importance-weighted) of a lowbit checkpoint that
    was quantized to a llama.cpp file type's plan; (None, False) for any other."""
    from ..algorithms import make_algorithm
    from ..config import QuantConfig
    from ..formats.names import is_mixture

    q = meta.get("quantization") or {}
    fmt = (q.get("weight") or {}).get("format")
    if not is_mixture(fmt):
        return None, False
    return fmt, make_algorithm(QuantConfig.from_dict(q)).fit_importance()


@dataclass
class GGUFRun:
    export: object  # gguf_writer.GGUFExport
    quantize_seconds: float = 0.0
    smooth: float | None = None
    method: str | None = None  # "gptq", "rtn" (imatrix), or None (the writer quantizes everything)


def quantize_to_gguf(model, tokenizer, out: str | Path, file_type: str, *, windows: torch.Tensor | None = None,
                     gptq: bool = False, imatrix: bool = False, smooth: float | None = None, search: str = "weighted",
                     source: dict | None = None, progress=None, save_imatrix: str | Path | None = None,
                     imatrix_dataset: str = "wikipedia") -> GGUFRun:
    """Steps 1-3 above on a float ``model`` (changed in place). windows: calibration
    windows, needed by gptq, imatrix and smooth. progress: a factory desc -> iterable
    wrapper (api.progress_bar), or None."""
    from .. import api
    from ..algorithms.base import method_config
    from ..nn.qlinear import QuantLinear
    from . import gguf_writer
    from .gguf_presets import preset

    p = preset(file_type)
    if gptq and imatrix:
        raise LowbitError("--gptq takes its importance from its own calibration pass; give --imatrix or --gptq, not both")
    if (gptq or imatrix or smooth is not None or save_imatrix is not None) and (windows is None or windows.numel() == 0):
        raise LowbitError("GGUF export: --gptq, --imatrix, --smooth and --save-imatrix need calibration windows")
    if any(isinstance(m, QuantLinear) for m in model.modules()) and (gptq or imatrix or smooth is not None):
        raise LowbitError("--gptq, --imatrix and --smooth work on a float model, and this one is already quantized by lowbit")
    bar = progress or (lambda desc: None)
    gguf_writer.hf_to_gguf_names(model)  # an unsupported architecture fails before calibration
    run = GGUFRun(export=None, smooth=smooth)
    if smooth is not None:
        from ..algorithms.smoothquant import smooth_model

        smooth_model(model, windows, smooth, progress=bar("smooth"))
    if save_imatrix is not None:  # llama.cpp's own imatrix: the float (smoothed) model's inputs
        from ..calibration.imatrix import collect_imatrix
        from ..calibration.imatrix import save_imatrix as write_imatrix

        imat = collect_imatrix(model, windows, progress=bar("imatrix"))
        names = gguf_writer.hf_to_gguf_names(model)
        by_gguf = {names[f"{k}.weight"]: v.numpy() for k, v in imat.items() if f"{k}.weight" in names}
        write_imatrix(save_imatrix, by_gguf, n_tokens=windows.numel(), chunk_size=windows.shape[1], dataset=imatrix_dataset)
    if p.base.name in ("F32", "F16", "BF16") and (gptq or imatrix):
        raise LowbitError(f"--gptq and --imatrix need a quantized file type, not {p.name}")
    if gptq or imatrix:
        run.method = "gptq" if gptq else "rtn"
        options = {} if gptq else {"imatrix": True}
        config = method_config(run.method, weight={"format": p.name}, options=options, calib_precision="fp32")
        report = api.quantize(model, config, windows, progress=progress is not None)
        run.quantize_seconds = report.seconds
    prequantized = stored_ggml(model)
    run.export = gguf_writer.export_gguf(
        model, tokenizer, out, p.name, source=source, progress=bar(f"write {p.name}"), prequantized=prequantized,
        search=search, plan_imatrix=gptq or imatrix,
    )
    return run


def export_checkpoint_gguf(model, tokenizer, meta: dict, out: str | Path, file_type: str | None, *, search: str = "weighted",
                           source: dict | None = None, progress=None):
    """A lowbit checkpoint as a GGUF file. One quantized to a file type's plan is written
    with its own codes (file_type None or the same). One whose Linears hold GGML types of
    its own choosing (``--format Q5_0``, or a per-layer mixture from a bit budget) keeps
    those codes and types, and ``file_type`` (default Q4_K_M) types only the other tensors.
    Any other is dequantized and quantized again to ``file_type`` (default Q4_K_M).
    Returns (GGUFExport, whether the codes were copied)."""
    from . import gguf_writer

    planned, importance = checkpoint_plan(meta)
    if planned is not None and file_type not in (None, planned):
        raise LowbitError(f"this checkpoint holds {planned} codes; exporting it as {file_type} would quantize them again (omit --type)")
    bar = progress or (lambda desc: None)
    ftype = planned or file_type or "Q4_K_M"
    prequantized = stored_ggml(model)
    own = planned is None and bool(prequantized)
    result = gguf_writer.export_gguf(model, tokenizer, out, ftype, source=source, progress=bar(f"write {ftype}"),
                                     prequantized=prequantized, search=search,
                                     plan_imatrix=importance if planned else (False if own else None), own_types=own)
    return result, bool(prequantized)
