"""Activation-aware methods side by side on smollm2-135m: lowbit's AWQ, SmoothQuant,
LLM.int8() and ZeroQuant next to llm-compressor's AWQ and SmoothQuant and bitsandbytes'
LLM.int8(), same model, same calibration windows (32 x 512 from the end of the text),
same evaluation protocol (first 20 windows x 512), each setting in its own process.

    bash benchmarks/peers/setup_llmcompressor.sh && bash benchmarks/peers/setup_bnb.sh   # once
    .venv/bin/python benchmarks/activations.py --threads 1 --markdown

Every row is stored in benchmarks/results/activations.json as soon as it is measured
(rows of the same name are replaced), so settings can be run in several invocations
(``--only``); ``--markdown`` writes the table of every stored row into BENCHMARKS.md
between <!-- activations:begin --> and <!-- activations:end -->. Times are wall clock of the
quantization call alone (model loading and evaluation excluded), every process (lowbit's and the
peers') limited to ``--threads`` threads (OMP_NUM_THREADS; recorded in each row). llm-compressor's AWQ takes ~8 minutes: it runs only when named
with ``--only peer-lc-awq``.

The int8 rows also time the real int8 path: one forward of the whole model on an
evaluation window [1, 512] (median of 3 after a warm-up) in float32, on lowbit's reference
path (dequantize, float matmul) and on the int8 path (int8 x int8 -> int32 products), and
the same for one Linear of each of SmolLM2's shapes on 512 tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from rtn import write_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "activations.json"
PEERS = Path(os.environ.get("PEER_ROOT", Path.home() / ".cache" / "lowbit-peers"))

W4G64A = dict(bits=4, group_size=64, symmetric=False)
W8CH_ASYM = dict(bits=8, group_size=None, symmetric=False)
STATIC_T = dict(bits=8, dynamic=False, granularity="tensor")
TOKEN = dict(bits=8)  # dynamic per-token asymmetric (lowbit's default activation format)

# name -> (description, method, weight, act, options, time the int8 path)
SETTINGS = {
    "fp32": ("float32 (the original)", None, None, None, {}, False),
    "rtn-w4g64-asym": ("RTN W4 g64 asym", "rtn", W4G64A, None, {}, False),
    "awq-w4g64-asym": ("AWQ W4 g64 asym", "awq", W4G64A, None, {}, False),
    "awq-w3g64-asym": ("AWQ W3 g64 asym", "awq", dict(W4G64A, bits=3), None, {}, False),
    "w8a8-static-minmax": ("W8A8 static per-tensor, min-max (no smoothing)", "rtn", W8CH_ASYM, STATIC_T, {}, False),
    "w8a8-static-mse": ("W8A8 static per-tensor, MSE (no smoothing)", "rtn", W8CH_ASYM, dict(STATIC_T, observer="mse"), {}, False),
    "sq-w8a8-static-minmax": ("SmoothQuant a=0.5, W8A8 static per-tensor, min-max", "smoothquant", W8CH_ASYM, STATIC_T, {"alpha": 0.5, "stat_windows": 0}, True),
    "sq-fold-w8a8-static-minmax": ("SmoothQuant a=0.5 + o/down inputs, W8A8 static per-tensor, min-max", "smoothquant", W8CH_ASYM, STATIC_T, {"alpha": 0.5, "fold_linear": True}, False),
    "sq08-fold-w8a8-static-minmax": ("SmoothQuant a=0.8 + o/down inputs, W8A8 static per-tensor, min-max", "smoothquant", W8CH_ASYM, STATIC_T, {"alpha": 0.8, "fold_linear": True}, False),
    "sq-w8a8-static-mse": ("SmoothQuant a=0.5, W8A8 static per-tensor, MSE", "smoothquant", W8CH_ASYM, dict(STATIC_T, observer="mse"), {"alpha": 0.5}, False),
    "sq-w8a8-token": ("SmoothQuant a=0.5, W8A8 dynamic per-token", "smoothquant", W8CH_ASYM, TOKEN, {"alpha": 0.5}, True),
    "llm-int8": ("LLM.int8() (W8 per-row, A8 per-token, columns with an abs value > 6 in float)", "llm-int8", dict(bits=8, group_size=None, restricted=True), None, {}, True),
    "llm-int8-t2": ("LLM.int8() with threshold 2", "llm-int8", dict(bits=8, group_size=None, restricted=True), None, {"threshold": 2.0}, False),
    "llm-int8-t1": ("LLM.int8() with threshold 1", "llm-int8", dict(bits=8, group_size=None, restricted=True), None, {"threshold": 1.0}, False),
    "llm-int8-asym-act": ("LLM.int8() with asymmetric per-token activations", "llm-int8", dict(bits=8, group_size=None, restricted=True), TOKEN, {}, False),
    "zq-w4a8-nolkd": ("ZeroQuant W4 g64 asym + A8 per-token, no LKD", "zeroquant", W4G64A, TOKEN, {"lkd_steps": 0}, False),
    "zq-w4a8-lkd": ("ZeroQuant W4 g64 asym + A8 per-token, LKD", "zeroquant", W4G64A, TOKEN, {}, False),
}
# name -> (description, peer venv, script, scheme arguments)
PEER_SETTINGS = {
    "peer-lc-awq": ("llm-compressor AWQ W4 g64 asym", "llmcompressor", "llmcompressor_run.py", ["--scheme", "awq", "--bits", "4", "--group-size", "64", "--asym"]),
    "peer-lc-smoothquant": ("llm-compressor SmoothQuant 0.8 + GPTQ W8A8 (per-token dynamic)", "llmcompressor", "llmcompressor_run.py", ["--scheme", "smoothquant-gptq-w8a8"]),
    "peer-bnb-int8": ("bitsandbytes LLM.int8() (threshold 6.0)", "bnb", "bnb_run.py", ["--scheme", "int8"]),
}
DEFAULT_SKIP = {"peer-lc-awq"}  # ~8 minutes of both cores: run it by name


def _median_seconds(fn, repeat: int = 3) -> float:
    fn()  # warm-up: caches (dequantized weights, int8 weights), allocator
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_int8_path(model, fp_model, window) -> dict:
    """Seconds of one forward on ``window`` [1, T]: float32 model, reference path, int8 path;
    and per Linear shape, float32 F.linear vs the int8 product (quantizing its input included)."""
    import torch

    from lowbit.nn import use_kernel
    from lowbit.nn.qlinear import QuantLinear

    with torch.no_grad():
        out = {"fp32_forward_s": _median_seconds(lambda: fp_model(input_ids=window, use_cache=False))}
        out["reference_forward_s"] = _median_seconds(lambda: model(input_ids=window, use_cache=False))
        with use_kernel(model, "int8") as switched:
            out["int8_forward_s"] = _median_seconds(lambda: model(input_ids=window, use_cache=False))
        out["int8_layers"] = len(switched)
        layers = {}
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear) and (m.in_features, m.out_features) not in layers:
                layers[(m.in_features, m.out_features)] = m
        shapes = []
        g = torch.Generator().manual_seed(0)
        for (n_in, n_out), m in sorted(layers.items()):
            x = torch.randn(window.shape[1], n_in, generator=g)
            w = torch.randn(n_out, n_in, generator=g)
            fp = _median_seconds(lambda: torch.nn.functional.linear(x, w), 10)
            with use_kernel(m, "int8"):
                i8 = _median_seconds(lambda: m(x), 10)
            shapes.append({"tokens": window.shape[1], "in": n_in, "out": n_out, "fp32_s": fp, "int8_s": i8, "speedup": fp / i8})
        out["linear_shapes"] = shapes
    out["forward_speedup_vs_fp32"] = out["fp32_forward_s"] / out["int8_forward_s"]
    out["forward_speedup_vs_reference"] = out["reference_forward_s"] / out["int8_forward_s"]
    return out


@contextlib.contextmanager
def float_column_share():
    """Collects, for every Linear input LLM.int8() decides on during the block, the share
    of input columns it multiplies in float (wraps formats.activations.outlier_columns)."""
    from lowbit.formats import activations

    shares: list[float] = []
    original = activations.outlier_columns

    def counted(x, threshold):
        cols = original(x, threshold)
        shares.append(float(cols.float().mean()))
        return cols

    activations.outlier_columns = counted
    try:
        yield shares
    finally:
        activations.outlier_columns = original


def run_one(name: str, windows: Path, threads: int) -> dict:
    import numpy as np
    import torch

    import lowbit
    from lowbit.config import ActSpec, QuantConfig, WeightSpec
    from lowbit.nn import use_kernel

    torch.set_num_threads(threads)
    desc, method, weight, act, options, timed = SETTINGS[name]
    protocol = lowbit.Protocol()
    model, tok, info = lowbit.load("smollm2-135m")
    evals = torch.from_numpy(np.load(windows / "eval.npy"))
    calib = torch.from_numpy(np.load(windows / "calib.npy"))
    ref, fp = lowbit.reference_for(model, info["source"]["fingerprint"], evals, protocol, progress=False)
    row = {"name": name, "setting": desc, "tool": "lowbit", "fp32_ppl": fp.ppl, "threads": torch.get_num_threads()}
    if method is None:
        row.update(ppl=fp.ppl, kl=0.0, top1=1.0, quantize_s=0.0)
        return row
    config = QuantConfig(
        method=method,
        weight=WeightSpec(**weight) if weight else None,
        act=ActSpec(**act) if act else None,
        options=options,
    )
    start, cpu = time.perf_counter(), time.process_time()
    report = lowbit.quantize(model, config, calib, progress=False)
    row["quantize_s"] = time.perf_counter() - start
    row["quantize_cpu_s"] = time.process_time() - cpu
    row["config"] = report.config
    with float_column_share() as share:
        r = lowbit.evaluate_model(model, evals, protocol, ref, progress=False)
    if share:
        row["float_column_share"] = sum(share) / len(share)
    row.update(ppl=r.ppl, kl=r.kl, top1=r.top1)
    for key in ("lkd_block_rel_error_before", "lkd_block_rel_error_after", "awq_alpha", "output_rel_error", "rtn_output_rel_error"):
        vals = [x[key] for x in report.layers if key in x]
        if vals:
            row[f"mean_{key}"] = sum(vals) / len(vals)
    if timed:
        with use_kernel(model, "int8"):
            r8 = lowbit.evaluate_model(model, evals, protocol, ref, progress=False)
        row["int8_path"] = {"ppl": r8.ppl, "kl": r8.kl, "top1": r8.top1}
        fp_model, _, _ = lowbit.load("smollm2-135m")
        row["int8_path"].update(time_int8_path(model, fp_model.eval(), evals[:1]))
    return row


def run_peer(name: str, windows: Path, model_dir: Path, env: dict) -> dict:
    desc, venv, script, args = PEER_SETTINGS[name]
    py = PEERS / venv / "bin" / "python"
    if not py.exists():
        sys.exit(f"no {venv} venv at {PEERS / venv}: run bash benchmarks/peers/setup_{venv}.sh")
    out = windows / f"{name}.json"
    cmd = [str(py), str(ROOT / "benchmarks" / "peers" / script), "--model", str(model_dir), "--eval", str(windows / "eval.npy"), *args, "--out", str(out)]
    if venv == "llmcompressor":
        cmd += ["--calib", str(windows / "calib.npy")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if res.returncode:
        sys.exit(f"{name} failed:\n{res.stderr[-3000:]}")
    return {"name": name, "setting": desc, "tool": venv, **json.loads(out.read_text())}


def markdown(rows: dict[str, dict], meta: dict) -> str:
    fp = next((r["fp32_ppl"] for r in rows.values() if "fp32_ppl" in r), None)
    lines = [
        f"smollm2-135m; calibration 32 x 512 tokens from the end of the Wikipedia text, evaluation on its first 20 x 512 "
        f"(README protocol). `{meta['command']}` on {meta['machine']}, {meta['date']}. Every process runs with the thread count shown. Time: the quantization call alone (bitsandbytes: "
        "from_pretrained with quantization). int8 path: perplexity with real int8 x int8 -> int32 products, and "
        "the time of one forward on [1, 512] tokens relative to the float32 model.",
        "",
        "| setting | tool | perplexity | vs fp32 | quantize s | threads | int8-path ppl | int8 forward vs fp32 | measured (load avg) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    order = list(SETTINGS) + list(PEER_SETTINGS)
    for name in sorted(rows, key=lambda n: order.index(n) if n in order else len(order)):
        r = rows[name]
        d = f"{100 * (r['ppl'] / fp - 1):+.2f}%" if fp else "-"
        i8 = r.get("int8_path")
        i8_ppl = f"{i8['ppl']:.2f}" if i8 else "-"
        i8_t = f"{i8['forward_speedup_vs_fp32']:.2f}x faster" if i8 else "-"
        threads = r.get("threads", r.get("torch_threads", "-"))
        setting = r["setting"]
        if "float_column_share" in r:
            setting += f" ({100 * r['float_column_share']:.1f}% of input columns in float)"
        when = r.get("date", "-") + (f" ({r['load_avg']:.1f})" if "load_avg" in r else "")
        lines.append(
            f"| {setting} | {r['tool']} | {r['ppl']:.2f} | {d} | {r.get('quantize_s', r.get('quantize_seconds', 0)):.1f} | {threads} "
            f"| {i8_ppl} | {i8_t} | {when} |"
        )
    shapes = next((r["int8_path"]["linear_shapes"] for r in rows.values() if r.get("int8_path")), None)
    if shapes:
        lines += ["", "Per Linear shape (512 tokens, median of 10): float32 F.linear vs lowbit's int8 product, activation quantization included.", "",
                  "| in x out | fp32 ms | int8 ms | speedup |", "|---|---:|---:|---:|"]
        for s in shapes:
            lines.append(f"| {s['in']} x {s['out']} | {1e3 * s['fp32_s']:.2f} | {1e3 * s['int8_s']:.2f} | {s['speedup']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", help="settings: " + ", ".join([*SETTINGS, *PEER_SETTINGS]))
    ap.add_argument("--no-peers", action="store_true", help="skip the peer tools")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in lowbit's processes")
    ap.add_argument("--markdown", action="store_true", help="update BENCHMARKS.md from every stored row")
    args = ap.parse_args()
    if args.one:
        name, windows, threads = args.one
        print(json.dumps(run_one(name, Path(windows), int(threads))))
        return

    import numpy as np

    import lowbit
    from lowbit.models.loader import float32_folder

    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}
    names = args.only if args.only is not None else [n for n in [*SETTINGS, *PEER_SETTINGS] if n not in DEFAULT_SKIP]
    if args.no_peers:
        names = [n for n in names if n in SETTINGS]
    unknown = [n for n in names if n not in SETTINGS and n not in PEER_SETTINGS]
    if unknown:
        sys.exit(f"unknown settings: {', '.join(unknown)}")
    if names:
        _, tok, _ = lowbit.load("smollm2-135m")
        evals, calib = lowbit.prepare_windows(tok)
        work = Path(tempfile.mkdtemp(prefix="lowbit-act-bench-"))
        np.save(work / "eval.npy", evals.numpy())
        np.save(work / "calib.npy", calib.numpy())
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for name in names:
        load_avg = os.getloadavg()[0]
        if name in SETTINGS:
            res = subprocess.run([sys.executable, __file__, "--one", name, str(work), str(args.threads)], capture_output=True, text=True, cwd=ROOT, env=env)
            if res.returncode:
                sys.exit(f"{name} failed:\n{res.stderr[-3000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
        else:
            row = run_peer(name, work, float32_folder("smollm2-135m"), env)
        row["date"] = time.strftime("%Y-%m-%d %H:%M")
        row["load_avg"] = max(load_avg, os.getloadavg()[0])  # 1-minute load average before and after
        stored["rows"][name] = row
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(stored, indent=1))
        extra = f", int8 path {row['int8_path']['ppl']:.2f}" if row.get("int8_path") else ""
        print(f"{name}: ppl {row['ppl']:.2f}{extra}, quantize {row.get('quantize_s', row.get('quantize_seconds', 0)):.1f}s", flush=True)
    if args.markdown:
        meta = {
            "command": "benchmarks/activations.py --threads N [--only ...] --markdown",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"),
        }
        write_section("activations", markdown(stored["rows"], meta))


if __name__ == "__main__":
    main()
