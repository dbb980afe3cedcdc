"""Time the README's main-job command from a fresh clone, as a new user would run it.

    python3 benchmarks/fresh_clone.py --markdown

Clones this repository (its committed HEAD) into a temporary folder and runs `make demo`
there with an empty lowbit cache (`LOWBIT_CACHE` in the temporary folder) and pip's cache
turned off (`PIP_NO_CACHE_DIR=1`), so every package is installed, the embedded model is
dequantized and the text is cleaned from scratch. Prints the wall-clock time of each phase
(set-up, then the quantize-and-evaluate command) and, with --markdown, writes them to
BENCHMARKS.md between <!-- fresh-clone:begin --> and <!-- fresh-clone:end -->. Needs only
python3, git and make: it uses no lowbit code before the clone has set itself up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "fresh_clone.json"


def timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    start = time.perf_counter()
    with log.open("ab") as f:
        res = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed with exit code {res.returncode}; see {log}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true", help="update BENCHMARKS.md")
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lowbit-fresh-"))
    clone = work / "lowbit"
    log = work / "demo.log"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(LOWBIT_CACHE=str(work / "cache"), PIP_NO_CACHE_DIR="1")
    load_before = os.getloadavg()[0]
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    # `make demo` is setup then the command; timing them apart shows where the time goes
    setup_s = timed(["make", "setup"], clone, env, log)
    demo_s = timed(["make", "demo"], clone, env, log)
    (eval_json,) = (clone / "runs").glob("*/eval.json")  # what the demo measured, as it saved it
    ev = json.loads(eval_json.read_text())
    rows = {"float32": ev["original"]["ppl"], **{c["method"]: c["result"]["ppl"] for c in ev.get("compare", [])},
            ev["config"]["method"]: ev["quantized"]["ppl"]}
    report = json.loads((eval_json.parent / "report.json").read_text())
    result = {
        "commit": commit,
        "setup_seconds": round(setup_s, 1),
        "command_seconds": round(demo_s, 1),
        "total_seconds": round(setup_s + demo_s, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "loadavg_1min_before": load_before,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "perplexity": rows,
        "bits_per_weight": report["storage"]["bits_per_weight"],
        "quantize_seconds": round(report["seconds"], 1),
        "output": str(eval_json.parent.relative_to(clone)),
    }
    print(json.dumps(result, indent=1))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    if args.markdown:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from rtn import write_section

        write_section(
            "fresh-clone",
            f"`make demo` from a fresh clone (commit {commit}) with nothing installed and empty caches "
            f"(`python3 benchmarks/fresh_clone.py --markdown`; {result['machine']}, load {load_before:.1f} "
            f"before the run, {result['date']}): **{result['total_seconds'] / 60:.1f} min** in all, of which "
            f"set-up (venv, pip installs) {setup_s:.0f} s and the demo command {demo_s:.0f} s "
            "(dequantizing the embedded GGUF, cleaning the text, the original's reference evaluation, "
            f"RTN and its evaluation, {ev['config']['method'].upper()} ({result['quantize_seconds']:.0f} s) and its "
            f"evaluation, saving). Perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in rows.items())
            + f"; {result['bits_per_weight']:.2f} bits per weight in the quantized layers.",
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
