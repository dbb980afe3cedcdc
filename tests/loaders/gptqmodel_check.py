"""Load a GPTQ export with GPTQModel on CPU and dump what the tests compare.

Runs in the loaders' own venv (`make loaders`), never lowbit's: GPTQModel is a peer tool.

    python gptqmodel_check.py EXPORT_DIR IDS.npy OUT.npz [LAYER ...]

OUT.npz holds `logits` (float32, for the token ids in IDS.npy) and, for each LAYER, its
weight as GPTQModel dequantizes it ([out, in], float16 values stored as float32).
"""

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
    # GPTQModel computes in float16 or bfloat16 on CPU; float16 holds GPTQ's scales exactly
    g = GPTQModel.load(export, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    ids = torch.from_numpy(np.load(ids_path)).long()
    with torch.no_grad():
        logits = g.model(input_ids=ids).logits.float().numpy()
    arrays = {"logits": logits}
    for name in layers:
        arrays[name] = g.model.get_submodule(name).dequantize_weight().T.float().numpy()
    np.savez(out, **arrays)


if __name__ == "__main__":
    main()
