"""GPTQ side by side: lowbit vs llm-compressor on smollm2-135m, same calibration windows,
same evaluation protocol, in one run, each quantization in its own process.

    bash benchmarks/peers/setup_llmcompressor.sh          # once: the peer's own venv
    .venv/bin/python benchmarks/gptq.py --markdown         # ~15 min on 2 cores

For every setting it prints both perplexities, both quantization times (wall clock of the
quantization call alone, model loading and evaluation excluded) and their ratio; lowbit RTN
of the same format is measured too, for the "gap closed" figures. Results:
benchmarks/results/gptq.json and, with --markdown, BENCHMARKS.md between <!-- gptq:begin -->
and <!-- gptq:end -->.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from rtn import write_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gptq.json"
PEER_VENV = Path(os.environ.get("PEER_VENV", Path.home() / ".cache" / "lowbit-peers" / "llmcompressor"))

# name -> (bits, group size, symmetric, lowbit GPTQ options, compare with llm-compressor)
SETTINGS = {
    "w4g64-asym": (4, 64, False, True),
    "w4g64-sym": (4, 64, True, True),
    "w3g64-asym": (3, 64, False, False),
    "w2g64-asym": (2, 64, False, False),
}
# lowbit's GPTQ as benchmarked: its defaults (act-order, groups along the solve order) and
# bf16-input calibration matmuls; llm-compressor with its default actorder ("static").
LOWBIT_OPTIONS: dict = {}
PEER_ACTORDER = "static"
CALIB_PRECISION = "bf16"


def run_lowbit(method: str, bits: int, group: int, sym: bool, windows: Path) -> dict:
    """Quantize in this process (called as a subprocess of main) and evaluate."""
    import torch

    import lowbit
    from lowbit.config import QuantConfig, WeightSpec

    protocol = lowbit.Protocol()
    model, tok, info = lowbit.load("smollm2-135m")
    evals = torch.from_numpy(__import__("numpy").load(windows / "eval.npy"))
    calib = torch.from_numpy(__import__("numpy").load(windows / "calib.npy"))
    ref, fp = lowbit.reference_for(model, info["source"]["fingerprint"], evals, protocol, progress=False)
    config = QuantConfig(
        method=method,
        weight=WeightSpec(bits=bits, group_size=group, symmetric=sym),
        options=LOWBIT_OPTIONS if method == "gptq" else {},
        calib_precision=CALIB_PRECISION,
    )
    start = time.perf_counter()
    report = lowbit.quantize(model, config, calib, progress=False)
    seconds = time.perf_counter() - start
    r = lowbit.evaluate_model(model, evals, protocol, ref, progress=False)
    out_err = [x["output_rel_error"] for x in report.layers if "output_rel_error" in x]
    rtn_err = [x["rtn_output_rel_error"] for x in report.layers if "rtn_output_rel_error" in x]
    return {
        "tool": f"lowbit {method}",
        "quantize_seconds": seconds,
        "ppl": r.ppl,
        "kl": r.kl,
        "top1": r.top1,
        "fp32_ppl": fp.ppl,
        "mean_output_rel_error": sum(out_err) / len(out_err) if out_err else None,
        "mean_rtn_output_rel_error": sum(rtn_err) / len(rtn_err) if rtn_err else None,
        "config": config.to_dict(),
    }


def run_peer(bits: int, group: int, sym: bool, windows: Path, model_dir: Path, out: Path) -> dict:
    py = PEER_VENV / "bin" / "python"
    if not py.exists():
        sys.exit(f"no llm-compressor venv at {PEER_VENV}: run bash benchmarks/peers/setup_llmcompressor.sh")
    cmd = [str(py), str(ROOT / "benchmarks/peers/llmcompressor_run.py"), "--model", str(model_dir),
           "--calib", str(windows / "calib.npy"), "--eval", str(windows / "eval.npy"), "--scheme", "gptq",
           "--bits", str(bits), "--group-size", str(group), "--sym" if sym else "--asym",
           "--actorder", PEER_ACTORDER, "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    res = json.loads(out.read_text())
    return {"tool": "llm-compressor gptq", **res}


def lowbit_subprocess(method: str, bits: int, group: int, sym: bool, windows: Path) -> dict:
    cmd = [sys.executable, __file__, "--one", method, str(bits), str(group), str(int(sym)), str(windows)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        sys.exit(f"lowbit {method} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"smollm2-135m, calibration 32 x 512 tokens from the end of the Wikipedia text, protocol as in the README. "
        f"`{meta['command']}`, {meta['machine']}, {meta['date']}. lowbit GPTQ options: {meta['lowbit_options']}, "
        f"calibration matmuls {meta['calib_precision']}; llm-compressor {meta['peer_version']} with actorder={meta['peer_actorder']}, "
        "block 128, damping 0.01, in its own venv. Time: the quantization call alone.",
        "",
        "| setting | RTN ppl | lowbit GPTQ ppl | llm-compressor GPTQ ppl | lowbit s | llm-compressor s | time ratio | RTN gap closed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fp = r["lowbit"]["fp32_ppl"]
        gap = (r["rtn"]["ppl"] - r["lowbit"]["ppl"]) / (r["rtn"]["ppl"] - fp) if r["rtn"]["ppl"] > fp else float("nan")
        peer = r.get("peer")
        lines.append(
            f"| {r['setting']} | {r['rtn']['ppl']:.2f} | {r['lowbit']['ppl']:.2f} | "
            f"{peer['ppl']:.2f} | {r['lowbit']['quantize_seconds']:.1f} | {peer['quantize_seconds']:.1f} | "
            f"{r['lowbit']['quantize_seconds'] / peer['quantize_seconds']:.2f} | {100 * gap:.0f}% |"
            if peer
            else f"| {r['setting']} | {r['rtn']['ppl']:.2f} | {r['lowbit']['ppl']:.2f} | - | "
            f"{r['lowbit']['quantize_seconds']:.1f} | - | - | {100 * gap:.0f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", help="settings: " + ", ".join(SETTINGS))
    ap.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    ap.add_argument("--markdown", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    if args.one:
        method, bits, group, sym, windows = args.one
        print(json.dumps(run_lowbit(method, int(bits), int(group), bool(int(sym)), Path(windows))))
        return

    import numpy as np

    import lowbit
    from lowbit.models.loader import float32_folder

    _, tok, _ = lowbit.load("smollm2-135m")
    evals, calib = lowbit.prepare_windows(tok)
    work = Path(tempfile.mkdtemp(prefix="lowbit-gptq-bench-"))
    np.save(work / "eval.npy", evals.numpy())
    np.save(work / "calib.npy", calib.numpy())
    model_dir = float32_folder("smollm2-135m")
    rows = []
    for name in args.only or SETTINGS:
        bits, group, sym, with_peer = SETTINGS[name]
        row = {"setting": name}
        row["rtn"] = lowbit_subprocess("rtn", bits, group, sym, work)
        row["lowbit"] = lowbit_subprocess("gptq", bits, group, sym, work)
        if with_peer and not args.no_peer:
            row["peer"] = run_peer(bits, group, sym, work, model_dir, work / f"peer-{name}.json")
        rows.append(row)
        msg = f"{name}: RTN {row['rtn']['ppl']:.2f}  lowbit GPTQ {row['lowbit']['ppl']:.2f} in {row['lowbit']['quantize_seconds']:.1f}s"
        if "peer" in row:
            msg += f"  llm-compressor {row['peer']['ppl']:.2f} in {row['peer']['quantize_seconds']:.1f}s"
        print(msg, flush=True)
    meta = {
        "command": ".venv/bin/python benchmarks/gptq.py --markdown",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "lowbit_options": LOWBIT_OPTIONS,
        "calib_precision": CALIB_PRECISION,
        "peer_actorder": PEER_ACTORDER,
        "peer_version": next((r["peer"]["versions"]["llmcompressor"] for r in rows if "peer" in r), "-"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.markdown:
        write_section("gptq", markdown(rows, meta))


if __name__ == "__main__":
    main()
