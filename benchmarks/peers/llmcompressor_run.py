"""Peer benchmark: quantize a Hugging Face model with llm-compressor on CPU, time it,
and measure perplexity on fixed token windows.

Runs inside the llm-compressor venv (see setup_llmcompressor.sh), never lowbit's:

    bash benchmarks/peers/setup_llmcompressor.sh
    ~/.cache/lowbit-peers/llmcompressor/bin/python benchmarks/peers/llmcompressor_run.py \
        --model /tmp/lbcache/models/SmolLM2-135M-Instruct.Q4_1-<hash> \
        --calib /tmp/peer_calib.npy --eval /tmp/peer_eval.npy \
        --scheme gptq --bits 4 --group-size 64 --asym --out gptq_w4g64a.json

--calib / --eval are int64 token-id arrays [N, T] (e.g. from lowbit.prepare_windows);
they are fed as-is, with no tokenization and no BOS.

Schemes (all Linear layers except lm_head; lm_head is tied to the embeddings):
  rtn        QuantizationModifier, int weights, per group, min/max (data-free)
  gptq       GPTQModifier, block_size 128, dampening_frac 0.01, actorder off unless
             --actorder is given (llm-compressor's own default is "static"; on
             SmolLM2-135M it matters: see the report), sequential per decoder
             layer (llm-compressor's default pipeline), calibration not shuffled
  awq        AWQModifier (default mappings, duo_scaling=True, n_grid=20), then
             QuantizationModifier (RTN) with the same weight scheme
  smoothquant-gptq-w8a8
             SmoothQuantModifier(smoothing_strength=0.8), then GPTQModifier with
             the "W8A8" preset (int8 sym per-channel weights, dynamic per-token
             sym int8 activations); --bits/--group-size/--sym are ignored

Only the oneshot() call is timed (wall and process CPU seconds; the CPU time is
the fairer number on a machine shared with other jobs). Perplexity: for each window, NLL of tokens
1..T-1 given the previous ones; ppl = exp(mean over all predictions), computed
in float32 with llm-compressor's fake-quantized forward.
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peer_eval import perplexity  # noqa: E402  (this folder is on sys.path)


def patch_awq_for_cpu():
    """AWQ pins cached activations for faster host-to-device copies; on a machine
    with no accelerator pin_memory() raises "Cannot access accelerator device".
    Pinning is only an optimization, so make it a no-op."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def build_recipe(scheme, bits, group_size, sym, actorder=None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    gptq_opts = dict(block_size=128, dampening_frac=0.01, actorder=actorder)
    if scheme == "smoothquant-gptq-w8a8":
        return [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(targets=["Linear"], scheme="W8A8", ignore=["lm_head"], **gptq_opts),
        ]
    weights = QuantizationArgs(
        num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group_size
    )
    quant = dict(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
    )
    if scheme == "rtn":
        return [QuantizationModifier(**quant)]
    if scheme == "gptq":
        return [GPTQModifier(**quant, **gptq_opts)]
    if scheme == "awq":
        patch_awq_for_cpu()
        return [AWQModifier(), QuantizationModifier(**quant)]
    raise ValueError(scheme)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--scheme", required=True,
                   choices=["rtn", "gptq", "awq", "smoothquant-gptq-w8a8"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true")
    g.add_argument("--asym", dest="sym", action="store_false")
    p.set_defaults(sym=False)
    p.add_argument("--actorder", default="none", choices=["none", "static", "group", "weight"],
                   help="GPTQ activation ordering (llm-compressor's own default is static)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    actorder = None if args.actorder == "none" else args.actorder

    import compressed_tensors
    import datasets
    import llmcompressor
    import transformers
    from llmcompressor import oneshot

    calib = np.load(args.calib)
    evals = np.load(args.eval)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, device_map=None
    )
    model.eval()
    dataset = datasets.Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": np.ones_like(calib).tolist()}
    )
    recipe = build_recipe(args.scheme, args.bits, args.group_size, args.sym, actorder)

    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    model = oneshot(
        model=model,
        tokenizer=args.model,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
    )
    quantize_seconds = time.perf_counter() - start
    quantize_cpu_seconds = time.process_time() - cpu_start
    load_after = os.getloadavg()[0]

    model.eval()
    ppl = perplexity(model, evals)

    w8a8 = args.scheme == "smoothquant-gptq-w8a8"
    result = {
        "scheme": args.scheme,
        "bits": 8 if w8a8 else args.bits,
        "group_size": None if w8a8 else args.group_size,
        "sym": True if w8a8 else args.sym,
        "gptq": {"block_size": 128, "dampening_frac": 0.01, "actorder": args.actorder}
        if "gptq" in args.scheme else None,
        "quantize_seconds": round(quantize_seconds, 2),
        "quantize_cpu_seconds": round(quantize_cpu_seconds, 2),  # all threads
        "ppl": round(ppl, 4),
        "calib_windows": list(calib.shape),
        "eval_windows": list(evals.shape),
        "torch_threads": torch.get_num_threads(),
        # 1-minute load average around oneshot(): > cores means timings are contended
        "loadavg_before_after": [load_before, load_after],
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
