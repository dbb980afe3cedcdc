"""How far the compact reference's KL is from the full computation, on smollm2-135m.

For each setting, the float32 model and a quantized copy run over the protocol's 20
evaluation windows; per window the full KL(P || Q) over the whole vocabulary is summed
beside the compact reference's estimate (lowbit.evaluation.reference: 128 head tokens
exact, 128 tail tokens sampled), recorded from the same float32 log-probabilities. Also
reports the reference's size on disk against float16 full distributions. Results go to
benchmarks/results/reference_kl.json and, with --markdown, into BENCHMARKS.md between the
<!-- reference-kl:begin --> / <!-- reference-kl:end --> markers.

    .venv/bin/python benchmarks/reference_kl.py --markdown [--threads 2]
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
RESULTS = ROOT / "benchmarks" / "results" / "reference_kl.json"

SETTINGS = {
    "RTN W4 g64 asym": dict(weight={"bits": 4}),
    "RTN W3 g64 asym": dict(weight={"bits": 3}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import lowbit
    from lowbit.evaluation.metrics import _logits
    from lowbit.evaluation.reference import Recorder, Reference, folder_bytes

    model, tok, _ = lowbit.load("smollm2-135m")
    evals, calib = lowbit.prepare_windows(tok)
    n, length = evals.shape
    with torch.no_grad():
        ref_logp = [F.log_softmax(_logits(model, evals[i : i + 1])[0, :-1], -1) for i in range(n)]
    vocab = ref_logp[0].shape[-1]
    with tempfile.TemporaryDirectory() as tmp:
        rec = Recorder(Path(tmp) / "ref", n, length - 1, vocab, {})
        for i, lp in enumerate(ref_logp):
            rec.write(i, lp)
        rec.close(True, {})
        ref = Reference(Path(tmp) / "ref")
        size = folder_bytes(ref.folder)
        rows = []
        for name, kwargs in SETTINGS.items():
            q = copy.deepcopy(model)
            lowbit.quantize(q, lowbit.method_config("rtn", **kwargs), progress=False)
            full = est = 0.0
            start = time.perf_counter()
            with torch.no_grad():
                for i in range(n):
                    logq = F.log_softmax(_logits(q, evals[i : i + 1])[0, :-1], -1)
                    p = ref_logp[i]
                    full += float((p.exp() * (p - logq)).sum(-1).double().sum())
                    est += float(ref.kl(i, logq).double().sum())
            count = n * (length - 1)
            rows.append({"setting": name, "kl_full": full / count, "kl_compact": est / count,
                         "difference": est / count - full / count, "seconds": time.perf_counter() - start})
            print(json.dumps(rows[-1]), flush=True)
            del q
    result = {
        "model": "smollm2-135m", "positions": n * (length - 1), "vocab": vocab,
        "reference_bytes": size, "full_float16_bytes": n * (length - 1) * vocab * 2,
        "top_k": ref.top_k, "samples": int(ref.ids.shape[-1]) - ref.top_k, "threads": args.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d %H:%M"),
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    if args.markdown:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from rtn import write_section

        lines = [
            f"Compact reference against the full KL on smollm2-135m (`python benchmarks/reference_kl.py --markdown`, "
            f"{result['date']}): {result['positions']:,} positions, vocabulary {vocab:,}; the reference keeps "
            f"{result['top_k']} head tokens exactly and {result['samples']} sampled tail tokens per position, "
            f"**{size / 1e6:.1f} MB** on disk where float16 full distributions take {result['full_float16_bytes'] / 1e6:.0f} MB.",
            "",
            "| quantized model | KL full (nats) | KL compact | difference |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {r['setting']} | {r['kl_full']:.5f} | {r['kl_compact']:.5f} | {r['difference']:+.1e} |" for r in rows]
        write_section("reference-kl", "\n".join(lines))


if __name__ == "__main__":
    main()
