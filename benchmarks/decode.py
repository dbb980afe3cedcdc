"""Decode and prefill speed of what lowbit makes, against the memory-bandwidth ceiling and
llama.cpp, on SmolLM2-135M, in one run with the same thread count for every row.

    .venv/bin/python benchmarks/decode.py --markdown             # everything (~15 min on 2 cores)
    .venv/bin/python benchmarks/decode.py --only lowbit-w4 float32
    .venv/bin/python benchmarks/decode.py --only NONE --markdown  # redraw from the saved rows

What it measures:

- memory bandwidth: the best of several passes summing a 1 GiB float32 tensor with the
  run's threads (a read benchmark: every byte is read once per pass);
- per row, in a fresh process (so its memory is its own): RSS after load (and the RSS of
  the same process before loading, with torch and transformers imported and the model's
  tokenizer loaded: the growth between the two is the model's own memory; for llama.cpp
  the baseline has llama_cpp imported, and its vocabulary loads with the model), the bytes of
  weights one decoded token reads (every matrix the forward pass multiplies, at the size it
  is held in; the tied embedding is read once, as the LM head), the resulting ceiling in
  tokens/s (bandwidth / bytes per token), decode tokens/s at batch 1 (128 new tokens,
  greedy, after a 32-token prompt; the first new token counts as prefill) and prefill
  tokens/s (one 512-token forward pass, best of 3);
- rows: transformers in float32 and bfloat16; lowbit checkpoints loaded with
  ``lowbit.load(path, kernel="auto")``: RTN W4 g64 asym (packed, int4 kernel), RTN W8A8
  (int8 kernel), ternary g64 (its levels are affine in the code, so the int4 kernel holds
  it: 4-bit codes, not a 2-bit table-lookup kernel) and NF4 (no packed kernel for it yet:
  the reference path, dequantize then float matmul, each call); llama.cpp (llama-cpp-python from
  benchmarks/peers/setup_llamacpp.sh, its own venv) on lowbit's Q4_0, Q4_K_M, Q8_0 and
  TQ2_0 files of the same model.

Rows are saved as they finish in benchmarks/results/decode.json; a rerun keeps them unless
--fresh. Every row records the threads, the load average when it ran and the code version.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from common import code_version, load_rows, save_rows  # noqa: E402
RESULTS = HERE / "results" / "decode.json"
PEER_PYTHON = Path.home() / ".cache" / "lowbit-peers" / "llamacpp" / "bin" / "python"
WORK = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "bench-decode"

PROMPT_LEN, NEW_TOKENS, PREFILL_LEN = 32, 128, 512

# key: (label, kind, what)
ROWS = {
    "float32": ("transformers float32", "hf", "float32"),
    "bfloat16": ("transformers bfloat16", "hf", "bfloat16"),
    "lowbit-w4": ("lowbit RTN W4 g64 asym, int4 kernel", "lowbit", "w4"),
    "lowbit-w8a8": ("lowbit RTN W8A8 (per-channel weights, per-token activations), int8 kernel", "lowbit", "w8a8"),
    "lowbit-nf4": ("lowbit NF4 (block 64), reference path", "lowbit", "nf4"),
    "lowbit-ternary": ("lowbit ternary g64, int4 kernel (trits held as 4-bit codes)", "lowbit", "ternary"),
    "llamacpp-Q4_0": ("llama.cpp, lowbit's Q4_0 file", "gguf", "Q4_0"),
    "llamacpp-Q4_K_M": ("llama.cpp, lowbit's Q4_K_M file", "gguf", "Q4_K_M"),
    "llamacpp-Q8_0": ("llama.cpp, lowbit's Q8_0 file", "gguf", "Q8_0"),
    "llamacpp-TQ2_0": ("llama.cpp, lowbit's TQ2_0 file", "gguf", "TQ2_0"),
}

CHECKPOINTS = {
    "w4": ["--method", "rtn", "--bits", "4", "--group-size", "64", "--asym"],
    "w8a8": ["--method", "rtn", "--bits", "8", "--group-size", "channel", "--act-bits", "8"],
    "nf4": ["--method", "rtn", "--format", "nf4"],
    "ternary": ["--method", "rtn", "--format", "ternary"],
}


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# --- workers (run in their own processes) -------------------------------------------------


def prompt_ids(n: int) -> list[int]:
    """The first n tokens of the protocol's evaluation text (the same ids for every row)."""
    ids = json.loads((WORK / "prompt.json").read_text())
    return ids[:n]


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: every matrix multiplied, at its held size."""
    import torch

    from lowbit.nn import QuantLinear

    total, seen = 0, set()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            if mod.kernel == "int4":
                total += mod.int4_weight().nbytes()
            elif mod.kernel == "int8":
                w = mod.int8_weight()
                total += w.codes.numel() + w.scale.numel() * 4 + w.row_sum.numel() * 4
            else:  # reference: the stored codes and parameters, plus the float32 matrix it builds
                total += sum(t.numel() * t.element_size() for t in mod.buffers()) + mod.in_features * mod.out_features * 4
                if mod.encoded is not None:
                    total += sum(t.numel() * t.element_size() for t in vars(mod.encoded).values() if isinstance(t, torch.Tensor))
            if mod.bias is not None:
                total += mod.bias.numel() * mod.bias.element_size()
            seen.update(id(p) for p in mod.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    for p in model.parameters():
        if id(p) in seen or (p is emb and head is not emb):
            continue  # an untied embedding is only looked up (one row per token)
        total += p.numel() * p.element_size()
    return total


def worker_torch(key: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import transformers  # noqa: F401  (imported before the baseline RSS, as loading needs it)

    import lowbit
    from lowbit.generation import generate
    from lowbit.models.loader import float32_folder
    from lowbit.nn.qlinear import kernel_counts

    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, kind, what = ROWS[key]
    folder = float32_folder("smollm2-135m")
    AutoTokenizer.from_pretrained(folder)  # the baseline holds a tokenizer too (~120 MB of code and vocabulary)
    before = rss_bytes()
    start = time.perf_counter()
    if kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, what)).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        kernels, stored = None, None
    else:
        ckpt = WORK / f"ckpt-{what}"
        model, tok, _ = lowbit.load(str(ckpt), kernel="auto")
        kernels = kernel_counts(model)
        stored = (ckpt / "model.safetensors").stat().st_size
    load_s = time.perf_counter() - start
    after = rss_bytes()
    row = {"rss_before_load": before, "rss_after_load": after, "load_s": load_s, "kernels": kernels, "checkpoint_bytes": stored,
           "bytes_per_token": weight_bytes_per_token(model)}
    if kind == "lowbit":
        emb = model.get_input_embeddings().weight
        row["float_embedding_bytes"] = emb.numel() * emb.element_size()
    ids = torch.tensor([prompt_ids(PREFILL_LEN)])
    with torch.inference_mode():
        model(input_ids=ids[:, :8])  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            times.append(time.perf_counter() - t)
    row["prefill_tokens_per_s"] = PREFILL_LEN / min(times)
    text = tok.decode(prompt_ids(PROMPT_LEN))
    generate(model, tok, text, max_new_tokens=8, ignore_eos=True, add_special_tokens=False)  # warm-up
    g = generate(model, tok, text, max_new_tokens=NEW_TOKENS, ignore_eos=True, add_special_tokens=False)
    row.update(decode_tokens_per_s=g.decode_tokens_per_s, decode_s=g.decode_s, new_tokens=g.new_tokens,
               prompt_tokens=g.prompt_tokens, sample=g.text[:160])
    return row


LLAMACPP_WORKER = r'''
import json, os, sys, time
from llama_cpp import Llama
import llama_cpp
path, threads, prompt_len, new, prefill_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ids = json.loads(open(sys.argv[6]).read())
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
before = rss()
t = time.perf_counter()
llm = Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
load_s = time.perf_counter() - t
after = rss()
times = []
for _ in range(3):
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids[:prefill_len])
    times.append(time.perf_counter() - t)
def run(n):
    llm.reset()
    out, first = [], None
    t = time.perf_counter()
    for tok in llm.generate(ids[:prompt_len], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if first is None:
            first = time.perf_counter()
        if len(out) == n:
            break
    return out, first, time.perf_counter()
run(8)
out, first, end = run(new)
print(json.dumps({"rss_before_load": before, "rss_after_load": after, "load_s": load_s,
                  "prefill_tokens_per_s": prefill_len / min(times), "decode_tokens_per_s": (new - 1) / (end - first),
                  "decode_s": end - first, "new_tokens": len(out), "prompt_tokens": prompt_len,
                  "sample": llm.detokenize(out).decode("utf-8", "replace")[:160], "llama_cpp_python": llama_cpp.__version__}))
'''


def gguf_tensor_bytes(path: Path) -> int:
    from lowbit.models.gguf_read import open_gguf

    reader = open_gguf(path)
    return int(sum(t.n_bytes for t in reader.tensors))


def worker_gguf(key: str, threads: int, peer_python: Path) -> dict:
    _, _, ftype = ROWS[key]
    path = WORK / f"lowbit-{ftype}.gguf"
    r = subprocess.run([str(peer_python), "-c", LLAMACPP_WORKER, str(path), str(threads), str(PROMPT_LEN), str(NEW_TOKENS),
                        str(PREFILL_LEN), str(WORK / "prompt.json")], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp worker failed on {path}: {r.stderr.strip().splitlines()[-1:]}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row["bytes_per_token"] = gguf_tensor_bytes(path)  # tied embedding: token_embd is the output matrix too
    row["checkpoint_bytes"] = path.stat().st_size
    return row


# --- the driver ---------------------------------------------------------------------------


def bandwidth_gbs(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(256 * 2**20)  # 1 GiB of float32
    a.sum()
    best = min(_timed(a.sum) for _ in range(8))
    return a.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def prepare(keys: list[str], threads: int) -> None:
    """Checkpoints, GGUF files and the prompt ids the rows need (kept in WORK between runs)."""
    WORK.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    lowbit_bin = str(Path(sys.executable).with_name("lowbit"))
    if not (WORK / "prompt.json").exists():
        import lowbit
        from lowbit.calibration.data import Protocol

        _, tok, _ = lowbit.load("smollm2-135m")
        evals, _ = lowbit.prepare_windows(tok, Protocol())
        (WORK / "prompt.json").write_text(json.dumps([int(t) for t in evals[0][:PREFILL_LEN]]))
    for key in keys:
        _, kind, what = ROWS[key]
        if kind == "lowbit" and not (WORK / f"ckpt-{what}" / "model.safetensors").exists():
            subprocess.run([lowbit_bin, "quantize", "smollm2-135m", *CHECKPOINTS[what], "--no-eval", "-o", str(WORK / f"ckpt-{what}")],
                           check=True, env=env)
        if kind == "gguf" and not (WORK / f"lowbit-{what}.gguf").exists():
            subprocess.run([lowbit_bin, "export", "gguf", "smollm2-135m", "--type", what, "-o", str(WORK / f"lowbit-{what}.gguf")],
                           check=True, env=env)


def markdown(result: dict) -> str:
    bw = result.get("bandwidth_gbs")
    rows = result["rows"]
    base = rows.get("float32", {}).get("decode_tokens_per_s")
    q4 = rows.get("llamacpp-Q4_0", {}).get("decode_tokens_per_s")
    lines = [
        f"Memory bandwidth measured by the script: **{bw:.1f} GB/s** ({result.get('threads')} threads). "
        "Ceiling = bandwidth / bytes of weights read per decoded token.",
        "",
        "| row | kernels | bytes/token | ceiling tok/s | decode tok/s | of ceiling | vs float32 | vs llama.cpp Q4_0 | prefill tok/s | RSS after load (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, (label, _, _) in ROWS.items():
        r = rows.get(key)
        if r is None or "decode_tokens_per_s" not in r:
            lines.append(f"| {label} | n/r: {r.get('error', 'not run') if r else 'not run'} |||||||||")
            continue
        label = r.get("label", label)  # as it was when the row ran (kernels change)
        ceiling = bw * 1e9 / r["bytes_per_token"] if bw else float("nan")
        dec = r["decode_tokens_per_s"]
        kern = ", ".join(f"{n} {k}" for k, n in sorted((r.get("kernels") or {}).items())) or ("llama.cpp" if key.startswith("llamacpp") else "torch")
        lines.append(
            f"| {label} | {kern} | {r['bytes_per_token'] / 1e6:.1f} MB | {ceiling:.0f} | {dec:.1f} | {100 * dec / ceiling:.0f}% | "
            f"{dec / base if base else float('nan'):.2f}x | {dec / q4 if q4 else float('nan'):.2f} | {r['prefill_tokens_per_s']:.0f} | "
            f"{r['rss_after_load'] / 1e6:.0f} (+{(r['rss_after_load'] - r['rss_before_load']) / 1e6:.0f}) |"
        )
    w4 = rows.get("lowbit-w4")
    if w4 and "rss_after_load" in w4:
        grown = w4["rss_after_load"] - w4["rss_before_load"]
        allowed = 1.3 * w4["checkpoint_bytes"] + w4["float_embedding_bytes"]
        lines += ["", f"lowbit W4: RSS grew by {grown / 1e6:.0f} MB on load; the checkpoint is {w4['checkpoint_bytes'] / 1e6:.0f} MB "
                  f"(float embedding included, {w4['float_embedding_bytes'] / 1e6:.0f} MB), so 1.3x the checkpoint plus the float "
                  f"embedding allows {allowed / 1e6:.0f} MB."]
    meta = {r.get("version") for r in rows.values() if r.get("version")}
    lines += ["", f"Run with `{result.get('command', '.venv/bin/python benchmarks/decode.py')}`; code version(s) {', '.join(sorted(meta))}; "
              f"load average when each row ran: " + ", ".join(f"{k} {r['load_avg']:.1f}" for k, r in rows.items() if "load_avg" in r) + "."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help=f"row keys to run ({', '.join(ROWS)}); NONE: run nothing, redraw")
    ap.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    ap.add_argument("--fresh", action="store_true", help="forget earlier rows")
    ap.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md section")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker_torch(args.worker, args.threads)))
        return
    result = load_rows(RESULTS, args.fresh)
    keys = [k for k in ROWS if not args.only or k in args.only]
    if keys:
        prepare(keys, args.threads)
        result["bandwidth_gbs"] = bandwidth_gbs(args.threads)
        result["threads"] = args.threads
        result["command"] = "benchmarks/decode.py " + " ".join(sys.argv[1:])
    for key in keys:
        print(f"decode: {key} ...", file=sys.stderr, flush=True)
        try:
            if ROWS[key][1] == "gguf":
                if not args.peer_python.exists():
                    raise RuntimeError(f"no llama.cpp venv at {args.peer_python}: run bash benchmarks/peers/setup_llamacpp.sh")
                row = worker_gguf(key, args.threads, args.peer_python)
            else:
                r = subprocess.run([sys.executable, __file__, "--worker", key, "--threads", str(args.threads)],
                                   capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
                if r.returncode != 0:
                    raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
                row = json.loads(r.stdout.strip().splitlines()[-1])
        except RuntimeError as e:
            row = {"error": str(e)}
        row.update(key=key, label=ROWS[key][0], threads=args.threads, load_avg=os.getloadavg()[0], version=code_version())
        result["rows"][key] = row
        save_rows(RESULTS, result)
        print(f"decode: {key}: {row.get('decode_tokens_per_s', row.get('error'))}", file=sys.stderr, flush=True)
    if args.markdown:
        print(markdown(result))


if __name__ == "__main__":
    main()
