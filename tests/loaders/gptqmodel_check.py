"""Load a GPTQ or AWQ export with GPTQModel on CPU and dump what the tests compare.

Runs in the loaders' own venv (`make loaders`), never lowbit's: GPTQModel is a peer tool.

    python gptqmodel_check.py EXPORT_DIR IDS.npy OUT.npz [LAYER ...]

OUT.npz holds `logits` (float32, for the token ids in IDS.npy) and, for each LAYER, its
weight as GPTQModel dequantizes it ([out, in], float16 values stored as float32).
"""

import json
import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402

# GPTQModel's CPU kernel torch.compiles its dequantization on first use (seconds per layer
# shape); eager mode computes the same values and keeps the tests fast.
torch._dynamo.config.disable = True


def main() -> None:
    from gptqmodel import BACKEND, GPTQModel

    export, ids_path, out, *layers = sys.argv[1:]
    with open(os.path.join(export, "config.json")) as f:
        method = json.load(f)["quantization_config"]["quant_method"]
    # AWQ exports need GPTQModel's torch AWQ kernel, GPTQ ones its torch GPTQ kernel
    backend = BACKEND.AWQ_TORCH if method == "awq" else BACKEND.TORCH
    # GPTQModel computes in float16 or bfloat16 on CPU; float16 holds the scales exactly
    g = GPTQModel.load(export, device="cpu", backend=backend, dtype=torch.float16)
    ids = torch.from_numpy(np.load(ids_path)).long()
    with torch.no_grad():
        logits = g.model(input_ids=ids).logits.float().numpy()
    arrays = {"logits": logits}
    for name in layers:
        m = g.model.get_submodule(name)
        if method == "awq":  # the torch AWQ kernel dequantizes [in, out] on each forward
            probe = torch.zeros(1, m.in_features, dtype=torch.float16)
            w = m._dequantize_weight_for_inference(probe, dtype=torch.float16)
        else:
            w = m.dequantize_weight()
        arrays[name] = w.T.float().numpy()
    np.savez(out, **arrays)


if __name__ == "__main__":
    main()
