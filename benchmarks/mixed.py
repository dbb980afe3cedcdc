"""Salience-driven mixed precision on SmolLM2-135M: SliM-LLM and CLAQ against GPTQ at 2 and
3 bits, lowbit's automatic bit allocation as a curve over budgets, and GGUF files with an
automatic per-tensor mixture at the sizes of llama.cpp's presets, measured by llama.cpp.

    .venv/bin/python benchmarks/mixed.py --markdown            # everything (about 1.5 h on 2 cores)
    .venv/bin/python benchmarks/mixed.py --parts low gguf      # some parts
    .venv/bin/python benchmarks/mixed.py --only NONE --markdown  # redraw from the saved rows

Parts (rows are saved as they finish in benchmarks/results/mixed.json; a rerun keeps them):

- ``low``: at 2 and 3 bits, GPTQ (W2 g64 asym; W3 g64 asym with the MSE clipping search, the
  issue's baselines), SliM-LLM at the paper's setting (mixed 1/2/3 g128 at a 2-bit code
  average; 2/3/4 at 3) and with the code average raised until its exact bits per weight
  reach GPTQ's, CLAQ's fractional settings (2.1, 3, 3.1, with and without float16
  outliers), and lowbit's bit budget (GPTQ on int2..int8 g64 asym, one width per Linear)
  at GPTQ's exact bits per weight.
- ``curve``: the bit budget (GPTQ, same candidates) at 2.5, 3, 4, 5, 6 and 8 bits.
- ``gguf``: for each of llama.cpp's Q4_K_M, Q3_K_M and Q2_K: llama.cpp's own file (from
  lowbit's F16, ``llama_model_quantize``), lowbit's file of that preset with an importance
  matrix, and lowbit's automatic mixture (RTN with the importance matrix on one GGML type
  per Linear, chosen by the bit budget: ``lowbit export gguf --max-size``) at the preset file's bytes; every file's perplexity
  from llama.cpp itself (benchmarks/peers/llamacpp_run.py in its own venv) and from lowbit.

The Pareto plot (docs/mixed-smollm2.png) adds every row of benchmarks/results/formats.json
(every format under RTN, GPTQ and AWQ). Its x axis counts all tensors: the quantized
Linears' exact stored bytes plus the embedding and norms at 16 bits (as the exports store
them), over all 134.5M parameters; GGUF files: their tensor bytes over their elements.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import code_version, load_rows, save_rows  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results" / "mixed.json"
FORMATS = ROOT / "benchmarks" / "results" / "formats.json"
PLOT = ROOT / "docs" / "mixed-smollm2.png"
PEER_PYTHON = Path.home() / ".cache" / "lowbit-peers" / "llamacpp" / "bin" / "python"

INT_CANDIDATES = ("int2", "int3", "int4", "int5", "int6", "int8")
# GGML types for the GGUF mixture. Q4_1 and Q5_1 are left out: SmolLM2's weights were Q4_1
# (asymmetric 4-bit, blocks of 32) and both grids contain that one, so they reproduce the
# float model exactly (ENVIRONMENT.md: no benchmark may use that grid).
GGUF_CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q8_0")
PRESETS = ("Q4_K_M", "Q3_K_M", "Q2_K")
W2 = {"bits": 2, "group_size": 64, "symmetric": False}
W3 = {"bits": 3, "group_size": 64, "symmetric": False, "observer": "mse"}
CURVE = (2.5, 3.0, 4.0, 5.0, 6.0, 8.0)


def shapes(model) -> dict:
    """Parameter counts: the decoder Linears' and everything else's."""
    from lowbit.models.arch import block_linears, decoder_layers

    _, layers = decoder_layers(model)
    lin = sum(m.weight.numel() for b in layers for m in block_linears(b).values())
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return {"linear": lin, "total": total, "other": total - lin}


def all_tensor_bpw(linear_bpw: float, n: dict) -> float:
    return (linear_bpw * n["linear"] + 16 * n["other"]) / n["total"]


def mixed_overhead(model, group: int) -> float:
    """Bits per weight of the mixed format beyond its codes: a float16 scale and a uint8
    zero point per (row, group) and a uint8 width per group."""
    from lowbit.models.arch import block_linears, decoder_layers

    _, layers = decoder_layers(model)
    bits = weights = 0
    for b in layers:
        for m in block_linears(b).values():
            g = -(-m.in_features // group)
            bits += m.out_features * g * 24 + g * 8
            weights += m.weight.numel()
    return bits / weights


def run(s, method: str, weight: dict, budget=None, options=None) -> dict:
    import lowbit
    from lowbit.algorithms.base import method_config

    q = copy.deepcopy(s.model)
    config = method_config(method, weight=weight, options=options or {})
    start = time.perf_counter()
    report = lowbit.quantize(q, config, s.calib, progress=False, budget=budget)
    seconds = time.perf_counter() - start
    r = lowbit.evaluate_model(q, s.evals, s.protocol, s.ref, progress=False)
    out = dict(ppl=r.ppl, kl=r.kl, top1=r.top1, bits_per_weight=report.storage["bits_per_weight"], quantize_s=seconds)
    if report.allocation:
        a = report.allocation
        counts: dict[str, int] = {}
        for c in a["choices"].values():
            counts[c] = counts.get(c, 0) + 1
        out["allocation"] = {"counts": counts, "predicted_total": a["predicted_total"], "bits_per_weight": a["bits_per_weight"]}
    del q
    return out


def low_rows(s, gptq_bpw: dict) -> list[tuple[str, dict]]:
    """(key, spec) of the 2- and 3-bit rows; SliM-LLM's matched rows need GPTQ's bpw first."""
    rows = []
    for bits, w, choices in ((2, W2, "123"), (3, W3, "234")):
        rows.append((f"gptq-w{bits}", {"bits": bits, "method": "gptq", "weight": w, "label": f"GPTQ W{bits} g64 asym" + (" mse" if bits == 3 else "")}))
        rows.append((f"slim-{bits}", {"bits": bits, "method": "slim-llm", "weight": {"format": f"mixed{choices}", "group_size": 128},
                                      "label": f"SliM-LLM {bits}-bit codes (paper setting)"}))
        if bits in gptq_bpw:
            over = mixed_overhead(s.model, 128)
            t = int((gptq_bpw[bits] - over) * 100) / 100
            rows.append((f"slim-{bits}-matched", {"bits": bits, "method": "slim-llm", "weight": {"format": f"mixed{choices}@{t}", "group_size": 128},
                                                  "label": f"SliM-LLM {t}-bit codes (GPTQ's bits/weight)"}))
            for sens, tail in (("fisher", ""), ("output", "-output")):
                rows.append((f"budget-{bits}{tail}", {"bits": bits, "method": "gptq", "weight": dict(w), "budget": gptq_bpw[bits],
                                                      "sensitivity": sens, "label": f"lowbit bit budget (GPTQ, int2..int8 per Linear; {sens})"}))
        for c in ((("claq2.1", "claq2-or") if bits == 2 else ("claq3", "claq3.1", "claq3-or"))):
            rows.append((f"{c}", {"bits": bits, "method": "claq", "weight": {"format": c}, "label": f"CLAQ {c[4:]}"}))
    return rows


def part_low(s, result, save, only) -> None:
    from lowbit.algorithms.allocate import Budget

    def do(key, spec):
        if "ppl" in result["rows"].get(key, {}) or (only and key not in only):
            return
        row = {"key": key, "part": "low", **spec}
        try:
            budget = Budget(bpw=spec["budget"], candidates=INT_CANDIDATES, sensitivity=spec["sensitivity"]) if "budget" in spec else None
            row.update(run(s, spec["method"], spec["weight"], budget=budget))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        save(key, row)

    for _ in range(2):  # second pass: the rows matched to GPTQ's bits per weight
        gptq = {b: result["rows"][f"gptq-w{b}"]["bits_per_weight"] for b in (2, 3) if "ppl" in result["rows"].get(f"gptq-w{b}", {})}
        for key, spec in low_rows(s, gptq):
            do(key, spec)


def part_curve(s, result, save, only) -> None:
    from lowbit.algorithms.allocate import Budget

    for b in CURVE:
        key = f"curve-{b:g}"
        if "ppl" in result["rows"].get(key, {}) or (only and key not in only):
            continue
        row = {"key": key, "part": "curve", "bits": b, "method": "gptq", "weight": dict(W2), "budget": b, "sensitivity": "fisher",
               "label": "lowbit bit budget (GPTQ, int2..int8 per Linear; fisher)"}
        try:
            row.update(run(s, "gptq", dict(W2), budget=Budget(bpw=b, candidates=INT_CANDIDATES)))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        save(key, row)


def part_gguf(s, result, save, only, peer_python: Path, threads: int) -> None:
    import numpy as np

    from gguf_llamacpp import file_stats, lowbit_ppl, peer  # noqa: E402
    from lowbit.calibration.imatrix import collect_imatrix
    from lowbit.export.gguf_quantize import quantize_to_gguf
    from lowbit.export.gguf_writer import export_gguf

    if not peer_python.exists():
        raise SystemExit(f"no llama.cpp venv at {peer_python}: run bash benchmarks/peers/setup_llamacpp.sh")
    work = Path(tempfile.mkdtemp(prefix="lowbit-mixed-"))
    np.save(work / "eval_windows.npy", s.evals.to(torch.int32).numpy())
    f16 = work / "lowbit-F16.gguf"
    export_gguf(s.model, s.tok, f16, "F16", source=s.info["source"])
    imat = collect_imatrix(s.model, s.calib)

    def measure(key, path, row):
        row.update(file_stats(path))
        row["llamacpp"] = peer(peer_python, "ppl", str(path), "--windows", str(work / "eval_windows.npy"), "--threads", str(threads))
        row["lowbit"] = lowbit_ppl(path, s.evals, s.protocol, s.ref)
        row["ppl"], row["kl"] = row["lowbit"]["ppl"], row["lowbit"]["kl"]
        path.unlink()
        save(key, row)

    for preset in PRESETS:
        keys = {k: f"gguf-{preset}-{k}" for k in ("llamacpp", "imatrix", "mixture", "mixture-output")}
        if only and not set(keys.values()) & set(only):
            continue
        ours = work / f"lowbit-{preset}+imatrix.gguf"
        start = time.perf_counter()
        export_gguf(s.model, s.tok, ours, preset, imatrix=imat, source=s.info["source"])
        ours_s = time.perf_counter() - start
        target = ours.stat().st_size
        if "ppl" not in result["rows"].get(keys["llamacpp"], {}):
            theirs = work / f"llamacpp-{preset}.gguf"
            r = peer(peer_python, "quantize", str(f16), str(theirs), "--type", preset, "--threads", str(threads))
            measure(keys["llamacpp"], theirs, {"key": keys["llamacpp"], "part": "gguf", "preset": preset, "label": f"llama.cpp {preset}",
                                               "quantize_s": r["seconds"]})
        if "ppl" not in result["rows"].get(keys["imatrix"], {}):
            measure(keys["imatrix"], ours, {"key": keys["imatrix"], "part": "gguf", "preset": preset, "label": f"lowbit {preset} + imatrix",
                                            "quantize_s": ours_s})
        else:
            ours.unlink()
        for key, sensitivity in ((keys["mixture"], "fisher"), (keys["mixture-output"], "output")):
            if "ppl" in result["rows"].get(key, {}) or (only and key not in only):
                continue
            path = work / f"lowbit-{preset}-size-mixture.gguf"
            run = quantize_to_gguf(copy.deepcopy(s.model), s.tok, path, preset, windows=s.calib, imatrix=True, source=s.info["source"],
                                   max_bytes=target, candidates=GGUF_CANDIDATES, sensitivity=sensitivity)
            counts: dict[str, int] = {}
            for c in run.allocation["choices"].values():
                counts[c] = counts.get(c, 0) + 1
            label = f"lowbit mixture at {preset}'s bytes" + (" (output error alone)" if sensitivity == "output" else " (Fisher-weighted)")
            row = {"key": key, "part": "gguf", "preset": preset, "label": label, "sensitivity": sensitivity,
                   "quantize_s": run.quantize_seconds, "target_bytes": target,
                   "allocation": {"counts": counts, "predicted_total": run.allocation["predicted_total"]}}
            measure(key, path, row)
    for p in work.iterdir():
        p.unlink()
    work.rmdir()


def plot(result: dict, n: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    if FORMATS.exists():
        rows = [r for r in json.loads(FORMATS.read_text())["rows"].values() if "ppl" in r and not r["key"].startswith("bnb")]
        marks = {"rtn": "o", "gptq": "s", "awq": "^"}
        for m, mk in marks.items():
            pts = [(all_tensor_bpw(r["bits_per_weight"], n), r["ppl"]) for r in rows if r["method"] == m]
            if pts:
                ax.scatter(*zip(*pts), marker=mk, color="0.65", s=22, label=f"{m.upper()} on each format (formats.py)")
    mine = [r for r in result["rows"].values() if "ppl" in r]
    style = {"gptq": ("s", "C0", "GPTQ"), "slim-llm": ("D", "C2", "SliM-LLM"), "claq": ("P", "C3", "CLAQ")}
    for m, (mk, col, lab) in style.items():
        pts = [(all_tensor_bpw(r["bits_per_weight"], n), r["ppl"]) for r in mine if r.get("part") == "low" and r["method"] == m and "budget" not in r]
        if pts:
            ax.scatter(*zip(*pts), marker=mk, color=col, s=46, label=lab, zorder=3)
    curve = sorted((all_tensor_bpw(r["bits_per_weight"], n), r["ppl"]) for r in mine if "budget" in r and r.get("sensitivity") == "fisher")
    if curve:
        ax.plot(*zip(*curve), "-o", color="C1", ms=5, label="lowbit bit budget (GPTQ, one int width per Linear, Fisher-weighted)", zorder=4)
    g = sorted((r["bpw"], r["llamacpp"]["ppl"], r["key"]) for r in mine if r.get("part") == "gguf")
    for k, (mk, col, lab) in {"llamacpp": ("x", "k", "llama.cpp preset (llama.cpp ppl)"), "imatrix": ("v", "C4", "lowbit preset + imatrix (llama.cpp ppl)"),
                              "mixture": ("*", "C5", "lowbit GGUF mixture (llama.cpp ppl)")}.items():
        pts = [(x, y) for x, y, key in g if key.endswith(k)]
        if pts:
            ax.scatter(*zip(*pts), marker=mk, color=col, s=70, label=lab, zorder=5)
    ax.axhline(result["meta"]["fp32_ppl"], color="gray", ls=":", lw=1, label="float32")
    ax.set_yscale("log")
    ax.set_ylim(20, 200)
    off = sum(1 for r in mine if r["ppl"] > 200)
    ax.text(0.99, 0.98, f"rows above 200 not drawn (see the table){f': {off} of this script' if off else ''}", transform=ax.transAxes,
            ha="right", va="top", fontsize=8)
    ax.set_xlabel("exact bits per weight, all tensors (embedding and norms at 16 bits; GGUF: file tensors)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("smollm2-135m: perplexity against size")
    ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1, 0.93))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT.with_suffix(".tmp.png"), dpi=120)
    os.replace(PLOT.with_suffix(".tmp.png"), PLOT)


def markdown(result: dict, n: dict) -> str:
    m = result["meta"]
    rows = result["rows"]
    out = [f"SmolLM2-135M, fp32 perplexity {m['fp32_ppl']:.2f}; protocol {m['protocol']}; {m['threads']} thread(s), {m['machine']}, "
           f"commit {m['commit']}, {m['date']}. `{m['command']}`. Bits per weight: exact stored bits of the decoder Linears "
           f"(codes, scales, zero points, bit maps, centroids, kept outliers); \"all tensors\" adds the embedding and norms at 16 bits "
           f"({n['other']:,} of {n['total']:,} parameters). KL: mean KL divergence from the float model, nats. Time: the quantization call.", ""]
    out += ["### 2 and 3 bits: SliM-LLM and CLAQ against GPTQ", "",
            "| bits | method | setting | bits/weight | all tensors | ppl | KL | top-1 | time s |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted((r for r in rows.values() if r.get("part") == "low"), key=lambda r: (r["bits"], r.get("bits_per_weight", 99))):
        if "ppl" not in r:
            out.append(f"| {r['bits']} | {r['method']} | {r['label']} | | | fails: {r.get('error', '?')[:80]} | | | |")
            continue
        setting = r["label"] + (f" ({', '.join(f'{k} x{v}' for k, v in sorted(r['allocation']['counts'].items()))})" if "allocation" in r else "")
        out.append(f"| {r['bits']} | {r['method']} | {setting} | {r['bits_per_weight']:.3f} | {all_tensor_bpw(r['bits_per_weight'], n):.3f} | "
                   f"{r['ppl']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} | {r['quantize_s']:.0f} |")
    curve = sorted((r for r in rows.values() if "budget" in r and "ppl" in r and r.get("sensitivity") == "fisher"), key=lambda r: r["budget"])
    if curve:
        out += ["", "### The bit budget over budgets (GPTQ on one of int2..int8 g64 asym per Linear)", "",
                "| budget bits/weight | bits/weight | all tensors | layers per width | predicted error | ppl | KL |", "|---:|---:|---:|---|---:|---:|---:|"]
        for r in curve:
            a = r["allocation"]
            out.append(f"| {r['budget']:.3f} | {r['bits_per_weight']:.3f} | {all_tensor_bpw(r['bits_per_weight'], n):.3f} | "
                       f"{', '.join(f'{k} x{v}' for k, v in sorted(a['counts'].items()))} | {a['predicted_total']:.4g} | {r['ppl']:.2f} | {r['kl']:.3f} |")
        if len(curve) >= 3:
            def ranks(v):
                order = sorted(range(len(v)), key=lambda i: v[i])
                return [order.index(i) for i in range(len(v))]
            p, k = ranks([r["allocation"]["predicted_total"] for r in curve]), ranks([r["kl"] for r in curve])
            m = len(curve)
            rho = 1 - 6 * sum((a - b) ** 2 for a, b in zip(p, k)) / (m * (m * m - 1))
            out += ["", f"Predicted against measured: the summed Fisher-weighted output error the plan predicts and the measured KL rank the "
                    f"{m} budgets with Spearman correlation {rho:.2f}."]
    g = [r for r in rows.values() if r.get("part") == "gguf" and "ppl" in r]
    if g:
        out += ["", "### GGUF: an automatic per-tensor mixture at the bytes of llama.cpp's presets, measured by llama.cpp", "",
                "| size of | file | bytes | bits/weight (file tensors) | types | ppl llama.cpp | ppl lowbit | KL lowbit |", "|---|---|---:|---:|---|---:|---:|---:|"]
        for preset in PRESETS:
            for r in sorted((r for r in g if r["preset"] == preset), key=lambda r: r["key"]):
                types = ", ".join(f"{k} x{v}" for k, v in sorted(r["types"].items(), key=lambda kv: -kv[1]))
                out.append(f"| {preset} | {r['label']} | {r['bytes']:,} | {r['bpw']:.3f} | {types} | {r['llamacpp']['ppl']:.2f} | "
                           f"{r['lowbit']['ppl']:.2f} | {r['lowbit']['kl']:.3f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", nargs="*", default=["low", "gguf", "curve"], choices=["low", "gguf", "curve"])
    ap.add_argument("--only", nargs="*", help="row keys to run (NONE: run nothing, redraw)")
    ap.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    ap.add_argument("--fresh", action="store_true", help="forget earlier rows")
    ap.add_argument("--results", type=Path, help="rows file (default benchmarks/results/mixed.json)")
    ap.add_argument("--markdown", action="store_true", help="write BENCHMARKS.md and docs/mixed-smollm2.png")
    args = ap.parse_args()
    global RESULTS
    RESULTS = args.results or RESULTS
    from common import smollm2_setup

    s = smollm2_setup(args.threads)
    n = shapes(s.model)
    result = load_rows(RESULTS, args.fresh)
    commit = code_version()
    result["meta"] = {
        "model": "smollm2-135m", "fp32_ppl": s.base.ppl, "threads": args.threads, "commit": commit,
        "protocol": "lowbit-ppl-v1 (20 x 512 tokens of the embedded Wikipedia text; calibration 32 x 512)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/mixed.py --markdown",
    }

    def save(key, row):
        row["loadavg_1m"], row["commit"] = os.getloadavg()[0], commit
        result["rows"][key] = row
        save_rows(RESULTS, result, done=lambda r: "ppl" in r)
        print(json.dumps({k: row.get(k) for k in ("key", "ppl", "kl", "bits_per_weight", "bpw", "quantize_s", "error")}), flush=True)

    only = set(args.only or ())
    if "NONE" not in only:
        if "low" in args.parts:
            part_low(s, result, save, only)
        if "gguf" in args.parts:
            part_gguf(s, result, save, only, args.peer_python, args.threads)
        if "curve" in args.parts:
            part_curve(s, result, save, only)
    if args.markdown:
        from rtn import write_section

        write_section("mixed", markdown(result, n))
        plot(result, n)
    print(markdown(result, n))


if __name__ == "__main__":
    main()
