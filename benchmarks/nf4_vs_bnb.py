"""lowbit's NF4 (plain and double-quantized) against bitsandbytes on SmolLM2's own weights.

Every decoder Linear of the embedded SmolLM2-135M is quantized by bitsandbytes (in its own
venv, .venv-bnb or LOWBIT_BNB_PYTHON; see tests/test_bnb_oracle.py) and by lowbit; the
script prints how many matrices differ in any code or any decoded absmax constant.

    python benchmarks/nf4_vs_bnb.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BNB_SIDE = """
import sys, torch, bitsandbytes.functional as F
from safetensors.torch import load_file, save_file
out = {}
for name, w in load_file(sys.argv[1]).items():
    for dq in (False, True):
        packed, st = F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
        p = packed.reshape(-1)
        key = name + (".dq" if dq else "")
        out[key + ".codes"] = torch.stack([p >> 4, p & 0xF], -1).reshape(-1).contiguous()
        a = (F.dequantize_blockwise(st.absmax, st.state2) + st.offset) if dq else st.absmax
        out[key + ".absmax"] = a.float().contiguous()
save_file(out, sys.argv[2])
"""


def main() -> None:
    import lowbit
    from lowbit.formats.base import make_format, quantize_matrix

    py = os.environ.get("LOWBIT_BNB_PYTHON") or str(ROOT / ".venv-bnb" / "bin" / "python")
    model, _, _ = lowbit.load("smollm2-135m")
    mats = {n: m.weight.detach().float().contiguous() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
        save_file(mats, str(src))
        subprocess.run([py, "-c", BNB_SIDE, str(src), str(dst)], check=True)
        ref = load_file(str(dst))
    bad = {False: 0, True: 0}
    for name, w in mats.items():
        for dq in (False, True):
            enc = quantize_matrix(make_format("nf4", double_quant=dq), w)
            key = name + (".dq" if dq else "")
            same = torch.equal(enc.codes.reshape(-1), ref[key + ".codes"]) and torch.equal(enc.params["absmax"].reshape(-1), ref[key + ".absmax"])
            bad[dq] += not same
    print(f"{len(mats)} matrices; differing from bitsandbytes: NF4 {bad[False]}, NF4 + double quant {bad[True]}")


if __name__ == "__main__":
    main()
