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
    allocation: dict | None = None  # with max_bytes: the bit budget's choices and predictions


# GGML types a size-budgeted mixture chooses from by default: every type lowbit quantizes
# except Q4_1 and Q5_1, whose grids contain the embedded SmolLM2's own (its weights were
# Q4_1), which would make that model's results meaningless; add them with ``candidates``.
MIXTURE_CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q8_0")


def decoder_linear_bytes(model, path: str | Path) -> int:
    """Bytes of the decoder Linears' tensor data in the GGUF file at ``path``."""
    from gguf import GGUFReader

    from ..models.arch import block_linears, decoder_layers
    from .gguf_writer import hf_to_gguf_names

    names = hf_to_gguf_names(model)
    prefix, layers = decoder_layers(model)
    lin = {names[f"{prefix}.{i}.{local}.weight"] for i, b in enumerate(layers) for local in block_linears(b)}
    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name in lin)


def quantize_to_gguf(model, tokenizer, out: str | Path, file_type: str, *, windows: torch.Tensor | None = None,
                     gptq: bool = False, imatrix: bool = False, smooth: float | None = None, search: str = "weighted",
                     source: dict | None = None, progress=None, save_imatrix: str | Path | None = None,
                     imatrix_dataset: str = "wikipedia", max_bytes: int | None = None,
                     candidates: tuple[str, ...] = MIXTURE_CANDIDATES, sensitivity: str = "fisher") -> GGUFRun:
    """Steps 1-3 above on a float ``model`` (changed in place). windows: calibration
    windows, needed by gptq, imatrix and smooth. progress: a factory desc -> iterable
    wrapper (api.progress_bar), or None.

    max_bytes: instead of the file type's plan, each decoder Linear gets one of
    ``candidates`` (GGML types) chosen by the bit budget (algorithms.allocate) so that the
    whole file takes at most this many bytes; ``file_type`` then types only the other
    tensors. The bytes those take (metadata, embedding, output, norms) are measured by
    writing the file type's file once beside ``out``. Needs gptq or imatrix (the method
    run on the chosen types). sensitivity: the bit budget's estimate of each layer's loss
    (algorithms.allocate: "fisher" or "output")."""
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
    if max_bytes is not None:
        if not (gptq or imatrix):
            raise LowbitError("a size-budgeted GGUF mixture runs --imatrix or --gptq on the chosen types; give one")
        return _sized_mixture(model, tokenizer, Path(out), p.name, windows, gptq, max_bytes, tuple(candidates), search, source,
                              progress, run, sensitivity)
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


def _sized_mixture(model, tokenizer, out: Path, file_type: str, windows, gptq: bool, max_bytes: int,
                   candidates: tuple[str, ...], search: str, source, progress, run: GGUFRun,
                   sensitivity: str = "fisher") -> GGUFRun:
    import tempfile

    from .. import api
    from ..algorithms.allocate import Budget
    from ..algorithms.base import method_config
    from . import gguf_writer

    if not candidates:
        raise LowbitError("a size-budgeted GGUF needs at least one candidate GGML type")
    bar = progress or (lambda desc: None)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.probe") as tmp:
        probe = gguf_writer.export_gguf(model, tokenizer, Path(tmp) / "probe.gguf", file_type, source=source, search=search,
                                        progress=bar(f"measure {file_type}'s other tensors"), plan_imatrix=False)
        overhead = probe.file_bytes - decoder_linear_bytes(model, probe.path)
    if max_bytes <= overhead:
        raise LowbitError(f"--max-size {max_bytes:,} bytes: the tensors besides the decoder Linears (embedding, output, "
                          f"norms, metadata) already take {overhead:,} bytes as {file_type}")
    run.method = "gptq" if gptq else "rtn"
    config = method_config(run.method, weight={"format": candidates[0]}, options={} if gptq else {"imatrix": True},
                           calib_precision="fp32")
    report = api.quantize(model, config, windows, progress=progress is not None,
                          budget=Budget(bytes=max_bytes - overhead, candidates=candidates, sensitivity=sensitivity))
    run.quantize_seconds, run.allocation = report.seconds, report.allocation
    run.export = gguf_writer.export_gguf(model, tokenizer, out, file_type, source=source, progress=bar("write mixture"),
                                         prequantized=stored_ggml(model), search=search, plan_imatrix=False, own_types=True)
    if run.export.file_bytes > max_bytes:  # the plan counts every Linear byte; only a bug gets here
        out.unlink()
        raise LowbitError(f"GGUF mixture came out at {run.export.file_bytes:,} bytes, over --max-size {max_bytes:,}")
    return run
