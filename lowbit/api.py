"""The Python API; the CLI is a thin layer over these functions.

    import lowbit
    model, tok, info = lowbit.load("smollm2-135m")
    evals, calib = lowbit.prepare_windows(tok)
    report = lowbit.quantize(model, lowbit.QuantConfig(method="rtn", weight=lowbit.WeightSpec(bits=4)), calib)
    result = lowbit.evaluate(model, evals)
    lowbit.save(model, tok, "out", report)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .algorithms import make_algorithm
from .algorithms.base import Algorithm
from .cache import cache_dir, text_hash
from .calibration.data import Protocol, bos_id_for, calib_windows, eval_windows, split_windows, tokenize
from .calibration.text import read_text
from .config import QuantConfig
from .runner import float32_matmul_precision
from .errors import LowbitError
from .evaluation.metrics import EvalResult, Reference, evaluate
from .evaluation.reference import FORMAT as REFERENCE_FORMAT
from .evaluation.reference import prune as prune_references
from .export.checkpoint import load_checkpoint, quant_layers, save_checkpoint
from .export.gguf_plan import plan_config
from .formats.memory import weight_storage
from .formats.names import is_mixture
from .models.loader import is_lowbit_checkpoint, load_model, release_free_memory
from .models.stream import evaluate_blockwise, stream_of
from .runner import run_blocks

log = logging.getLogger(__name__)


def progress_bar(desc: str, enabled: bool = True) -> Callable | None:
    """A function that wraps an iterable in a progress display labelled ``desc`` (None if
    disabled): a tqdm bar on a terminal; elsewhere (a log file, CI), where a bar's
    carriage-return frames would pile up, one line when the stage ends, with its time."""
    if not enabled:
        return None
    if not sys.stderr.isatty():
        return lambda it: _stage_line(it, desc)
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=desc, unit="step", leave=False, dynamic_ncols=True)


def _stage_line(iterable, desc: str):
    start, n = time.perf_counter(), 0
    for n, item in enumerate(iterable, 1):
        yield item
    print(f"lowbit: {desc}: {n} steps in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


@dataclass
class QuantReport:
    """What a quantization run did, layer by layer."""

    config: dict
    layers: list[dict]
    seconds: float
    storage: dict = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)  # the bit budget's choices and predictions, when one was given
    threads: int = 0  # torch threads the run used

    def to_dict(self) -> dict:
        return asdict(self)


def load(spec: str, verify: bool = True, kernel: str = "reference", stream: bool = False):
    """(model, tokenizer, info) for a model spec or a lowbit checkpoint folder.

    info["source"] describes the unquantized model (for checkpoints: the one it was made
    from); info["checkpoint"] holds the checkpoint's metadata when MODEL is one. verify=False
    skips the content-hash check of a checkpoint's tensors. kernel="int4", "int8" or "auto"
    (each layer on the first of int4, int8 it can run) puts a checkpoint's layers on that
    compute path with their weights held packed only (the
    unpacked codes are freed: such a model runs and generates, but cannot be quantized
    again or saved); layers the kernel cannot run stay on the reference path. stream=True
    leaves a float model's decoder blocks on disk until quantization or evaluation reaches
    each (see lowbit.models.stream); a checkpoint loads whole and is evaluated a block at a
    time, each block dequantized only while it runs."""
    from .nn import KERNELS, set_kernel

    if kernel not in KERNELS + ("auto",):
        raise LowbitError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}, or auto")
    if is_lowbit_checkpoint(Path(spec)):
        model, tokenizer, meta = load_checkpoint(spec, verify=verify)
        if stream:
            evaluate_blockwise(model)
        info = {"source": meta.get("source", {}), "checkpoint": meta, "kernel": kernel}
    else:
        if kernel not in ("reference", "auto"):
            raise LowbitError(f"{spec} is not a lowbit checkpoint; the {kernel} kernel runs quantized checkpoints only")
        model, tokenizer, source = load_model(spec, stream=stream)
        info = {"source": source.to_dict(), "checkpoint": None, "kernel": "reference"}  # a float model: auto is the reference
    if info["kernel"] != "reference":
        set_kernel(model, kernel, keep_codes=False)
    if info["checkpoint"] is not None:
        release_free_memory()
    return model, tokenizer, info


def prepare_windows(tokenizer, protocol: Protocol = Protocol(), data: str | None = None, calib: str | None = None):
    """(evaluation windows, calibration windows) under the protocol.

    data/calib: None for the embedded Wikipedia text, or a text file or folder. When both
    come from the same text, evaluation takes its start and calibration its end, disjoint.
    """
    bos = bos_id_for(tokenizer, protocol)
    ids = tokenize(tokenizer, read_text(data))
    what = f"text {data or 'wikipedia'}"
    if calib is None or calib == data:
        return split_windows(ids, protocol, bos, what)
    cal_ids = tokenize(tokenizer, read_text(calib))
    return eval_windows(ids, protocol, bos, what), calib_windows(cal_ids, protocol, bos, f"calibration text {calib}")


def eval_windows_for(tokenizer, protocol: Protocol = Protocol(), data: str | None = None) -> torch.Tensor:
    """The evaluation windows alone (no calibration part is reserved)."""
    ids = tokenize(tokenizer, read_text(data))
    return eval_windows(ids, protocol, bos_id_for(tokenizer, protocol), f"text {data or 'wikipedia'}")


def quantize(
    model: torch.nn.Module,
    config: QuantConfig,
    calib: torch.Tensor | None = None,
    *,
    progress: bool = True,
    budget=None,
) -> QuantReport:
    """Quantize ``model`` in place under ``config``; the one verb of lowbit.

    calib: calibration windows [n, seq_len]; required by methods that look at data.
    budget: an ``algorithms.allocate.Budget`` (bits per weight or bytes, candidate formats):
    first choose one candidate per decoder Linear for it (measured on ``calib``), then run
    the method with that plan; the report's ``allocation`` holds the choices and predictions.
    """
    allocation = None
    if budget is not None:
        from .algorithms.allocate import allocate

        if stream_of(model) is not None:
            stream_of(model).load_all(model)  # every layer is measured under every candidate
        with matmul_precision("fp32"):
            first = make_algorithm(config)
            allocation = allocate(model, first.config, calib, budget, progress=progress_bar("allocate bits", progress),
                                  weighted=first.fit_importance())
        config = allocation.config
    algo = make_algorithm(config)
    stream = stream_of(model)
    if stream is not None and (type(algo).prepare_model is not Algorithm.prepare_model
                               or (config.weight is not None and is_mixture(config.weight.format))):
        stream.load_all(model)  # a whole-model step comes first (a rotation, llama.cpp's per-layer plan)
    if config.weight is not None and is_mixture(config.weight.format):  # a llama.cpp file type: one GGML type per layer
        algo = make_algorithm(plan_config(model, algo.config, algo.fit_importance()))
    config = algo.config  # a method may complete it (llm-int8 adds its activation format)
    needs = algo.uses_calibration()
    if needs and calib is None:
        raise LowbitError(f"{config.describe()} needs calibration data")
    if config.calib_precision == "auto":
        config = dataclasses.replace(config, calib_precision="bf16" if bf16_supported() else "fp32")
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    with matmul_precision(config.calib_precision):
        algo.prepare_model(model)
        contexts = run_blocks(
            model,
            algo.quantize_block,
            calib if needs else None,
            progress=progress_bar(f"quantize {config.method}", progress),
        )
    if stream_of(model) is not None:
        stream_of(model).load_rest(model)  # the input embedding, dropped during the block loop: a complete model again
    seconds = time.perf_counter() - start
    layers = [r for ctx in contexts for r in ctx.records.values()]
    report = QuantReport(config=config.to_dict(), layers=layers, seconds=seconds, storage=storage_summary(model),
                         allocation=allocation.to_dict() if allocation is not None else {}, threads=torch.get_num_threads())
    model.lowbit_config = config
    return report


def set_threads(n: int | None) -> int:
    """Use n torch threads from now on (None: leave torch's choice, one per physical core)
    and return the count in use; calibration, GPTQ's solves and evaluation all run on them."""
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LowbitError(f"threads must be a positive integer, got {n!r}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def bf16_supported() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextlib.contextmanager
def matmul_precision(precision: str):
    """float32 matmuls as asked for the duration (see config.CALIB_PRECISIONS)."""
    if precision == "fp32":
        yield
        return
    if not bf16_supported():
        raise LowbitError("calibration precision bf16 needs a CPU with bfloat16 support; use fp32")
    with float32_matmul_precision("medium"):
        yield


def storage_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Bytes of the quantized layers as stored, and of everything else in float32."""
    qbytes = qweights = 0
    for m in quant_layers(model).values():
        if m.wspec is None:
            continue
        if m.holds_format:  # the packed tensors' own byte counts
            qbytes += m.fmt.nbytes(m.encoded)
            qweights += m.out_features * m.in_features
            continue
        st = weight_storage(m.out_features, m.in_features, m.wspec, stores_g_idx=False)
        qbytes += st.total
        qweights += st.n_weights
    return {
        "quantized_weights": qweights,
        "quantized_bytes": qbytes,
        "bits_per_weight": 8 * qbytes / qweights if qweights else None,
    }


def windows_key(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def reference_folder(fingerprint: str, windows: torch.Tensor, protocol: Protocol) -> Path:
    return cache_dir("reference") / text_hash(fingerprint, windows_key(windows), protocol.to_dict(), REFERENCE_FORMAT)


def reference_cache_limit() -> int:
    """Bytes the reference cache may hold ($LOWBIT_REFERENCE_CACHE_MB, default 1000 MB):
    the least recently used references beyond it are removed when a new one is recorded."""
    text = os.environ.get("LOWBIT_REFERENCE_CACHE_MB", "1000")
    try:
        mb = float(text)
    except ValueError:
        raise LowbitError(f"LOWBIT_REFERENCE_CACHE_MB must be a number of megabytes, got {text!r}") from None
    return int(mb * 1e6)


def reference_for(model, fingerprint: str, windows: torch.Tensor, protocol: Protocol, progress: bool = True) -> tuple[Reference, EvalResult]:
    """The cached reference of an unquantized model, recording it (one evaluation) if new."""
    folder = reference_folder(fingerprint, windows, protocol)
    if not Reference.exists(folder):
        evaluate(
            model,
            windows,
            record_to=folder,
            record_meta={"fingerprint": fingerprint, "protocol": protocol.to_dict()},
            protocol=protocol.to_dict(),
            progress=progress_bar("evaluate unquantized", progress),
        )
        removed = prune_references(folder.parent, reference_cache_limit(), keep=folder)
        if removed:
            log.info("reference cache: removed %d least recently used reference(s)", len(removed))
    os.utime(folder)  # least recently used goes first when the cache is pruned
    ref = Reference(folder)
    return ref, EvalResult(**ref.meta["result"])


def reference_for_model(model, info: dict, windows: torch.Tensor, protocol: Protocol, enabled: bool = True, progress: bool = True):
    """(Reference or None, the original model's EvalResult or None, a note or None).

    For an unquantized model, the model itself is the reference (recorded if new). For a
    checkpoint, its source model's cached reference is used; if none is cached, the source
    is loaded and recorded, provided it is still available unchanged."""
    if not enabled:
        return None, None, None
    src = info["source"]
    if info["checkpoint"] is None:
        ref, fp = reference_for(model, src["fingerprint"], windows, protocol, progress)
        return ref, fp, None
    folder = reference_folder(src.get("fingerprint", ""), windows, protocol)
    if not Reference.exists(folder):
        from .models.loader import resolve

        try:
            now = resolve(src["spec"])
        except (LowbitError, KeyError):
            now = None
        if now is None or now.fingerprint != src.get("fingerprint"):
            return None, None, f"source model {src.get('spec')!r} is not available unchanged; reporting perplexity only"
        base, _, _ = load_model(src["spec"])
        reference_for(base, src["fingerprint"], windows, protocol, progress)
        del base
    ref = Reference(folder)
    return ref, EvalResult(**ref.meta["result"]), None


def measure_copy(model, config: QuantConfig, calib: torch.Tensor | None, windows: torch.Tensor, protocol: Protocol,
                 reference: Reference | None, progress: bool = True) -> dict:
    """Quantize a copy of ``model`` under ``config`` and measure it, leaving ``model`` as it
    is: a comparison row beside a main result (``lowbit quantize --compare rtn``)."""
    twin = copy.deepcopy(model)
    report = quantize(twin, config, calib, progress=progress)
    result = evaluate_model(twin, windows, protocol, reference, progress, desc=f"evaluate {config.method}")
    del twin
    return {"method": config.method, "describe": config.describe(), "config": report.config, "seconds": report.seconds,
            "storage": report.storage, "result": result.to_dict()}


def comparison_config(method: str, config: QuantConfig) -> QuantConfig:
    """``method`` on the same weight and activation formats, layers and seed as ``config``."""
    from .algorithms import method_config

    act = False if config.act is None else {k: v for k, v in dataclasses.asdict(config.act).items() if k != "outlier_threshold"}
    return method_config(
        method, None if config.weight is None else dataclasses.asdict(config.weight), act, weights=config.weight is not None,
        ignore=config.ignore, overrides=config.overrides, seed=config.seed, calib_precision=config.calib_precision,
    )


def float_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters as held now (tied weights once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def evaluate_model(model, windows: torch.Tensor, protocol: Protocol, reference: Reference | None = None, progress: bool = True, desc: str = "evaluate") -> EvalResult:
    return evaluate(model, windows, reference=reference, protocol=protocol.to_dict(), progress=progress_bar(desc, progress))


def save(model, tokenizer, out: str | Path, report: QuantReport, source: dict | None = None, results: dict | None = None, write_more=None) -> Path:
    """Save a quantized model as a lowbit checkpoint (see lowbit.export.checkpoint)."""
    config = getattr(model, "lowbit_config", None)
    if config is None:
        raise LowbitError("the model was not quantized by lowbit.quantize; nothing to save")
    extra = {"report": {"seconds": report.seconds, "storage": report.storage}}
    if results:
        extra["results"] = results
    return save_checkpoint(model, tokenizer, out, config, source=source, extra=extra, write_more=write_more)
