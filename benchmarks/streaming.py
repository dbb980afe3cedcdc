"""Real models beyond the embedded one, streamed block by block: peak memory, time and
quality of `lowbit eval` and `lowbit quantize` on Gemma-3-270M and Qwen2.5-Coder-1.5B.

Each row is one `lowbit` command run in its own process, as a user runs it; the process
measures its own peak resident memory (ru_maxrss) and wall time. Rows:

- eval, whole / streamed: `lowbit eval MODEL [--no-stream]`, recording the float model's
  reference (a private reference cache per row, so every row records; the float32 copy of
  the GGUF, made once per model beforehand, and the text's cache are shared, not counted);
- RTN / GPTQ / AWQ W4 g64 asym: `lowbit quantize MODEL --method M` with the defaults (32
  calibration windows of 512 tokens, evaluation of the original and the result under the
  protocol), streamed.

The models come from `lowbit fetch NAME`. Results go to benchmarks/results/streaming.json
and, with --markdown, into BENCHMARKS.md between <!-- streaming:begin --> and
<!-- streaming:end -->.

    .venv/bin/python benchmarks/streaming.py --markdown [--models gemma3-270m ...] [--rows eval-streamed ...] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "streaming.json"

MODELS = ("gemma3-270m", "qwen2.5-coder-1.5b")
ROWS = {
    "eval-whole": ["eval", "{model}", "--no-stream"],
    "eval-streamed": ["eval", "{model}"],
    "rtn": ["quantize", "{model}", "--method", "rtn", "-o", "{out}"],
    "gptq": ["quantize", "{model}", "--method", "gptq", "-o", "{out}"],
    "awq": ["quantize", "{model}", "--method", "awq", "-o", "{out}"],
}

# runs the CLI in this process and reports the process's own peak RSS and wall time
CHILD = """
import json, resource, sys, time
from lowbit.cli import run
measure = sys.argv.pop()
t0 = time.perf_counter()
code = 0
try:
    run()
except SystemExit as e:
    code = e.code or 0
with open(measure, "w") as f:
    json.dump({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_s": time.perf_counter() - t0, "code": code}, f)
"""


def run_row(model: str, row: str, threads: int, work: Path) -> dict:
    from lowbit.cache import cache_dir

    cache = work / "cache"
    cache.mkdir()
    for shared in ("models", "text", "tokens"):  # the float32 copies, the text and its tokens; not the references
        (cache / shared).symlink_to(cache_dir(shared))
    out, meas, js = work / "out", work / "measure.json", work / "eval.json"
    args = [a.format(model=model, out=out) for a in ROWS[row]] + ["-q", "--threads", str(threads)]
    if row.startswith("eval"):
        args += ["--json", str(js)]
    env = {**os.environ, "LOWBIT_CACHE": str(cache)}
    code = f"import sys; sys.argv = {['lowbit', *args, str(meas)]!r}\n" + CHILD
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    m = json.loads(meas.read_text()) if meas.exists() else {}
    if res.returncode != 0 or m.get("code"):
        lines = [ln.strip(" │╭╮╰╯─") for ln in res.stderr.splitlines()]
        said = [ln for ln in lines if "rror" in ln] or [ln for ln in lines if ln] or ["?"]
        return {"error": said[-1], "command": "lowbit " + " ".join(args)}
    row_out = {"command": "lowbit " + " ".join(args), "peak_rss_mb": m["peak_rss_mb"], "wall_s": m["wall_s"]}
    if row.startswith("eval"):
        r = json.loads(js.read_text())["result"]
        row_out.update(ppl=r["ppl"], seconds=r["seconds"])
    else:
        e = json.loads((out / "eval.json").read_text())
        rep = json.loads((out / "report.json").read_text())
        row_out.update(ppl=e["quantized"]["ppl"], kl=e["quantized"]["kl"], top1=e["quantized"]["top1"],
                       original_ppl=e["original"]["ppl"], quantize_s=rep["seconds"],
                       bits_per_weight=rep["storage"].get("bits_per_weight"))
    return row_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--rows", nargs="*", default=list(ROWS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from common import code_version, load_rows, save_rows

    from lowbit.models.loader import float32_folder

    result = load_rows(RESULTS)
    for model in args.models:
        float32_folder(model)  # made once (and not measured): every row reads this copy
        for row in args.rows:
            with tempfile.TemporaryDirectory() as tmp:
                start, version = time.strftime("%Y-%m-%d %H:%M"), code_version()  # the code the row runs
                r = run_row(model, row, args.threads, Path(tmp))
                load = os.getloadavg()[0]
            r.update(date=start, load_after=round(load, 2), code=version, threads=args.threads,
                     machine=f"{platform.machine()}, {os.cpu_count()} cores")
            result["rows"][f"{model} | {row}"] = r
            print(json.dumps({"row": f"{model} | {row}", **r}), flush=True)
            save_rows(RESULTS, result)
    if args.markdown:
        write_markdown(result)


def write_markdown(result: dict) -> None:
    from rtn import write_section

    lines = [
        "Each row is one `lowbit` command in its own process (`python benchmarks/streaming.py --markdown`); peak RSS is "
        "that process's maximum resident memory, the float32 copy of the GGUF is made beforehand (once per model) and every "
        "row records the float model's reference afresh. Threads, date, load average after the row and commit per row.",
        "",
        "| model | command | perplexity | KL | top-1 | quantize s | wall s | peak RSS MB | predicted MB | run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, r in result["rows"].items():
        model, row = key.split(" | ")
        if "error" in r:
            lines.append(f"| {model} | {row} | failed: {r['error']} | | | | | | | |")
            continue
        pred = f"{predicted(model, row) / 1e6:,.0f}" if row != "eval-whole" else ""
        kl = f"{r['kl']:.4f}" if r.get("kl") is not None else ""
        top1 = f"{100 * r['top1']:.2f}%" if r.get("top1") is not None else ""
        qs = f"{r['quantize_s']:.0f}" if "quantize_s" in r else ""
        ppl = f"{r['ppl']:.3f}" + (f" (float {r['original_ppl']:.3f})" if "original_ppl" in r else "")
        shown = re.sub(r"-o \S+", "-o OUT", r["command"].split(" -q")[0])
        lines.append(f"| {model} | `{shown}` | {ppl} | {kl} | {top1} | {qs} | {r['wall_s']:.0f} | "
                     f"{r['peak_rss_mb']:,.0f} | {pred} | {r['date']}, {r['threads']} threads, load {r['load_after']}, {r['code']} |")
    lines += [
        "",
        "Predicted: `lowbit memory MODEL --method M` (lowbit/models/footprint.py), the larger of the block loop's and the "
        "evaluation's peak, from the model's shapes alone. The same prediction on paper for Llama 2 shapes, GPTQ W4 g64, "
        "32 x 512 calibration tokens, streamed (MB, decimal):",
        "",
        "| shape | parameters | embeddings | one float block | quantized blocks held | block forward | GPTQ solver | block loop | evaluation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    from lowbit.models.footprint import LLAMA_SHAPES, Shapes, eval_peak, quantize_peak

    for name, cfg in LLAMA_SHAPES.items():
        sh = Shapes.from_config(cfg)
        q, e = quantize_peak(sh, "gptq"), eval_peak(sh)
        lines.append(f"| {name} | {sh.params / 1e9:.2f}B | {q['embeddings'] / 1e6:,.0f} | {q['float blocks'] / 1e6:,.0f} | "
                     f"{q['quantized blocks'] / 1e6:,.0f} | {q['block forward'] / 1e6:,.0f} | {q['solver'] / 1e6:,.0f} | "
                     f"**{q['total'] / 1e6:,.0f}** | {e['total'] / 1e6:,.0f} |")
    write_section("streaming", "\n".join(lines))


def predicted(model: str, row: str) -> float:
    """lowbit's own prediction of a row's peak (bytes)."""
    from lowbit.models.footprint import Shapes, eval_peak, quantize_peak
    from lowbit.models.loader import float32_folder

    sh = Shapes.from_config(json.loads((float32_folder(model) / "config.json").read_text()))
    if row.startswith("eval"):
        return eval_peak(sh, quantized=False)["total"]
    return max(quantize_peak(sh, row)["total"], eval_peak(sh)["total"])


if __name__ == "__main__":
    main()
