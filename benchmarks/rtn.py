"""Foundation figures: RTN and W8A8 on smollm2-135m under the protocol.

Each setting runs in a fresh subprocess (so its peak memory is its own): load the model,
quantize, evaluate against the cached float32 reference. Results go to
benchmarks/results/rtn.json and, with --markdown, into BENCHMARKS.md between the
<!-- rtn:begin --> / <!-- rtn:end --> markers.

    .venv/bin/python benchmarks/rtn.py --markdown
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "rtn.json"

# name -> (description, QuantConfig kwargs)
SETTINGS = {
    "fp32": ("float32 (the original)", None),
    "w4g64-sym": ("RTN W4 g64 sym", dict(weight=dict(bits=4, group_size=64))),
    "w4g64-asym": ("RTN W4 g64 asym", dict(weight=dict(bits=4, group_size=64, symmetric=False))),
    "w3g64-sym": ("RTN W3 g64 sym", dict(weight=dict(bits=3, group_size=64))),
    "w3g64-asym": ("RTN W3 g64 asym", dict(weight=dict(bits=3, group_size=64, symmetric=False))),
    "w2g64-asym": ("RTN W2 g64 asym", dict(weight=dict(bits=2, group_size=64, symmetric=False))),
    "w8-channel-sym": ("RTN W8 per-channel sym", dict(weight=dict(bits=8, group_size=None))),
    "w8-channel-asym": ("RTN W8 per-channel asym", dict(weight=dict(bits=8, group_size=None, symmetric=False))),
    "w8a8-token-asym": (
        "W8A8 dynamic per-token (W8 per-channel asym, A8 per-token asym)",
        dict(weight=dict(bits=8, group_size=None, symmetric=False), act=dict(bits=8)),
    ),
    "w8a8-token-sym": (
        "W8A8 dynamic per-token, all symmetric",
        dict(weight=dict(bits=8, group_size=None), act=dict(bits=8, symmetric=True)),
    ),
    "w8a8-token-g64": (
        "W8A8 dynamic per-token groups of 64 (W8 per-channel asym)",
        dict(weight=dict(bits=8, group_size=None, symmetric=False), act=dict(bits=8, group_size=64)),
    ),
    "w8a8-static-minmax": (
        "W8A8 static per-tensor, min-max",
        dict(weight=dict(bits=8, group_size=None, symmetric=False), act=dict(bits=8, dynamic=False, granularity="tensor")),
    ),
    "w8a8-static-mse": (
        "W8A8 static per-tensor, MSE",
        dict(weight=dict(bits=8, group_size=None, symmetric=False), act=dict(bits=8, dynamic=False, granularity="tensor", observer="mse")),
    ),
}


def run_one(name: str) -> dict:
    import torch

    import lowbit
    from lowbit.config import ActSpec, QuantConfig, WeightSpec

    torch.manual_seed(0)
    protocol = lowbit.Protocol()
    model, tok, info = lowbit.load("smollm2-135m")
    evals, calib = lowbit.prepare_windows(tok, protocol)
    ref, fp = lowbit.reference_for(model, info["source"]["fingerprint"], evals, protocol, progress=False)
    desc, kw = SETTINGS[name]
    row = {"name": name, "setting": desc}
    if kw is None:
        row.update(ppl=fp.ppl, kl=0.0, top1=1.0, quantize_s=0.0, bits_per_weight=32.0)
        row["quantize_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    else:
        config = QuantConfig(
            weight=WeightSpec(**kw["weight"]) if kw.get("weight") else None,
            act=ActSpec(**kw["act"]) if kw.get("act") else None,
        )
        t = time.perf_counter()
        report = lowbit.quantize(model, config, calib, progress=False)
        row["quantize_s"] = time.perf_counter() - t
        row["quantize_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        r = lowbit.evaluate_model(model, evals, protocol, ref, progress=False)
        row.update(ppl=r.ppl, kl=r.kl, top1=r.top1, bits_per_weight=report.storage["bits_per_weight"] or 32.0)
        row["calibrated"] = lowbit.make_algorithm(config).uses_calibration()
    row["fp32_ppl"] = fp.ppl
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Model smollm2-135m, protocol: {meta['protocol']}. Run with `{meta['command']}` on {meta['machine']}; "
        f"{meta['date']}. Each setting runs in its own process; 'peak RSS' is that process's maximum "
        "through loading and quantization (before evaluation), the float32 model (0.54 GB of parameters) included.",
        "",
        "| setting | perplexity | vs fp32 | KL (nats) | top-1 | bits/weight (quantized layers) | quantize s | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d = 100 * (r["ppl"] / r["fp32_ppl"] - 1)
        lines.append(
            f"| {r['setting']} | {r['ppl']:.2f} | {d:+.2f}% | {r['kl']:.4f} | {100 * r['top1']:.1f}% | "
            f"{r['bits_per_weight']:.3f} | {r['quantize_s']:.1f} | {r['quantize_peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def write_section(name: str, text: str) -> None:
    """Replace the <!-- name:begin --> ... <!-- name:end --> block of BENCHMARKS.md."""
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text}\n{end}"
    if begin in doc:
        doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
    else:
        doc += "\n" + block + "\n"
    path.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", help="run only these settings: " + ", ".join(SETTINGS))
    ap.add_argument("--markdown", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    rows = []
    for name in args.only or SETTINGS:
        res = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            sys.exit(f"{name} failed:\n{res.stderr[-3000:]}")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['setting']:<70} ppl {row['ppl']:8.3f}  KL {row['kl']:.4f}  {row['quantize_s']:.1f}s  {row['quantize_peak_rss_mb']:.0f} MB", flush=True)
    import lowbit

    meta = {
        "protocol": "first 20 windows x 512 tokens of the embedded Wikipedia text, no BOS; calibration 32 x 512 tokens from its end",
        "command": ".venv/bin/python benchmarks/rtn.py --markdown",
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, torch threads as default",
        "date": time.strftime("%Y-%m-%d"),
        "lowbit": lowbit.__version__,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.markdown:
        write_section("rtn", markdown(rows, meta))


if __name__ == "__main__":
    main()
