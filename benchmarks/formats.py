"""Every weight format of the family under RTN, GPTQ and AWQ, on smollm2-135m, in one run,
with bitsandbytes' own NF4 / FP4 beside them.

For each bit width (4, 3, 2) the decoder Linears are quantized to each format of that width
by each method (its default settings: ``lowbit.algorithms.base.method_config``) and measured
under the protocol: perplexity, KL to float32, and the exact bits per weight of the stored
form (codes, scales, tables, bitmaps; every byte ``lowbit inspect`` counts). Embeddings and
the LM head stay float32, as bitsandbytes leaves them.

bitsandbytes runs in its own venv (``bash benchmarks/peers/setup_bnb.sh``; .venv-bnb or
$LOWBIT_BNB_PYTHON) on the same float32 folder: transformers' ``load_in_4bit``, then the
logits of every evaluation window are saved and scored here by lowbit's evaluator, so its
perplexity and KL come from exactly the same protocol. Two bitsandbytes kernels: its default
CPU matmul (which casts inputs and absmax to bfloat16 on AVX512-BF16 CPUs) and ``dequant``
(its dequantized weights in a float32 Linear: its quantization alone).

Rows are written to benchmarks/results/formats.json as they finish; a rerun skips rows
already there (each row records its commit; ``--fresh`` starts over). ``--markdown`` writes the table
into BENCHMARKS.md (between <!-- formats:begin --> / <!-- formats:end -->) and the plot
docs/formats-smollm2.png.

    .venv/bin/python benchmarks/formats.py --markdown            # the whole grid, ~1.5 h on 2 cores
    .venv/bin/python benchmarks/formats.py --only nf4 --methods rtn --no-peer
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
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import code_version, load_rows, save_rows  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results" / "formats.json"
PLOT = ROOT / "docs" / "formats-smollm2.png"
METHODS = ("rtn", "gptq", "awq")

# bit width -> [(row name, description, WeightSpec fields)]; family formats use groups of 64
# (NF4's blocksize), GGML types their own blocks; llama.cpp file types (Q4_K_S, ...) pick a
# type per tensor with llama.cpp's fallbacks where 256 does not divide the width (576 here).
GRID: dict[int, list[tuple[str, str, dict]]] = {
    4: [
        ("int4", "int4 g64 asym", dict(bits=4, group_size=64, symmetric=False)),
        ("nf4", "NF4 (blocksize 64)", dict(format="nf4", group_size=64)),
        ("nf4-dq", "NF4 + double quant", dict(format="nf4-dq", group_size=64)),
        ("fp4", "FP4 (blocksize 64)", dict(format="fp4", group_size=64)),
        ("bcq4", "BCQ 4-bit g64", dict(format="bcq4", group_size=64)),
        ("codebook4", "codebook 4-bit per group of 64", dict(format="codebook4", group_size=64)),
        ("Q4_K_S", "llama.cpp Q4_K_S (Q4_K where 256 divides)", dict(format="Q4_K_S")),
    ],
    3: [
        ("int3", "int3 g64 asym", dict(bits=3, group_size=64, symmetric=False)),
        ("bcq3", "BCQ 3-bit g64", dict(format="bcq3", group_size=64)),
        ("codebook3", "codebook 3-bit per group of 64", dict(format="codebook3", group_size=64)),
        ("Q3_K_S", "llama.cpp Q3_K_S (Q3_K where 256 divides)", dict(format="Q3_K_S")),
    ],
    2: [
        ("int2", "int2 g64 asym", dict(bits=2, group_size=64, symmetric=False)),
        ("bcq2", "BCQ 2-bit g64", dict(format="bcq2", group_size=64)),
        ("codebook2", "codebook 2-bit per group of 64", dict(format="codebook2", group_size=64)),
        ("ternary", "ternary g64 (absmean)", dict(format="ternary", group_size=64)),
        ("Q2_K", "llama.cpp Q2_K (Q2_K where 256 divides)", dict(format="Q2_K")),
    ],
}
# bitsandbytes settings: (row name, scheme, kernel)
PEER = (
    ("bnb-nf4", "nf4", "default"),
    ("bnb-nf4-dequant", "nf4", "dequant"),
    ("bnb-nf4-dq-dequant", "nf4-dq", "dequant"),
    ("bnb-fp4-dequant", "fp4", "dequant"),
)


class Replay(torch.nn.Module):
    """A 'model' whose forward returns the logits another process saved for each window,
    so that lowbit's evaluator scores a peer under the same protocol."""

    def __init__(self, path: Path, windows: torch.Tensor):
        super().__init__()
        from safetensors import safe_open

        self.file = safe_open(str(path), "pt")
        self.rows = {tuple(w.tolist()): i for i, w in enumerate(windows)}

    def forward(self, input_ids, use_cache=False):
        logits = [self.file.get_tensor(f"window.{self.rows[tuple(r.tolist())]}") for r in input_ids]
        return SimpleNamespace(logits=torch.stack(logits))


def run_lowbit(model, calib, evals, ref, protocol, method: str, fields: dict) -> dict:
    import lowbit
    from lowbit.algorithms.base import method_config

    q = copy.deepcopy(model)
    config = method_config(method, weight=fields)
    start = time.perf_counter()
    report = lowbit.quantize(q, config, calib, progress=False)
    seconds = time.perf_counter() - start
    r = lowbit.evaluate_model(q, evals, protocol, ref, progress=False)
    return dict(ppl=r.ppl, kl=r.kl, top1=r.top1, bits_per_weight=report.storage["bits_per_weight"], quantize_s=seconds)


def run_peer(scheme: str, kernel: str, evals, ref, protocol, work: Path) -> dict:
    import lowbit
    from lowbit.models.loader import float32_folder

    py = os.environ.get("LOWBIT_BNB_PYTHON") or str(ROOT / ".venv-bnb" / "bin" / "python")
    if not Path(py).exists():
        raise RuntimeError(f"no bitsandbytes venv at {py}: run PEER_VENV={ROOT / '.venv-bnb'} bash benchmarks/peers/setup_bnb.sh")
    import numpy as np

    np.save(work / "eval.npy", evals.numpy())
    logits, out = work / "logits.safetensors", work / "peer.json"
    cmd = [py, str(ROOT / "benchmarks/peers/bnb_run.py"), "--model", str(float32_folder("smollm2-135m")), "--eval", str(work / "eval.npy"),
           "--scheme", scheme, "--kernel", kernel, "--logits", str(logits), "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    peer = json.loads(out.read_text())
    r = lowbit.evaluate_model(Replay(logits, evals), evals, protocol, ref, progress=False)
    logits.unlink()
    return dict(ppl=r.ppl, kl=r.kl, top1=r.top1, bits_per_weight=peer["bits_per_weight"], quantize_s=peer["quantize_seconds"],
                peer_ppl=peer["ppl"], versions=peer["versions"], kernel=kernel)


def best(rows: dict, bits: int) -> dict | None:
    # same size class only: llama.cpp's file types fall back to wider types on 576-wide rows
    mine = [r for r in rows.values() if r.get("bits") == bits and "ppl" in r and not r["key"].startswith("bnb")
            and r["bits_per_weight"] < bits + 0.75]
    return min(mine, key=lambda r: r["ppl"]) if mine else None


def markdown(result: dict) -> str:
    rows = result["rows"]
    meta = result["meta"]
    lines = [
        f"smollm2-135m, decoder Linears only (embeddings and LM head float32), protocol {meta['protocol']}; "
        f"`{meta['command']}`, {meta['machine']}, {meta['date']}; rows from runs at commits "
        f"{', '.join(sorted({r.get('commit', '?') for r in rows.values() if 'ppl' in r and r.get('commit')}))} (each row records its own; "
        "the bitsandbytes rows ran beside the first ones; perplexity does not depend on the thread count). "
        f"float32 perplexity {meta['fp32_ppl']:.2f}. Each method with its default settings; bits/weight are the exact "
        "stored bits of the quantized Linears (codes, scales, tables, bitmaps), the same for every method on a format "
        "(AWQ folds its scales into the preceding norms). KL in nats against float32.",
        "",
        "| bits | format | bits/weight | RTN ppl | RTN KL | GPTQ ppl | GPTQ KL | AWQ ppl | AWQ KL |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for bits, formats in GRID.items():
        for name, desc, _ in formats:
            cells, bpw = [], None
            for m in METHODS:
                r = rows.get(f"{name}/{m}", {})
                if "ppl" in r:
                    cells += [f"{r['ppl']:.2f}", f"{r['kl']:.3f}"]
                    bpw = r["bits_per_weight"]
                else:
                    cells += ["fails" if "error" in r else "n/r", ""]
            width = f"{bpw:.3f}" if bpw else "-"
            lines.append(f"| {bits} | {desc} | {width} | " + " | ".join(cells) + " |")
    peers = [(k, rows[k]) for k, _, _ in PEER if "ppl" in rows.get(k, {})]
    if peers:
        lines += ["", "bitsandbytes " + peers[0][1]["versions"]["bitsandbytes"] + " (transformers `load_in_4bit`, its own venv, "
                  "logits scored by lowbit's evaluator; its own perplexity loop agrees):", "",
                  "| bitsandbytes | kernel | bits/weight | perplexity | KL | its own ppl |", "|---|---|---:|---:|---:|---:|"]
        for k, r in peers:
            scheme = next(s for n, s, _ in PEER if n == k)
            lines.append(f"| {scheme} | {r['kernel']} | {r['bits_per_weight']:.3f} | {r['ppl']:.2f} | {r['kl']:.3f} | {r['peer_ppl']:.2f} |")
    lines.append("")
    for bits in GRID:
        b = best(rows, bits)
        if b:
            lines.append(f"- **{bits} bits** (rows under {bits + 0.75:g} bits/weight, of those measured): best is {b['desc']} with "
                         f"{b['method'].upper()} (perplexity {b['ppl']:.2f}, KL {b['kl']:.3f}, {b['bits_per_weight']:.3f} bits/weight). "
                         "The llama.cpp file types sit above that because SmolLM2's 576-wide layers fall back to wider types.")
    for line in result.get("notes", []):
        lines.append(f"- {line}")
    missing = [f"{n}/{m}" for formats in GRID.values() for n, _, _ in formats for m in METHODS if "ppl" not in rows.get(f"{n}/{m}", {})]
    if missing:
        lines.append(f"- n/r: not run yet ({', '.join(missing)}). BCQ's alternating least squares and k-means refit every group "
                     "at each of AWQ's 20 scale candidates, hours per row on this 2-core CPU; rerun the script to fill them in "
                     "(finished rows are kept).")
    return "\n".join(lines)


def notes(rows: dict) -> list[str]:
    """Sentences the table supports, computed from it (never typed in)."""
    out = []
    nf4, peer = rows.get("nf4/rtn", {}), rows.get("bnb-nf4-dequant", {})
    if "ppl" in nf4 and "ppl" in peer:
        same = f"{nf4['ppl']:.2f}" == f"{peer['ppl']:.2f}"
        out.append(f"lowbit RTN NF4 {nf4['ppl']:.2f} against bitsandbytes' NF4 (dequantized weights) {peer['ppl']:.2f}: "
                   + ("equal to 2 decimals." if same else "NOT equal to 2 decimals."))
    kern = rows.get("bnb-nf4", {})
    if "ppl" in kern:
        out.append(f"bitsandbytes' default CPU kernel gives {kern['ppl']:.2f} on the same weights (on CPUs with AVX512-BF16 its "
                   "4-bit matmul casts inputs and absmax to bfloat16); the dequant row is its quantization alone.")
    for m in ("gptq", "awq"):
        r = rows.get(f"nf4/{m}", {})
        if "ppl" in r and "ppl" in peer:
            verdict = "better" if r["ppl"] < peer["ppl"] else "NOT better"
            out.append(f"{m.upper()}-NF4 {r['ppl']:.2f} at {r['bits_per_weight']:.3f} bits/weight: {verdict} than bitsandbytes' "
                       f"NF4 {peer['ppl']:.2f} at {peer['bits_per_weight']:.3f}.")
    return out


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    marks = {"rtn": "o", "gptq": "s", "awq": "^", "bnb": "x"}
    for r in result["rows"].values():
        if "ppl" not in r:
            continue
        m = "bnb" if r["key"].startswith("bnb") else r["method"]
        ax.scatter(r["bits_per_weight"], r["ppl"], marker=marks[m], color=f"C{r['bits']}" if m != "bnb" else "k", s=60 if m == "bnb" else 36,
                   zorder=3 if m == "bnb" else 2)
        if m == "gptq" or m == "bnb":
            ax.annotate(r["name"], (r["bits_per_weight"], r["ppl"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    for m, mk in marks.items():
        ax.scatter([], [], marker=mk, color="gray", label=m.upper() if m != "bnb" else "bitsandbytes")
    ax.axhline(result["meta"]["fp32_ppl"], color="gray", ls=":", lw=1, label="float32")
    ax.set_yscale("log")
    off = sum(1 for r in result["rows"].values() if r.get("ppl", 0) > 150)
    ax.set_ylim(20, 150)  # the 2-bit rows (perplexity in the thousands and up) are in the table
    if off:
        ax.text(0.01, 0.98, f"{off} rows above 150 not drawn (see the table)", transform=ax.transAxes, va="top", fontsize=8)
    ax.set_xlabel("exact bits per weight (decoder Linears)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("smollm2-135m: every format x {RTN, GPTQ, AWQ} (colour: nominal bits)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT.with_suffix(".tmp.png"), dpi=120)
    os.replace(PLOT.with_suffix(".tmp.png"), PLOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="format rows to run: " + ", ".join(n for f in GRID.values() for n, _, _ in f))
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--no-peer", action="store_true", help="skip bitsandbytes")
    ap.add_argument("--fresh", action="store_true", help="forget earlier rows")
    ap.add_argument("--markdown", action="store_true", help="write BENCHMARKS.md and docs/formats-smollm2.png")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import smollm2_setup

    s = smollm2_setup(args.threads)
    model, protocol, evals, calib, ref, base = s.model, s.protocol, s.evals, s.calib, s.ref, s.base
    result = load_rows(RESULTS, args.fresh)
    commit = code_version()
    result["meta"] = {
        "model": "smollm2-135m", "fp32_ppl": base.ppl, "threads": args.threads, "commit": commit,
        "protocol": "lowbit-ppl-v1 (20 x 512 tokens of the embedded Wikipedia text; calibration 32 x 512)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/formats.py --markdown",
    }
    todo = [(bits, name, desc, fields, m) for bits, formats in GRID.items() for name, desc, fields in formats
            for m in args.methods if not args.only or name in args.only]
    for bits, name, desc, fields, method in todo:
        key = f"{name}/{method}"
        if "ppl" in result["rows"].get(key, {}):
            continue
        row = {"key": key, "name": name, "desc": desc, "bits": bits, "method": method, "fields": fields}
        try:
            row.update(run_lowbit(model, calib, evals, ref, protocol, method, fields))
        except Exception as e:  # recorded, shown as 'fails' in the table, never dropped
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        row["loadavg_1m"], row["commit"] = os.getloadavg()[0], commit
        result["rows"][key] = row
        save_rows(RESULTS, result)
        print(json.dumps({k: row.get(k) for k in ("key", "ppl", "kl", "bits_per_weight", "quantize_s", "error")}), flush=True)
    if not args.no_peer:
        for key, scheme, kernel in PEER:
            if "ppl" in result["rows"].get(key, {}):
                continue
            row = {"key": key, "name": key[4:], "desc": f"bitsandbytes {scheme} ({kernel})", "bits": 4, "method": "bnb"}
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    row.update(run_peer(scheme, kernel, evals, ref, protocol, Path(tmp)))
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
            result["rows"][key] = row
            save_rows(RESULTS, result)
            print(json.dumps({k: row.get(k) for k in ("key", "ppl", "kl", "bits_per_weight", "error")}), flush=True)
    result["notes"] = notes(result["rows"])
    save_rows(RESULTS, result)
    if args.markdown:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from rtn import write_section

        write_section("formats", markdown(result))
        plot(result)
    print(markdown(result))


if __name__ == "__main__":
    main()
