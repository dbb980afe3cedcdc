"""BiLLM on smollm2-135m: lowbit's against the public reference code, RTN 1-bit and GPTQ W2,
in one run, same calibration, same protocol, same threads.

Rows (decoder Linears; embeddings and LM head float32):
- RTN 1-bit: sign(w) · mean|w| per row (format bcq1, one group per row);
- GPTQ W2 g64 asym (its defaults);
- lowbit BiLLM, feedback=block (the reference's loop) and feedback=column (GPTQ's loop
  inside each block), and billm-int8 (its eight numbers per row and block as int8);
- the reference: Aaronhuang-778/BiLLM's BRAGPTQ and Binarization ("braq", Hessian salience,
  blocks of 128, damping 0.01, orders (1, 1, 2): its run.sh), driven by lowbit's block
  runner on the same calibration windows. Its code runs unchanged; the patch below only
  makes it run on CPU under today's packages (``torch.cuda.synchronize`` a no-op, the unused
  ``exceptiongroup`` import stubbed, its progress prints silenced).

Get the reference once:  git clone https://github.com/Aaronhuang-778/BiLLM ~/.cache/lowbit-peers/BiLLM
(or --reference DIR). Results: benchmarks/results/billm.json; --markdown writes BENCHMARKS.md
between <!-- billm:begin --> / <!-- billm:end -->.

    .venv/bin/python benchmarks/billm.py --markdown [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "billm.json"
DEFAULT_REF = Path.home() / ".cache" / "lowbit-peers" / "BiLLM"


def reference_quantize(model, calib, ref_dir: Path) -> None:
    """The reference's per-layer solver on every decoder Linear, block by block."""
    sys.path.insert(0, str(ref_dir))
    sys.modules.setdefault("exceptiongroup", types.SimpleNamespace(catch=None))  # imported, never used
    torch.cuda.synchronize = lambda *a, **k: None  # the reference calls it after every layer
    from bigptq import BRAGPTQ
    from binary import Binarization

    from lowbit.runner import run_blocks

    def block(ctx):
        lin = ctx.linears()
        solvers = {n: BRAGPTQ(m, Binarization(m.weight, method="braq", groupsize=128), salient_metric="hessian") for n, m in lin.items()}

        def hook(n):
            return lambda mod, args: solvers[n].add_batch(args[0].data, None)

        ctx.forward_with_hooks({n: hook(n) for n in lin})  # one pass on the float block, as its quant_sequential
        with contextlib.redirect_stdout(io.StringIO()):
            for n in lin:
                solvers[n].fasterquant(blocksize=128, percdamp=0.01, orders=(1, 1, 2))
                solvers[n].free()
        return None  # the runner feeds the quantized block's output on

    with torch.no_grad():
        run_blocks(model, block, calib)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", type=Path, default=Path(os.environ.get("BILLM_REFERENCE", DEFAULT_REF)))
    ap.add_argument("--only", nargs="*", help="rows: rtn1, gptq-w2, billm-block, billm-column, billm-int8, reference")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import smollm2_setup

    import lowbit
    from lowbit.algorithms.base import method_config

    s = smollm2_setup(args.threads)
    model, protocol, evals, calib, ref, base = s.model, s.protocol, s.evals, s.calib, s.ref, s.base
    settings = {
        "rtn1": ("RTN 1-bit: sign(w)·mean|w| per row", method_config("rtn", weight={"format": "bcq1", "group_size": None})),
        "gptq-w2": ("GPTQ W2 g64 asym", method_config("gptq", weight={"bits": 2, "group_size": 64, "symmetric": False})),
        "billm-block": ("lowbit BiLLM (feedback=block, the default)", method_config("billm")),
        "billm-column": ("lowbit BiLLM (feedback=column)", method_config("billm", options={"feedback": "column"})),
        "billm-int8": ("lowbit BiLLM, int8 scales (billm-int8)", method_config("billm", weight={"format": "billm-int8"})),
        "reference": ("BiLLM reference code (Aaronhuang-778/BiLLM)", None),
    }
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}
    rows = old.get("rows", {})
    for key, (desc, config) in settings.items():
        if args.only and key not in args.only:
            continue
        q = copy.deepcopy(model)
        start = time.perf_counter()
        row = {"setting": desc}
        if config is None:
            if not (args.reference / "bigptq.py").exists():
                print(f"no BiLLM reference at {args.reference}: git clone https://github.com/Aaronhuang-778/BiLLM {args.reference}")
                continue
            reference_quantize(q, calib, args.reference)
            commit = args.reference / "COMMIT"
            row["reference_commit"] = commit.read_text().strip() if commit.exists() else "unknown"
        else:
            report = lowbit.quantize(q, config, calib, progress=False)
            layers = [r for r in report.layers if "shape" in r]
            n = sum(r["shape"][0] * r["shape"][1] for r in layers)
            row["bits_per_weight"] = report.storage["bits_per_weight"]
            if key.startswith("billm"):
                row["paper_bits_per_weight"] = sum(r["paper_bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in layers) / n
                row["salient_column_share"] = sum(r["salient_column_share"] for r in layers) / len(layers)
        row["quantize_s"] = time.perf_counter() - start
        r = lowbit.evaluate_model(q, evals, protocol, ref, progress=False)
        row.update(ppl=r.ppl, kl=r.kl, top1=r.top1, loadavg_1m=os.getloadavg()[0])
        rows[key] = row
        print(json.dumps({key: row}), flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"rows": rows}, indent=1))
    meta = {"fp32_ppl": base.ppl, "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python benchmarks/billm.py --markdown"}
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"smollm2-135m, decoder Linears (embeddings and LM head float32), protocol lowbit-ppl-v1, float32 perplexity "
        f"{base.ppl:.2f}; `{meta['command']}`, {meta['machine']}, {args.threads} threads, {meta['date']}; every row in "
        "that one run. Stored bits/weight count every byte (codes, group flags, salient-column masks, break points, "
        "means and scales); the paper's count is one bit per weight and two per salient weight, nothing else.",
        "",
        "| setting | perplexity | KL (nats) | top-1 | stored bits/weight | paper's bits/weight | quantize s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key in settings:
        r = rows.get(key)
        if not r:
            continue
        bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else "as lowbit BiLLM (same structure, not stored)"
        paper = f"{r['paper_bits_per_weight']:.3f}" if "paper_bits_per_weight" in r else ""
        lines.append(f"| {r['setting']} | {r['ppl']:,.2f} | {r['kl']:.3f} | {100 * r['top1']:.1f}% | {bpw} | {paper} | {r['quantize_s']:.0f} |")
    if "reference" in rows and "billm-block" in rows:
        a, b = rows["billm-block"], rows["reference"]
        lines += ["", f"lowbit BiLLM (default) against the reference: perplexity {a['ppl']:,.2f} vs {b['ppl']:,.2f}, "
                  f"{b['quantize_s'] / a['quantize_s']:.2f}x the reference's speed."]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from rtn import write_section

        write_section("billm", text)


if __name__ == "__main__":
    main()
