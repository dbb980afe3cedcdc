"""Quantize weights with bitsandbytes on CPU and dump what lowbit's NF4/FP4 tests compare.

Runs in bitsandbytes' own venv (.venv-bnb, or LOWBIT_BNB_PYTHON), never lowbit's:
bitsandbytes is the oracle, a peer tool.

    python bnb_check.py IN.safetensors OUT.safetensors

IN holds float32 matrices; for each NAME and each of nf4 / fp4, with and without double
quantization (blocksize 64), OUT holds
    NAME.<type>[.dq].codes    uint8, one 4-bit index per weight, in row-major order
    NAME.<type>[.dq].absmax   float32, the absmax per block as bitsandbytes decodes it
    NAME.<type>[.dq].deq      float32, bitsandbytes' dequantized matrix
and, with double quantization, .absmax_q (uint8), .absmax2 (float32) and .offset.
"""

import sys

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    import bitsandbytes.functional as F

    src, dst = sys.argv[1:]
    out = {}
    for name, w in load_file(src).items():
        for kind in ("nf4", "fp4"):
            for dq in (False, True):
                packed, state = F.quantize_4bit(w.float().contiguous(), blocksize=64, compress_statistics=dq, quant_type=kind)
                p = packed.reshape(-1)
                codes = torch.stack([p >> 4, p & 0xF], -1).reshape(-1)[: w.numel()]  # high nibble first
                key = f"{name}.{kind}" + (".dq" if dq else "")
                out[f"{key}.codes"] = codes.contiguous()
                out[f"{key}.deq"] = F.dequantize_4bit(packed, state).float().contiguous()
                if dq:
                    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
                    out[f"{key}.absmax_q"] = state.absmax.contiguous()
                    out[f"{key}.absmax2"] = state.state2.absmax.float().contiguous()
                    out[f"{key}.offset"] = torch.as_tensor(state.offset, dtype=torch.float32).reshape(1)
                else:
                    absmax = state.absmax
                out[f"{key}.absmax"] = absmax.float().contiguous()
    save_file(out, dst)


if __name__ == "__main__":
    main()
