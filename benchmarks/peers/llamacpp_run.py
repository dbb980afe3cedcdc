"""Peer: llama.cpp itself (through llama-cpp-python), for GGUF files.

Runs inside the llama.cpp venv (see setup_llamacpp.sh), never lowbit's; it imports
nothing from lowbit and prints one JSON object on stdout.

    ~/.cache/lowbit-peers/llamacpp/bin/python benchmarks/peers/llamacpp_run.py \\
        ppl MODEL.gguf --windows /tmp/eval_windows.npy
    ~/.cache/lowbit-peers/llamacpp/bin/python benchmarks/peers/llamacpp_run.py \\
        quantize F16.gguf OUT.gguf --type Q4_K_M

ppl: lowbit's protocol with llama.cpp's own forward pass. The windows (int token ids,
[n_windows, seq_len], written by lowbit) are evaluated one at a time from an empty KV
cache; the NLL of tokens 1..seq_len-1 given the tokens before them is taken from the
log-softmax (float64) of llama.cpp's logits; ppl = exp(mean NLL).

quantize: ``llama_model_quantize`` (what the llama-quantize tool calls) from a F16/F32
GGUF to a llama.cpp file type, timed (wall seconds, including reading and writing).
``--imatrix FILE.npz`` hands llama.cpp an importance matrix ({GGUF weight name: mean of
x^2 per input column}, the values llama-quantize derives from an imatrix file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np


def _quiet_log():
    import llama_cpp

    # llama.cpp logs every tensor while loading; keep stderr readable.
    @llama_cpp.llama_log_callback
    def _silent(level, text, user_data):
        pass

    llama_cpp.llama_log_set(_silent, None)
    return _silent  # keep a reference: ctypes callbacks must outlive their use


def perplexity(model_path: str, windows: np.ndarray, threads: int) -> dict:
    from llama_cpp import Llama

    n_windows, seq_len = windows.shape
    llm = Llama(
        model_path=model_path,
        n_ctx=seq_len,
        n_batch=seq_len,
        logits_all=True,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    total, count = 0.0, 0
    start = time.perf_counter()
    for row in windows:
        ids = [int(t) for t in row]
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: seq_len - 1], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        logz = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
        targets = np.asarray(ids[1:])
        nll = logz - logits[np.arange(seq_len - 1), targets]
        total += float(nll.sum())
        count += seq_len - 1
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "seconds": time.perf_counter() - start}


def _imatrix_array(path: str):
    """A NULL-terminated llama_model_imatrix_data[] over the arrays of an .npz file (the
    arrays are returned too: ctypes only points at them)."""
    import ctypes

    import llama_cpp

    data = np.load(path)
    arrays = {k: np.ascontiguousarray(data[k], dtype=np.float32) for k in sorted(data.files)}
    entries = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
    for i, (name, a) in enumerate(arrays.items()):
        entries[i].name = name.encode()
        entries[i].data = a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = a.size
    entries[len(arrays)].name = None
    return entries, arrays


def quantize(src: str, dst: str, ftype_name: str, threads: int, imatrix: str | None = None) -> dict:
    import ctypes

    import llama_cpp

    key = f"LLAMA_FTYPE_MOSTLY_{ftype_name.upper()}"
    if not hasattr(llama_cpp, key):
        raise SystemExit(f"error: llama.cpp has no file type {ftype_name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, key)
    params.nthread = threads
    if imatrix:
        entries, _keep = _imatrix_array(imatrix)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    seconds = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"error: llama_model_quantize returned {rc}")
    return {"seconds": seconds, "bytes": os.path.getsize(dst), "type": ftype_name.upper()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ppl", help="perplexity of a GGUF on token windows (.npy)")
    p.add_argument("model")
    p.add_argument("--windows", required=True)
    q = sub.add_parser("quantize", help="llama_model_quantize a F16/F32 GGUF")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--type", required=True, help="llama.cpp file type: Q4_K_M, Q8_0, Q6_K, ...")
    q.add_argument("--imatrix", help=".npz of {GGUF weight name: mean x^2 per column}")
    for s in (p, q):
        s.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    import llama_cpp

    _keep = _quiet_log()  # noqa: F841
    if args.cmd == "ppl":
        result = perplexity(args.model, np.load(args.windows), args.threads)
    else:
        result = quantize(args.src, args.dst, args.type, args.threads, args.imatrix)
    result["llama_cpp_python"] = llama_cpp.__version__
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
