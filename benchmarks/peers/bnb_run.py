"""Peer benchmark: bitsandbytes LLM.int8() or NF4 through transformers, on CPU.

Runs inside the bitsandbytes venv (see setup_bnb.sh), never lowbit's:

    bash benchmarks/peers/setup_bnb.sh
    ~/.cache/lowbit-peers/bnb/bin/python benchmarks/peers/bnb_run.py \
        --model /tmp/lbcache/models/SmolLM2-135M-Instruct.Q4_1-<hash> \
        --eval /tmp/peer_eval.npy --scheme nf4 --out bnb_nf4.json

Schemes (every Linear except lm_head, which transformers keeps in float; it is
tied to the embeddings):
  int8  load_in_8bit, llm_int8_threshold=6.0 (LLM.int8(): int8 per-row absmax
        weights, activation columns above 6.0 kept in float)
  nf4   load_in_4bit, bnb_4bit_quant_type="nf4", no double quantization,
        compute dtype float32 (block size: bitsandbytes' default, reported)
  nf4-dq, fp4, fp4-dq   the same with double quantization and/or the FP4 table

--kernel default runs bitsandbytes' own CPU 4-bit matmul (on CPUs with AVX512-BF16 it
casts the inputs and the absmax constants to bfloat16); --kernel dequant replaces each
4-bit Linear by a float32 Linear holding bitsandbytes' dequantized weights, which measures
its quantization alone. --logits FILE also saves each window's logits (float32, one
safetensors tensor per window) so the caller can score them under its own protocol.

bitsandbytes quantizes while loading, so the timed step is from_pretrained()
with the quantization config (wall and process CPU seconds); a plain float32
load is timed too for comparison. Perplexity protocol as llmcompressor_run.py:
per window, NLL of tokens 1..T-1 given the previous ones, ppl = exp(mean).
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


def timed_load(model_dir, quantization_config=None):
    from transformers import AutoModelForCausalLM

    start, cpu_start = time.perf_counter(), time.process_time()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.float32,
        device_map="cpu",
        quantization_config=quantization_config,
    )
    return model.eval(), time.perf_counter() - start, time.process_time() - cpu_start


def dequantize_linears(model):
    """Swap every 4-bit Linear for a float32 nn.Linear with bitsandbytes' dequantized weight."""
    import bitsandbytes.functional as F

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            state = getattr(getattr(child, "weight", None), "quant_state", None)
            if state is None:
                continue
            w = F.dequantize_4bit(child.weight.data, state).float().reshape(child.out_features, child.in_features)
            plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            plain.weight.data.copy_(w)
            if child.bias is not None:
                plain.bias.data.copy_(child.bias.data.float())
            setattr(parent, child_name, plain)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--scheme", required=True, choices=["int8", "nf4", "nf4-dq", "fp4", "fp4-dq"])
    p.add_argument("--kernel", default="default", choices=["default", "dequant"])
    p.add_argument("--logits", help="save each window's logits here (safetensors)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import bitsandbytes
    import transformers
    from transformers import BitsAndBytesConfig

    if args.scheme == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=args.scheme[:3],
            bnb_4bit_use_double_quant=args.scheme.endswith("-dq"),
            bnb_4bit_compute_dtype=torch.float32,
        )

    _, fp32_seconds, _ = timed_load(args.model)
    model, seconds, cpu_seconds = timed_load(args.model, config)

    linear_types = {}
    blocksize = None
    stored_bytes, stored_weights = 0, 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            name = type(module).__name__
            linear_types[name] = linear_types.get(name, 0) + 1
            state = getattr(module.weight, "quant_state", None)
            if state is not None:
                blocksize = state.blocksize
                stored_weights += module.in_features * module.out_features
                stored_bytes += module.weight.data.numel() * module.weight.data.element_size()
                stored_bytes += state.absmax.numel() * state.absmax.element_size()
                if state.nested:  # double quantization: the absmax of the absmax blocks, and the offset
                    stored_bytes += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4
            elif args.scheme == "int8" and name != "Linear":
                stored_weights += module.in_features * module.out_features
                stored_bytes += module.in_features * module.out_features + 4 * module.out_features
    if args.kernel == "dequant":
        dequantize_linears(model)

    evals = np.load(args.eval)
    start = time.perf_counter()
    ppl = perplexity(model, evals, save_logits=args.logits)
    eval_seconds = time.perf_counter() - start

    result = {
        "scheme": args.scheme,
        "bits": 8 if args.scheme == "int8" else 4,
        "group_size": blocksize,  # NF4 block size; int8 is per row
        "sym": True,
        "quantize_seconds": round(seconds, 2),  # from_pretrained incl. quantization
        "quantize_cpu_seconds": round(cpu_seconds, 2),
        "load_fp32_seconds": round(fp32_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "ppl": round(ppl, 4),
        "kernel": args.kernel,
        "bits_per_weight": 8 * stored_bytes / stored_weights if stored_weights else None,
        "linear_modules": linear_types,
        "eval_windows": list(evals.shape),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0],
        "versions": {
            "bitsandbytes": bitsandbytes.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
