"""llama.cpp file types as lowbit formats, measured in-process on smollm2-135m.

For Q4_K_M and Q3_K_M (per-layer GGML types by llama.cpp's rules, lowbit.export.gguf_plan),
the decoder Linears quantized four ways, each measured under the protocol (perplexity, KL
to float32) with the exact bits per weight of the GGML bytes:

- RTN: the codec's search with a uniform importance (``search="weighted"``);
- RTN + imatrix as llama.cpp computes it: mean x^2 per column on the *float* model
  (calibration.imatrix.collect_imatrix), each layer quantized with it;
- RTN + imatrix in the runner (``--option imatrix=true``, what ``export gguf --imatrix``
  now does): mean x^2 of the inputs each layer sees, upstream blocks already quantized;
- GPTQ on the same grids (``export gguf --gptq``).

Embeddings and the LM head stay float32 here (the GGUF file quantizes them too). Results go
to benchmarks/results/gguf_formats.json and, with --markdown, into BENCHMARKS.md between the
<!-- gguf-formats:begin --> / <!-- gguf-formats:end --> markers.

    .venv/bin/python benchmarks/gguf_formats.py --markdown [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "gguf_formats.json"
FILE_TYPES = ("Q4_K_M", "Q3_K_M")


def float_imatrix_rtn(model, windows, file_type: str) -> None:
    """llama.cpp's way: the imatrix of the float model, then every layer on its own."""
    from lowbit.algorithms.base import method_config
    from lowbit.calibration.imatrix import collect_imatrix
    from lowbit.export.gguf_plan import plan_config
    from lowbit.formats.base import quantize_matrix
    from lowbit.formats.names import format_of

    imat = collect_imatrix(model, windows)
    cfg = plan_config(model, method_config("rtn", weight={"format": file_type}), True)
    with torch.no_grad():
        for name, mod in model.named_modules():
            spec = cfg.weight_spec_for(name) if name in imat and isinstance(mod, torch.nn.Linear) else None
            if spec is not None:
                mod.weight.copy_(quantize_matrix(format_of(spec), mod.weight, name, importance=imat[name]).dequantize())


def bits_per_weight(model) -> float:
    from lowbit.api import storage_summary

    return storage_summary(model)["bits_per_weight"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import lowbit
    from lowbit import api
    from lowbit.algorithms.base import method_config
    from lowbit.calibration.data import Protocol

    model, tok, info = lowbit.load("smollm2-135m")
    evals, calib = lowbit.prepare_windows(tok)
    ref, base = lowbit.reference_for(model, info["source"]["fingerprint"], evals, Protocol(), progress=False)
    rows = []
    for ft in FILE_TYPES:
        settings = {
            "RTN": dict(config=method_config("rtn", weight={"format": ft})),
            "RTN + imatrix (float model, llama.cpp's way)": dict(fn=float_imatrix_rtn),
            "RTN + imatrix (runner)": dict(config=method_config("rtn", weight={"format": ft}, options={"imatrix": True}, calib_precision="fp32")),
            "GPTQ": dict(config=method_config("gptq", weight={"format": ft}, calib_precision="fp32")),
        }
        for name, how in settings.items():
            q = copy.deepcopy(model)
            start = time.perf_counter()
            if "fn" in how:
                how["fn"](q, calib, ft)
                ref_model = copy.deepcopy(model)
                lowbit.quantize(ref_model, method_config("rtn", weight={"format": ft}), progress=False)
                bpw = bits_per_weight(ref_model)  # the same types and bytes as RTN's
                del ref_model
            else:
                lowbit.quantize(q, how["config"], calib, progress=False)
                bpw = bits_per_weight(q)
            seconds = time.perf_counter() - start
            r = api.evaluate_model(q, evals, Protocol(), reference=ref, progress=False)
            rows.append({"file_type": ft, "setting": name, "ppl": r.ppl, "kl": r.kl, "bits_per_weight": bpw, "quantize_s": seconds})
            print(json.dumps(rows[-1]), flush=True)
            del q
    result = {
        "model": "smollm2-135m", "fp32_ppl": base.ppl, "threads": args.threads, "loadavg_1m": os.getloadavg()[0],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/gguf_formats.py --markdown", "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    if args.markdown:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from rtn import write_section

        lines = [
            f"llama.cpp file types as lowbit formats, in-process on smollm2-135m (`python benchmarks/gguf_formats.py "
            f"--markdown`, {result['date']}, {args.threads} threads): decoder Linears only (embeddings and LM head "
            f"float32), float32 perplexity {base.ppl:.2f}; bits per weight are the GGML bytes of those Linears.",
            "",
            "| file type | decoder Linears | perplexity | KL (nats) | bits/weight | seconds |",
            "|---|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['file_type']} | {r['setting']} | {r['ppl']:.2f} | {r['kl']:.4f} | {r['bits_per_weight']:.3f} | {r['quantize_s']:.0f} |"
            for r in rows
        ]
        write_section("gguf-formats", "\n".join(lines))


if __name__ == "__main__":
    main()
