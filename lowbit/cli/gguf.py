"""``lowbit export gguf``: write a model as a GGUF file for llama.cpp.

    lowbit export gguf smollm2-135m --type Q4_K_M --imatrix -o smollm2-q4_k_m.gguf
    lowbit export gguf smollm2-135m --type Q4_K_M --gptq -o smollm2-q4_k_m-gptq.gguf
    lowbit export gguf smollm2-135m --type Q8_0 --smooth 0.7 -o smollm2-q8_0-smooth.gguf

``export_gguf`` is a plain typer command function; lowbit/cli/export.py registers it on
its sub-app (``export_app.command("gguf")(export_gguf)``). Errors follow main.py's pattern
(``error: ...``, exit 2), looked up at call time so that importing this module from
export.py cannot form an import cycle.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .main import handle_errors as main_handler

        return main_handler(fn)(*args, **kwargs)

    return wrapper


_TYPES = "Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, F16, BF16, F32"


@_handle_errors
def export_gguf(
    model: Annotated[
        str,
        typer.Argument(
            help="Embedded model name (smollm2-135m), a .gguf file, a Hugging Face folder, or a lowbit checkpoint "
            "folder. A checkpoint made with `lowbit quantize --format Q4_K_M` (any llama.cpp file type) is written with "
            "exactly its codes, and so is one whose Linears hold llama.cpp types of its own (--format Q5_0, or the "
            "per-layer mixture of a --target-bpw/--max-size budget with GGML --candidates); any other checkpoint is "
            "exported from its dequantized weights (its own number format is "
            "not kept; activation quantization is dropped)."
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="GGUF file to write (replaced if it exists).")],
    type: Annotated[
        Optional[str],
        typer.Option(
            "--type",
            help=f"llama.cpp file type: per-tensor types chosen as llama-quantize does ({_TYPES}). Default: Q4_K_M, or "
            "for a checkpoint quantized with --format <file type> that file type, its codes copied unchanged. For a "
            "checkpoint whose Linears hold their own GGML types, this types only the other tensors (embeddings, output).",
        ),
    ] = None,
    imatrix: Annotated[
        bool,
        typer.Option(
            "--imatrix",
            help="Weigh quantization errors by an importance matrix (mean x^2 per input column of every Linear) "
            "taken from the calibration windows as lowbit's block-wise runner feeds each layer (upstream blocks "
            "already quantized): `lowbit quantize --method rtn --option imatrix=true --format TYPE`.",
        ),
    ] = False,
    calib: Annotated[
        Optional[str],
        typer.Option("--calib", help="Calibration text for --imatrix (file or folder). Default: the end of the embedded Wikipedia text."),
    ] = None,
    gptq: Annotated[
        bool,
        typer.Option(
            "--gptq",
            help="GPTQ-fed codes: each Linear's block scales are chosen as with --imatrix (importance from the same "
            "calibration pass), then GPTQ picks the codes on that grid with error feedback: `lowbit quantize --method "
            "gptq --format TYPE`. Slower (minutes).",
        ),
    ] = False,
    save_imatrix: Annotated[
        Optional[Path],
        typer.Option("--save-imatrix", help="Also write the importance matrix in llama.cpp's imatrix GGUF format."),
    ] = None,
    smooth: Annotated[
        Optional[float],
        typer.Option(
            "--smooth",
            help="SmoothQuant migration strength alpha in (0, 1]: before quantizing, move activation outliers into "
            "the weights (s = max|x|^alpha / max|w|^(1-alpha) per input channel, folded into the norms and up_proj, "
            "measured on the calibration windows). The float model is unchanged as a function; llama.cpp, which "
            "rounds every Linear's input to 8 bits, then loses less. 0.7 is a good start (BENCHMARKS.md).",
        ),
    ] = None,
    max_size: Annotated[
        Optional[str],
        typer.Option(
            "--max-size",
            help="A file of at most this size (100MB, 1.5GB, 300MiB) with lowbit's own mixture instead of the file "
            "type's: each decoder Linear gets one of --candidates, chosen for the least predicted loss (see "
            "--sensitivity; a knapsack over the exact bytes), quantized with --imatrix (implied) "
            "or --gptq; --type (default Q4_K_M) then types only the embedding, output and norms.",
            show_default=False,
        ),
    ] = None,
    candidates: Annotated[
        str,
        typer.Option("--candidates", help="GGML types --max-size chooses from, comma-separated (Q4_1/Q5_1 are left out by default: "
                     "they hold the embedded SmolLM2's own Q4_1 grid)."),
    ] = "Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q4_0,Q5_0,Q8_0",
    sensitivity: Annotated[
        str,
        typer.Option("--sensitivity", help="How --max-size predicts each layer's loss: 'fisher' weighs its output error on "
                     "the calibration windows by the squared gradient of the loss per output channel (one backward pass); "
                     "'output' counts the output error alone."),
    ] = "fisher",
    search: Annotated[
        str,
        typer.Option(
            "--search",
            help="Scales of tensors without importance data: 'weighted' searches them as llama.cpp does with an "
            "imatrix, every column equally important (lower error, no data needed); 'llama.cpp' uses "
            "llama-quantize's plain rounding (same bytes as llama.cpp from the same float16 weights).",
        ),
    ] = "weighted",
) -> None:
    """Write MODEL as a GGUF file (llama, qwen2, gemma3 text models) quantized by lowbit's GGML codecs."""
    import time

    from .. import api
    from ..calibration.data import Protocol
    from ..errors import LowbitError
    from ..export import gguf_writer
    from ..export.gguf_presets import preset
    from ..export.gguf_quantize import export_checkpoint_gguf, quantize_to_gguf
    from .main import out

    if type is not None:
        preset(type)  # an unknown type fails before anything is loaded
    if search not in gguf_writer.SEARCHES:
        raise LowbitError(f"--search must be one of {', '.join(gguf_writer.SEARCHES)}, got {search!r}")
    if calib is not None and not (imatrix or gptq or smooth is not None or max_size is not None):
        raise LowbitError("--calib is only used with --imatrix, --gptq, --smooth or --max-size")
    if smooth is not None and not 0 < smooth <= 1:
        raise LowbitError(f"--smooth (alpha) must be in (0, 1], got {smooth}")
    if imatrix and gptq:
        raise LowbitError("--gptq takes its importance from its own calibration pass; give --imatrix or --gptq, not both")
    max_bytes = None
    if max_size is not None:
        from ..formats.names import canonical
        from .main import parse_size

        max_bytes = parse_size(max_size)
        imatrix = imatrix or not gptq
        cands = tuple(canonical(c.strip()) for c in candidates.split(",") if c.strip())
        if not cands:
            raise LowbitError("--candidates: give at least one GGML type")
        for c in cands:
            if c not in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
                raise LowbitError(f"--candidates: {c!r} is not a GGML type lowbit quantizes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)")
    if save_imatrix is not None and not imatrix:
        raise LowbitError("--save-imatrix needs --imatrix")
    if output.is_dir():
        raise LowbitError(f"output {output} is a folder; give a file name such as model.gguf")
    from ..cache import check_writable

    check_writable(output)
    if save_imatrix is not None:
        check_writable(save_imatrix, "imatrix")
    start = time.perf_counter()
    m, tok, info = api.load(model)
    checkpoint = info.get("checkpoint")
    for flag, on in (("--gptq", gptq), ("--imatrix", imatrix), ("--smooth", smooth is not None), ("--max-size", max_bytes is not None)):
        if on and checkpoint:
            raise LowbitError(f"{flag} works on a float model, and {model} is a lowbit checkpoint (already quantized)")
    if checkpoint:
        result, copied = export_checkpoint_gguf(m, tok, checkpoint, output, type, search=search, source=info["source"],
                                                progress=api.progress_bar)
        note = " (the checkpoint's own codes)" if copied else " (dequantized lowbit checkpoint, quantized again)"
        steps = ""
    else:
        windows = api.prepare_windows(tok, Protocol(), calib=calib)[1] if (gptq or imatrix or smooth is not None) else None
        run = quantize_to_gguf(m, tok, output, type or "Q4_K_M", windows=windows, gptq=gptq, imatrix=imatrix, smooth=smooth,
                               search=search, source=info["source"], progress=api.progress_bar, save_imatrix=save_imatrix,
                               imatrix_dataset=calib or "wikipedia", max_bytes=max_bytes,
                               **({"candidates": cands, "sensitivity": sensitivity} if max_bytes is not None else {}))
        result, note = run.export, ""
        if max_bytes is not None:
            note = f" (lowbit's mixture for at most {max_bytes:,} bytes; predicted {sensitivity} error {run.allocation['predicted_total']:.4g})"
        steps = f"{f' + smoothing {smooth:g}' if smooth is not None else ''}{' + imatrix' if imatrix else ''}{' + GPTQ' if gptq else ''}"
    counts = ", ".join(f"{n} {t}" for t, n in sorted(result.type_counts.items(), key=lambda kv: -kv[1]))
    out.print(
        f"wrote {output}{note}: {result.preset}{steps}, {result.file_bytes:,} bytes, "
        f"{result.bits_per_weight:.3f} bits per weight, tensors: {counts}; {time.perf_counter() - start:.1f} s",
        highlight=False,
        soft_wrap=True,
    )
