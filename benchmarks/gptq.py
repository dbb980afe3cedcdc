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

# name -> (bits, group size, symmetric, scale observer, compare with llm-compressor).
# "minmax" is both tools' default; "mse" is the optional per-group clipping search.
# DEAD_INPUT settings run on the model with a dead input channel in every block (see run_lowbit).
SETTINGS = {
    "w4g64-asym": (4, 64, False, "minmax", True),
    "w4g64-sym": (4, 64, True, "minmax", True),
    "w4g64-asym-mse": (4, 64, False, "mse", False),
    "w3g64-asym": (3, 64, False, "minmax", False),
    "w3g64-asym-mse": (3, 64, False, "mse", False),
    "w2g64-asym": (2, 64, False, "minmax", False),
    "w2g64-asym-mse": (2, 64, False, "mse", False),
    "w4g64-asym-dead-input": (4, 64, False, "minmax", False),
}
DEAD_INPUT = {"w4g64-asym-dead-input"}
# lowbit's GPTQ as benchmarked: its defaults (act-order, groups along the solve order) and
# bf16-input calibration matmuls; llm-compressor with its default actorder ("static").
LOWBIT_OPTIONS: dict = {}
PEER_ACTORDER = "static"
CALIB_PRECISION = "bf16"


DEAD_CHANNEL = 7  # the dead-input check zeroes this channel of every block's input norm


def run_lowbit(method: str, bits: int, group: int, sym: bool, observer: str, windows: Path, dead: bool = False) -> dict:
    """Quantize in this process (called as a subprocess of main) and evaluate. dead=True
    first zeroes one channel of every block's input RMSNorm weight, so q/k/v never see that
    input and their Hessian has a zero row and column (not positive definite)."""
    import torch

    import lowbit
    from lowbit.config import QuantConfig, WeightSpec

    protocol = lowbit.Protocol()
    model, tok, info = lowbit.load("smollm2-135m")
    if dead:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[DEAD_CHANNEL] = 0.0
    evals = torch.from_numpy(__import__("numpy").load(windows / "eval.npy"))
    calib = torch.from_numpy(__import__("numpy").load(windows / "calib.npy"))
    ref, fp = lowbit.reference_for(model, info["source"]["fingerprint"], evals, protocol, progress=False)
    config = QuantConfig(
        method=method,
        weight=WeightSpec(bits=bits, group_size=group, symmetric=sym, observer=observer),
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
        "layers_with_dead_inputs": sum(1 for x in report.layers if x.get("dead_inputs")),
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


def lowbit_subprocess(method: str, bits: int, group: int, sym: bool, observer: str, windows: Path, dead: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--one", method, str(bits), str(group), str(int(sym)), observer, str(windows), str(int(dead))]
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
        "| setting | RTN ppl | lowbit GPTQ ppl (KL) | llm-compressor GPTQ ppl | lowbit s | llm-compressor s | time ratio | RTN gap closed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines_after = [
        "",
        "Settings ending in `-mse` use `--observer mse` (the per-group clipping search) for RTN and GPTQ alike; "
        "the others min-max, llm-compressor's default. KL: mean KL divergence from the fp32 model, nats.",
    ]
    dead_rows = [r for r in rows if r["setting"] in DEAD_INPUT]
    rows = [r for r in rows if r["setting"] not in DEAD_INPUT]
    for r in rows:
        fp = r["lowbit"]["fp32_ppl"]
        gap = (r["rtn"]["ppl"] - r["lowbit"]["ppl"]) / (r["rtn"]["ppl"] - fp) if r["rtn"]["ppl"] > fp else float("nan")
        peer = r.get("peer")
        lines.append(
            f"| {r['setting']} | {r['rtn']['ppl']:.2f} | {r['lowbit']['ppl']:.2f} ({r['lowbit']['kl']:.3f}) | "
            f"{peer['ppl']:.2f} | {r['lowbit']['quantize_seconds']:.1f} | {peer['quantize_seconds']:.1f} | "
            f"{r['lowbit']['quantize_seconds'] / peer['quantize_seconds']:.2f} | {100 * gap:.0f}% |"
            if peer
            else f"| {r['setting']} | {r['rtn']['ppl']:.2f} | {r['lowbit']['ppl']:.2f} ({r['lowbit']['kl']:.3f}) | - | "
            f"{r['lowbit']['quantize_seconds']:.1f} | - | - | {100 * gap:.0f}% |"
        )
    lines += lines_after
    for r in dead_rows:
        lines += [
            "",
            f"Dead input channel ({r['setting']}): channel {DEAD_CHANNEL} of every block's input RMSNorm weight set to 0, "
            f"so q/k/v never see that input and their Hessian is singular (a zero row and column). "
            f"GPTQ finished with {r['lowbit']['layers_with_dead_inputs']} layers reporting a dead input: "
            f"perplexity {r['lowbit']['ppl']:.2f} (KL {r['lowbit']['kl']:.3f}) against RTN's {r['rtn']['ppl']:.2f} on the same modified model.",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=7, help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", help="settings: " + ", ".join(SETTINGS))
    ap.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    ap.add_argument("--markdown", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    if args.one:
        method, bits, group, sym, observer, windows, dead = args.one
        print(json.dumps(run_lowbit(method, int(bits), int(group), bool(int(sym)), observer, Path(windows), bool(int(dead)))))
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
        bits, group, sym, observer, with_peer = SETTINGS[name]
        row = {"setting": name}
        dead = name in DEAD_INPUT
        row["rtn"] = lowbit_subprocess("rtn", bits, group, sym, observer, work, dead)
        row["lowbit"] = lowbit_subprocess("gptq", bits, group, sym, observer, work, dead)
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
    if args.only and RESULTS.exists():  # a partial rerun keeps the other settings' last rows
        fresh = {r["setting"] for r in rows}
        old = [r for r in json.loads(RESULTS.read_text())["rows"] if r["setting"] not in fresh]
        rows = sorted(old + rows, key=lambda r: list(SETTINGS).index(r["setting"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.markdown:
        write_section("gptq", markdown(rows, meta))


if __name__ == "__main__":
    main()
