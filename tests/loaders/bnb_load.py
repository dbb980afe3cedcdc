"""Load a lowbit `export bnb` folder with transformers + bitsandbytes and run it.

Runs in bitsandbytes' own venv (.venv-bnb, or LOWBIT_BNB_PYTHON), never lowbit's.

    python bnb_load.py FOLDER IDS.safetensors OUT.safetensors

OUT holds ``logits`` of the model on ``ids``, and per Linear4bit layer NAME its weight as
bitsandbytes dequantizes it (``NAME``), so the test can compare both with lowbit's.
"""

import sys

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    import bitsandbytes.functional as F
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    folder, ids_file, dst = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32).eval()
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            out[name] = F.dequantize_4bit(m.weight.data, m.weight.quant_state).float().contiguous()
    if not out:
        raise SystemExit("no Linear4bit layers: the folder was not loaded as a 4-bit model")
    with torch.no_grad():
        out["logits"] = model(input_ids=load_file(ids_file)["ids"]).logits.float().contiguous()
    save_file(out, dst)


if __name__ == "__main__":
    main()
