"""QLLM next to RTN, SmoothQuant and the Hadamard rotation on smollm2-135m, at W6A6, W4A8
and W4A4 (weights g64 asymmetric, activations dynamic per token asymmetric), same
calibration windows (32 x 512 from the end of the text), same evaluation protocol (first
20 windows x 512), each setting in its own process.

    .venv/bin/python benchmarks/qllm.py --threads 1 [--only qllm-w4a4 ...] --markdown

Every row is stored in benchmarks/results/qllm.json as soon as it is measured (rows of the
same name replaced), so settings can be run in several invocations; ``--markdown`` writes
the table of every stored row into BENCHMARKS.md between <!-- qllm:begin --> and
<!-- qllm:end --> and plots, for the first stored QLLM row, the channels disassembled and
the merge error per layer (docs/qllm-reassembly-smollm2.png). Times are the wall clock of
the quantization call alone.
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
# benchmarks/gguf.py must not shadow the gguf package: this folder leaves sys.path, and
# write_section comes from benchmarks/rtn.py by its path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]


def write_section(name: str, text: str) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("lowbit_bench_rtn", ROOT / "benchmarks" / "rtn.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write_section(name, text)


RESULTS = ROOT / "benchmarks" / "results" / "qllm.json"
PLOT = ROOT / "docs" / "qllm-reassembly-smollm2.png"

BITS = {"w6a6": (6, 6), "w4a8": (4, 8), "w4a4": (4, 4)}
# key -> (description, method, options)
METHODS = {
    "rtn": ("RTN", "rtn", {}),
    "smoothquant": ("SmoothQuant a=0.5", "smoothquant", {"alpha": 0.5}),
    "rotate": ("Hadamard rotation (QuaRot-style) + RTN", "rotate", {}),
    "qllm": ("QLLM (reassembly, no tuning)", "qllm", {}),
    "qllm-lr": ("QLLM + low-rank tuning (rank 8, 40 steps)", "qllm", {"lowrank_rank": 8, "lowrank_steps": 40}),
    "qllm-gptq": ("QLLM + GPTQ", "qllm", {"solver": "gptq"}),
}
SETTINGS = {f"{m}-{b}": (f"{desc}, {b.upper()}", meth, BITS[b], opts) for b in BITS for m, (desc, meth, opts) in METHODS.items()}
LAYER_KEYS = ("reassembly_disassembled", "reassembly_subchannels_added", "reassembly_merge_rel_error", "reassembly_act_absmax_before", "reassembly_act_absmax_after")


def run_one(name: str, windows: Path, threads: int) -> dict:
    import numpy as np
    import torch

    import lowbit
    from lowbit.config import ActSpec, QuantConfig, WeightSpec

    torch.set_num_threads(threads)
    desc, method, (wbits, abits), options = SETTINGS[name]
    protocol = lowbit.Protocol()
    model, tok, info = lowbit.load("smollm2-135m")
    evals = torch.from_numpy(np.load(windows / "eval.npy"))
    calib = torch.from_numpy(np.load(windows / "calib.npy"))
    ref, fp = lowbit.reference_for(model, info["source"]["fingerprint"], evals, protocol, progress=False)
    row = {"name": name, "setting": desc, "fp32_ppl": fp.ppl, "threads": torch.get_num_threads()}
    config = QuantConfig(method=method, weight=WeightSpec(bits=wbits, group_size=64, symmetric=False),
                         act=ActSpec(bits=abits, dynamic=True, granularity="token", symmetric=False), options=options)
    start = time.perf_counter()
    report = lowbit.quantize(model, config, calib, progress=False)
    row["quantize_s"] = time.perf_counter() - start
    row["config"] = report.config
    r = lowbit.evaluate_model(model, evals, protocol, ref, progress=False)
    row.update(ppl=r.ppl, kl=r.kl, top1=r.top1)
    layers = [{"layer": x["layer"], **{k: x[k] for k in LAYER_KEYS}} for x in report.layers if "reassembly_disassembled" in x]
    if layers:
        row["reassembly"] = layers
    for key in ("lowrank_block_rel_error_before", "lowrank_block_rel_error_after"):
        vals = [x[key] for x in report.layers if key in x]
        if vals:
            row[f"mean_{key}"] = sum(vals) / len(vals)
    return row


def markdown(rows: dict[str, dict], meta: dict) -> str:
    fp = next((r["fp32_ppl"] for r in rows.values() if "fp32_ppl" in r), None)
    lines = [
        f"smollm2-135m (fp32 perplexity {fp:.2f}); weights g64 asymmetric, activations dynamic per token asymmetric; "
        f"calibration 32 x 512 tokens from the end of the Wikipedia text, evaluation on its first 20 x 512 (README protocol). "
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}. Time: the quantization call alone. "
        "QLLM reassembles down_proj's inputs only and smooths the norm-fed inputs (alpha 0.5; see lowbit/algorithms/qllm.py); "
        "its threshold search (defaults) scores each threshold by the summed squared error of down_proj's quantized output on 1024 tokens of 8 calibration windows, "
        "with thresholds from the max |x| of all their tokens.",
        "",
        "| setting | perplexity | vs fp32 | KL | top-1 | quantize s | threads | measured (load avg) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    order = list(SETTINGS)
    for name in sorted(rows, key=lambda n: order.index(n) if n in order else len(order)):
        r = rows[name]
        d = f"{100 * (r['ppl'] / fp - 1):+.1f}%" if fp else "-"
        when = r.get("date", "-") + (f" ({r['load_avg']:.1f})" if "load_avg" in r else "")
        lines.append(f"| {r['setting']} | {r['ppl']:.2f} | {d} | {r['kl']:.3f} | {r['top1']:.3f} | {r['quantize_s']:.1f} | {r['threads']} | {when} |")
    verdicts = []
    for b in BITS:
        got = {m: rows[f"{m}-{b}"]["ppl"] for m in METHODS if f"{m}-{b}" in rows}
        if not got:
            continue
        best = min(got, key=got.get)
        line = f"{b.upper()}: lowest perplexity {METHODS[best][0]} ({got[best]:.2f})"
        if "smoothquant" in got:
            for key, what in (("qllm", "QLLM"), ("qllm-lr", "QLLM + low-rank tuning"), ("qllm-gptq", "QLLM + GPTQ")):
                if key in got:
                    verb = "beats" if got[key] < got["smoothquant"] else "does not beat"
                    line += f"; {what} {verb} SmoothQuant ({got[key]:.2f} vs {got['smoothquant']:.2f})"
        if "rotate" in got and "qllm" in got:
            line += f"; the rotation {'wins over' if got['rotate'] < got['qllm'] else 'loses to'} QLLM ({got['rotate']:.2f} vs {got['qllm']:.2f})"
        missing = [m for m in METHODS if m not in got]
        if missing:
            line += f" (not measured: {', '.join(missing)})"
        verdicts.append(line + ".")
    if verdicts:
        lines += ["", *[f"- {v}" for v in verdicts]]
    q = next((r for n, r in sorted(rows.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99) if r.get("reassembly")), None)
    if q:
        n = [x["reassembly_disassembled"] for x in q["reassembly"]]
        e = [x["reassembly_merge_rel_error"] for x in q["reassembly"]]
        lines += ["", f"Channel reassembly of down_proj's input ({q['setting']}): {sum(1 for k in n if k)} of {len(n)} layers reassembled, "
                  f"{sum(n)} channels disassembled in all (at most {max(n)} in a layer), merge error (relative, layer output on the "
                  f"calibration inputs) median {sorted(e)[len(e) // 2]:.2e}, max {max(e):.2e}; per layer in "
                  f"benchmarks/results/qllm.json and `{PLOT.relative_to(ROOT)}`."]
    return "\n".join(lines)


def plot(row: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = row["reassembly"]
    idx = list(range(len(layers)))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    a1.bar(idx, [x["reassembly_disassembled"] for x in layers], label="channels disassembled")
    a1.bar(idx, [x["reassembly_subchannels_added"] for x in layers], alpha=0.4, label="sub-channels added (= channels merged)")
    a1.set_ylabel("channels")
    a1.legend(fontsize=8)
    a2.semilogy(idx, [max(x["reassembly_merge_rel_error"], 1e-9) for x in layers], "o-")
    a2.set_ylabel("merge error (relative)")
    a2.set_xlabel("block (down_proj input)")
    fig.suptitle(f"QLLM channel reassembly on smollm2-135m ({row['setting']})", fontsize=10)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    tmp = PLOT.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, PLOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", help="settings: " + ", ".join(SETTINGS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    ap.add_argument("--markdown", action="store_true", help="update BENCHMARKS.md and the plot from every stored row")
    args = ap.parse_args()
    if args.one:
        name, windows, threads = args.one
        print(json.dumps(run_one(name, Path(windows), int(threads))))
        return

    import numpy as np

    import lowbit

    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}
    names = args.only if args.only is not None else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        sys.exit(f"unknown settings: {', '.join(unknown)}")
    if names:
        _, tok, _ = lowbit.load("smollm2-135m")
        evals, calib = lowbit.prepare_windows(tok)
        work = Path(tempfile.mkdtemp(prefix="lowbit-qllm-bench-"))
        np.save(work / "eval.npy", evals.numpy())
        np.save(work / "calib.npy", calib.numpy())
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for name in names:
        load_avg = os.getloadavg()[0]
        res = subprocess.run([sys.executable, __file__, "--one", name, str(work), str(args.threads)], capture_output=True, text=True, cwd=ROOT, env=env)
        if res.returncode:
            print(f"{name} failed:\n{res.stderr[-2000:]}", flush=True)
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["date"] = time.strftime("%Y-%m-%d %H:%M")
        row["load_avg"] = max(load_avg, os.getloadavg()[0])
        stored["rows"][name] = row
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = RESULTS.with_suffix(".tmp")
        tmp.write_text(json.dumps(stored, indent=1))
        os.replace(tmp, RESULTS)
        print(f"{name}: ppl {row['ppl']:.2f}, kl {row['kl']:.3f}, quantize {row['quantize_s']:.1f}s", flush=True)
    if args.markdown:
        meta = {"command": "benchmarks/qllm.py --threads N [--only ...] --markdown",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
        write_section("qllm", markdown(stored["rows"], meta))
        q = next((stored["rows"][n] for n in SETTINGS if stored["rows"].get(n, {}).get("reassembly")), None)
        if q:
            plot(q)


if __name__ == "__main__":
    main()
