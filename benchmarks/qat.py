"""Quantization-aware training on SmolLM2-135M: the recovery curves, and a killed run resumed.

    .venv/bin/python benchmarks/qat.py --markdown                 # all runs
    .venv/bin/python benchmarks/qat.py --runs w4-gptq --steps 60  # one run, fewer steps
    .venv/bin/python benchmarks/qat.py --runs NONE --markdown     # redraw from the saved rows

Runs (each ``lowbit qat`` as a user runs it, in a subprocess, with --eval-every so that the
curve has the protocol's perplexity and KL from the PTQ start (step 0) to the end):

- ``w4-gptq``: int4 g64 asym starting from lowbit's GPTQ, learned scales, distillation.
- ``b158``: BitNet b1.58 (absmean ternary weights per matrix, 8-bit absmax activations per
  token) from the float model, fixed scales, distillation.
- ``resume``: a short run killed (SIGKILL) once its state has been written, resumed with
  --resume, against the same run uninterrupted: the per-step losses are compared.

Recovery per CPU-hour: (perplexity at the start - at the end) / (training wall hours x
threads). Rows go to benchmarks/results/qat.json; the plot to docs/qat-smollm2.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import code_version  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results" / "qat.json"
PLOT = ROOT / "docs" / "qat-smollm2.png"
LOWBIT = [str(Path(sys.executable).parent / "lowbit")]

RUNS = {
    "w4-gptq": ["--format", "int4", "-g", "64", "--asym", "--init", "gptq"],
    "b158": ["--format", "bitnet158", "--init", "rtn", "--lr", "1e-4"],
}


def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}


def save(result: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(RESULTS)


def env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def run_curve(name: str, steps: int, eval_every: int, batch: int, train_len: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="lowbit-qat-bench-") as tmp:
        out = Path(tmp) / "out"
        cmd = [*LOWBIT, "qat", "smollm2-135m", *RUNS[name], "--steps", str(steps), "--batch", str(batch),
               "--train-len", str(train_len), "--eval-every", str(eval_every), "--save-every", str(eval_every), "--quiet", "-o", str(out)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env(threads), cwd=ROOT)
        wall = time.perf_counter() - start
        hist = json.loads((out / "training.json").read_text())["history"]
        meta = json.loads((out / "lowbit_config.json").read_text())
        results, storage = meta.get("results") or {}, (meta.get("report") or {}).get("storage") or {}
    curve = [{"step": h["step"], "tokens": h["tokens"], **h["eval"]} for h in hist if "eval" in h]
    final = results.get("qat") or {}
    curve.append({"step": steps, "tokens": hist[-1]["tokens"], **{k: final[k] for k in ("ppl", "kl", "top1") if k in final}})
    hours = results.get("training_seconds", wall) / 3600
    return {"key": name, "args": RUNS[name], "steps": steps, "batch": batch, "train_len": train_len, "threads": threads, "wall_s": wall,
            "training_s": results.get("training_seconds"), "float_ppl": (results.get("original") or {}).get("ppl"),
            "curve": curve, "loss": [[h["step"], h["loss"]] for h in hist if "loss" in h],
            "tokens_per_s": sum(h["tokens_per_s"] for h in hist if "tokens_per_s" in h) / max(1, sum("tokens_per_s" in h for h in hist)),
            "bits_per_weight": storage.get("bits_per_weight"),
            "recovery_per_cpu_hour": (curve[0]["ppl"] - curve[-1]["ppl"]) / (hours * threads) if hours else None}


def run_resume(threads: int, steps: int = 12, kill_after: int = 6) -> dict:
    """The same short run twice: uninterrupted, and killed once the state of step
    ``kill_after`` is on disk, then resumed; their per-step losses."""
    common = ["--format", "int3", "-g", "64", "--asym", "--steps", str(steps), "--batch", "1", "--train-len", "128",
              "--save-every", "3", "--windows", "4", "--quiet"]
    with tempfile.TemporaryDirectory(prefix="lowbit-qat-resume-") as tmp:
        full, killed = Path(tmp) / "full", Path(tmp) / "killed"
        subprocess.run([*LOWBIT, "qat", "smollm2-135m", *common, "-o", str(full)], check=True, env=env(threads), cwd=ROOT)
        a = json.loads((full / "training.json").read_text())["history"]
        state = killed.with_name("killed.qat") / "qat-state.pt"
        proc = subprocess.Popen([*LOWBIT, "qat", "smollm2-135m", *common, "-o", str(killed)], env=env(threads), cwd=ROOT,
                                start_new_session=True)
        killed_at = None
        while proc.poll() is None:
            if state.exists():
                import torch

                try:
                    step = int(torch.load(state, weights_only=True)["step"])
                except Exception:  # being replaced at this moment
                    step = 0
                if step >= kill_after:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    killed_at = step
                    break
            time.sleep(0.5)
        if killed_at is None:
            raise SystemExit("the run to be killed finished before its state reached the kill step; raise --steps")
        subprocess.run([*LOWBIT, "qat", "smollm2-135m", *common, "--resume", "-o", str(killed)], check=True, env=env(threads), cwd=ROOT)
        b = json.loads((killed / "training.json").read_text())["history"]
    la = [h["loss"] for h in a if "loss" in h]
    lb = [h["loss"] for h in b if "loss" in h]
    diff = max(abs(x - y) for x, y in zip(la, lb)) if len(la) == len(lb) else None
    return {"key": "resume", "steps": steps, "killed_at_state_step": killed_at, "losses_uninterrupted": la, "losses_resumed": lb,
            "max_abs_difference": diff, "identical": la == lb}


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in result["rows"].values() if "curve" in r]
    if not curves:
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, r in zip(axes[0], curves):
        t = [c["tokens"] / 1e3 for c in r["curve"]]
        ax.plot(t, [c["ppl"] for c in r["curve"]], "o-", label="perplexity")
        if r.get("float_ppl"):
            ax.axhline(r["float_ppl"], color="gray", ls=":", label="float32")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens (thousands)")
        ax.set_ylabel("perplexity (protocol, log)")
        b = ax.twinx()
        b.plot(t, [c["kl"] for c in r["curve"]], "s--", color="C1", label="KL")
        b.set_ylabel("KL to float (nats)")
        ax.set_title(f"{r['key']}: {' '.join(r['args'])}", fontsize=8)
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(alpha=0.3)
    fig.suptitle("smollm2-135m: QAT from the PTQ start (step 0)")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT.with_suffix(".tmp.png"), dpi=110)
    os.replace(PLOT.with_suffix(".tmp.png"), PLOT)


def markdown(result: dict) -> str:
    m = result.get("meta", {})
    out = [f"SmolLM2-135M, protocol as in the README; training windows from the text after the evaluation windows; "
           f"{m.get('machine')}, commit {m.get('commit')}, {m.get('date')}. `{m.get('command')}`. Recovery per CPU-hour: "
           "perplexity gained from the PTQ start over training wall hours x threads.", "",
           "| run | lowbit qat arguments | steps x windows x tokens | threads | tokens/s | bits/weight | ppl start | ppl end | KL start | KL end | training min | recovery / CPU-hour |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"].values():
        if "curve" not in r:
            continue
        c0, c1 = r["curve"][0], r["curve"][-1]
        out.append(f"| {r['key']} | `{' '.join(r['args'])}` | {r['steps']} x {r['batch']} x {r.get('train_len', 512)} | {r['threads']} | {r['tokens_per_s']:.0f} | "
                   f"{(r['bits_per_weight'] or 0):.3f} | {c0['ppl']:.2f} | {c1['ppl']:.2f} | {c0['kl']:.3f} | {c1['kl']:.3f} | "
                   f"{(r['training_s'] or r['wall_s']) / 60:.1f} | {r['recovery_per_cpu_hour']:.1f} |")
    for r in result["rows"].values():
        if "curve" in r:
            out.append("")
            out.append(f"{r['key']} curve (tokens: perplexity / KL): " + ", ".join(f"{c['tokens']:,}: {c['ppl']:.2f} / {c['kl']:.3f}" for c in r["curve"]))
    res = result["rows"].get("resume")
    if res:
        out += ["", f"Killed and resumed (`int3 g64`, {res['steps']} steps of one 128-token window, state every 3 steps, SIGKILL once "
                f"the state of step {res['killed_at_state_step']} was written, then `--resume`): per-step losses "
                f"{'identical to' if res['identical'] else 'against'} the uninterrupted run"
                + ("" if res["identical"] else f" (largest difference {res['max_abs_difference']:.3g})") + "."]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=["resume", *RUNS], help="w4-gptq, b158, resume (NONE: redraw only)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=15)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true", help="write BENCHMARKS.md and docs/qat-smollm2.png")
    args = ap.parse_args()
    result = load()
    result["meta"] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "commit": code_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
                      "command": f"python benchmarks/qat.py --steps {args.steps} --eval-every {args.eval_every} --batch {args.batch} "
                                 f"--train-len {args.train_len} --markdown"}
    for name in args.runs:
        if name == "NONE":
            continue
        row = run_resume(args.threads) if name == "resume" else run_curve(name, args.steps, args.eval_every, args.batch, args.train_len, args.threads)
        row["commit"] = result["meta"]["commit"]
        result["rows"][name] = row
        save(result)
        print(json.dumps({k: v for k, v in row.items() if k not in ("loss", "losses_uninterrupted", "losses_resumed")}), flush=True)
    if args.markdown:
        from rtn import write_section

        write_section("qat", markdown(result))
        plot(result)
    print(markdown(result))


if __name__ == "__main__":
    main()
