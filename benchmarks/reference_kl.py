"""How far the compact reference's KL is from the full computation, on smollm2-135m
(or --model, e.g. gemma3-270m, whose 262,144-token vocabulary is the case the compact
reference exists for).

For each setting, the float32 model and a quantized copy run over the protocol's 20
evaluation windows; per window the full KL(P || Q) over the whole vocabulary is summed
beside the compact reference's estimate (lowbit.evaluation.reference: 128 head tokens
exact, 128 tail tokens sampled), recorded from the same float32 log-probabilities. Also
reports the reference's size on disk against float16 full distributions. Results go to
benchmarks/results/reference_kl.json (reference_kl-MODEL.json for another model) and, with
--markdown, into BENCHMARKS.md between the <!-- reference-kl:begin --> / <!-- reference-kl:end -->
markers (reference-kl-MODEL for another model).

    .venv/bin/python benchmarks/reference_kl.py --markdown [--threads 2] [--model gemma3-270m]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS_DIR = ROOT / "benchmarks" / "results"

SETTINGS = {
    "RTN W4 g64 asym": dict(weight={"bits": 4}),
    "RTN W3 g64 asym": dict(weight={"bits": 3}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m", help="any MODEL (gemma3-270m once fetched: a 262,144-token vocabulary)")
    ap.add_argument("--markdown", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import lowbit
    from lowbit.evaluation.metrics import _logits
    from lowbit.evaluation.reference import Recorder, Reference, folder_bytes

    model, tok, _ = lowbit.load(args.model)
    evals, calib = lowbit.prepare_windows(tok)
    n, length = evals.shape
    quantized = {}
    for name, kwargs in SETTINGS.items():
        q = copy.deepcopy(model)
        lowbit.quantize(q, lowbit.method_config("rtn", **kwargs), progress=False)
        quantized[name] = q

    def logprobs(m, i):
        return F.log_softmax(_logits(m, evals[i : i + 1])[0, :-1], -1)

    # window by window (a whole-vocabulary distribution per position is 1 MB for Gemma 3):
    # record the reference and sum the full KL; then the compact estimate from the record
    full = dict.fromkeys(SETTINGS, 0.0)
    est = dict.fromkeys(SETTINGS, 0.0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        rec = None
        for i in range(n):
            p = logprobs(model, i)
            if rec is None:
                vocab = p.shape[-1]
                rec = Recorder(Path(tmp) / "ref", n, length - 1, vocab, {})
            rec.write(i, p)
            for name, q in quantized.items():
                full[name] += float((p.exp() * (p - logprobs(q, i))).sum(-1).double().sum())
        rec.close(True, {})
        ref = Reference(Path(tmp) / "ref")
        size = folder_bytes(ref.folder)
        for i in range(n):
            for name, q in quantized.items():
                est[name] += float(ref.kl(i, logprobs(q, i)).double().sum())
        top_k, samples = ref.top_k, int(ref.ids.shape[-1]) - ref.top_k
    count = n * (length - 1)
    rows = [{"setting": name, "kl_full": full[name] / count, "kl_compact": est[name] / count,
             "difference": (est[name] - full[name]) / count} for name in SETTINGS]
    for r in rows:
        print(json.dumps(r), flush=True)
    seconds = time.perf_counter() - start
    result = {
        "model": args.model, "positions": n * (length - 1), "vocab": vocab, "seconds": seconds,
        "reference_bytes": size, "full_float16_bytes": n * (length - 1) * vocab * 2,
        "top_k": top_k, "samples": samples, "threads": args.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d %H:%M"),
        "rows": rows,
    }
    suffix = "" if args.model == "smollm2-135m" else f"-{args.model}"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"reference_kl{suffix}.json").write_text(json.dumps(result, indent=1))
    if args.markdown:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from rtn import write_section

        lines = [
            f"Compact reference against the full KL on {args.model} (`python benchmarks/reference_kl.py --markdown"
            f"{'' if not suffix else ' --model ' + args.model}`, "
            f"{result['date']}): {result['positions']:,} positions, vocabulary {vocab:,}; the reference keeps "
            f"{result['top_k']} head tokens exactly and {result['samples']} sampled tail tokens per position, "
            f"**{size / 1e6:.1f} MB** on disk where float16 full distributions take {result['full_float16_bytes'] / 1e6:.0f} MB.",
            "",
            "| quantized model | KL full (nats) | KL compact | difference |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {r['setting']} | {r['kl_full']:.5f} | {r['kl_compact']:.5f} | {r['difference']:+.1e} |" for r in rows]
        write_section(f"reference-kl{suffix}", "\n".join(lines))


if __name__ == "__main__":
    main()
