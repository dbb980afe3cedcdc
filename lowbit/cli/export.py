"""``lowbit export``: write a lowbit checkpoint in a format other tools load.

    lowbit export compressed-tensors CKPT -o OUT     transformers / vLLM (pack-quantized; W8A8 int-quantized)
    lowbit export gptq CKPT -o OUT [--format gptq_v2]  GPTQModel, AutoGPTQ, vLLM
    lowbit export awq CKPT -o OUT                     AWQ GEMM layout (AutoAWQ, vLLM, GPTQModel)
    lowbit export bnb CKPT -o OUT                     bitsandbytes 4-bit (NF4/FP4; transformers)
    lowbit export gguf MODEL --type Q4_K_M [--imatrix] -o OUT.gguf   llama.cpp (see cli/gguf.py)

Registered by main.py as a sub-app; errors follow main.py's pattern (``error: ...``, exit 2).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

export_app = typer.Typer(
    help="Export a model or lowbit checkpoint to a format other tools load (compressed-tensors, GPTQ, AWQ, bitsandbytes, GGUF).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

def handle_errors(fn):
    """main.py's handler (LowbitError -> ``error: ...``, exit 2), looked up when the command
    runs, so main.py may import this module wherever it likes without an import cycle."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .main import handle_errors as main_handler

        return main_handler(fn)(*args, **kwargs)

    return wrapper


def _say(text: str) -> None:
    from .main import out

    out.print(text)


CheckpointArg = Annotated[str, typer.Argument(help="A lowbit checkpoint folder (written by `lowbit quantize`).")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Folder to write (created; an existing one is replaced only if it is an export of the same kind).")]


def _load(checkpoint: str, output: Path):
    from .. import api
    from ..errors import LowbitError
    from ..cache import check_writable
    from ..models.loader import is_lowbit_checkpoint

    if not Path(checkpoint).exists():
        raise LowbitError(f"checkpoint {checkpoint} does not exist")
    if not is_lowbit_checkpoint(Path(checkpoint)):
        raise LowbitError(f"{checkpoint} is not a lowbit checkpoint folder; quantize the model first with `lowbit quantize`")
    check_writable(output)
    model, tok, _ = api.load(checkpoint)
    return model, tok


@export_app.command("compressed-tensors")
@handle_errors
def compressed_tensors(checkpoint: CheckpointArg, output: OutputOpt) -> None:
    """Write CHECKPOINT in compressed-tensors (transformers with compressed-tensors, vLLM): weight-only layers
    pack-quantized, layers that quantize their inputs too (SmoothQuant, ZeroQuant: W8A8) int-quantized with their
    activation scheme. vLLM's int8 W8A8 kernels want 8-bit symmetric per-channel weights (a warning says when not)."""
    from ..export.compressed_tensors import export_compressed_tensors, layer_format, vllm_warnings
    from ..export.gptq import quantized_layers

    model, tok = _load(checkpoint, output)
    export_compressed_tensors(model, tok, output)
    layers = quantized_layers(model, "compressed-tensors", activations=True)
    for line in vllm_warnings(layers):
        _say(f"note: {line}")
    kinds = sorted({layer_format(m) for m in layers.values()})
    _say(f"wrote {output}/ (compressed-tensors {' and '.join(kinds)})")


@export_app.command("gptq")
@handle_errors
def gptq(
    checkpoint: CheckpointArg,
    output: OutputOpt,
    format: Annotated[str, typer.Option("--format", help="gptq (v1: zero points stored minus one; vLLM, AutoGPTQ) or gptq_v2 (zero points as they are; GPTQModel, and needed when a zero point is 0).")] = "gptq",
) -> None:
    """Write CHECKPOINT in the GPTQ layout (qweight, qzeros, scales, g_idx)."""
    from ..export.gptq import export_gptq

    model, tok = _load(checkpoint, output)
    export_gptq(model, tok, output, checkpoint_format=format)
    _say(f"wrote {output}/ (GPTQ, checkpoint format {format})")


@export_app.command("awq")
@handle_errors
def awq(checkpoint: CheckpointArg, output: OutputOpt) -> None:
    """Write CHECKPOINT in the AWQ GEMM layout (qweight, qzeros, scales packed along the output)."""
    from ..export.awq import export_awq

    model, tok = _load(checkpoint, output)
    export_awq(model, tok, output)
    _say(f"wrote {output}/ (AWQ GEMM)")


@export_app.command("bnb")
@handle_errors
def bnb(checkpoint: CheckpointArg, output: OutputOpt) -> None:
    """Write CHECKPOINT (nf4, nf4-dq, fp4 or fp4-dq weights) in the 4-bit layout transformers reloads with bitsandbytes."""
    from ..export.bnb import export_bnb

    model, tok = _load(checkpoint, output)
    export_bnb(model, tok, output)
    _say(f"wrote {output}/ (bitsandbytes 4-bit; load with transformers and bitsandbytes installed)")


def _add_gguf() -> None:
    from .gguf import export_gguf

    export_app.command("gguf")(export_gguf)


_add_gguf()
