"""``lowbit activations MODEL -o DIR``: where a model's activation outliers are.

Runs the model on calibration windows (the protocol's, from the end of the text, as the
quantization methods see them) and writes DIR/activations.json (per layer and input
channel: max |x|, counts of |x| > threshold) and DIR/activations.png. Registered by
main.py (``app.command("activations")(activations)``); errors follow main.py's pattern
(``error: ...``, exit 2).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer


def handle_errors(fn):
    """main.py's handler, looked up when the command runs (no import cycle)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .main import handle_errors as main_handler

        return main_handler(fn)(*args, **kwargs)

    return wrapper


@handle_errors
def activations(
    model: Annotated[str, typer.Argument(help="Embedded model name (smollm2-135m), a .gguf file, a Hugging Face folder, a hub id, or a lowbit checkpoint.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write activations.json and activations.png into (created).")],
    windows: Annotated[int, typer.Option("--windows", help="Calibration windows to run (each --seq-len tokens).")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 512,
    threshold: Annotated[float, typer.Option("--threshold", help="Count |x| above this as an outlier (LLM.int8()'s 6.0).")] = 6.0,
    data: Annotated[Optional[str], typer.Option("--data", help="Text (file or folder). Default: the embedded Wikipedia articles.")] = None,
    calib: Annotated[Optional[str], typer.Option("--calib", help="Take the windows from this text instead (file or folder).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Per layer and input channel: max |x| and how often |x| exceeds the threshold (JSON and a plot)."""
    from .. import api
    from ..cache import check_writable
    from ..calibration.data import Protocol, bos_id_for, calib_windows, check_lengths, tokenize
    from ..calibration.text import read_text
    from ..errors import LowbitError
    from ..evaluation.activations import activation_report, save_activation_report
    from .main import out

    if windows < 1 or seq_len < 2:
        raise LowbitError(f"--windows must be at least 1 and --seq-len at least 2, got {windows} and {seq_len}")
    if not threshold > 0:
        raise LowbitError(f"--threshold must be positive, got {threshold}")
    check_writable(output / "activations.json")
    m, tok, _ = api.load(model)
    check_lengths(m, seq_len=seq_len)
    protocol = Protocol(n_calib=windows, calib_len=seq_len)
    source = calib or data
    ids = tokenize(tok, read_text(source))  # windows from the end of the text, as calibration takes them
    calib_w = calib_windows(ids, protocol, bos_id_for(tok, protocol), f"text {source or 'wikipedia'}")
    report = activation_report(m, calib_w, threshold, progress=api.progress_bar("activations", not quiet))
    report["model"] = model
    save_activation_report(report, output, title=f"{model}: {windows} x {seq_len} tokens")
    s = report["summary"]
    out.print(
        f"{s['layers_with_outliers']} of {s['n_layers']} layers have inputs with |x| > {threshold:g} "
        f"({s['outlier_channels_total']} channels in all); largest |x| {s['max_abs']:.1f} in {s['max_abs_layer']}; wrote {output}/"
    )
