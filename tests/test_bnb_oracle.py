"""NF4 / FP4 (with and without double quantization) against bitsandbytes itself.

bitsandbytes runs in its own venv as the oracle (tests/loaders/bnb_check.py), the way the
GPTQModel loader test does: `python3 -m venv .venv-bnb && .venv-bnb/bin/pip install
torch==2.13.0 bitsandbytes==0.50.2`, or LOWBIT_BNB_PYTHON=/path/to/python. Skipped without it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.formats.base import make_format, quantize_matrix

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).parent / "loaders" / "bnb_check.py"


def bnb_python() -> str | None:
    env = os.environ.get("LOWBIT_BNB_PYTHON")
    if env:
        return env
    default = ROOT / ".venv-bnb" / "bin" / "python"
    return str(default) if default.exists() else None


@pytest.mark.skipif(bnb_python() is None, reason="needs the bitsandbytes venv (.venv-bnb, see module doc)")
def test_nf4_fp4_codes_and_values_equal_bitsandbytes(tmp_path):
    g = torch.Generator().manual_seed(0)
    mats = {
        "gauss": torch.randn(64, 256, generator=g) * 0.02,
        "heavy": (torch.randn(32, 576, generator=g) ** 3) * 0.01,  # SmolLM2's width
        "zeros": torch.cat([torch.zeros(4, 64), torch.randn(4, 64, generator=g)], 1),  # all-zero blocks
        "many": torch.randn(80, 512, generator=g) * 0.05,  # 640 blocks: three nested blocks of 256
    }
    save_file(mats, str(tmp_path / "in.safetensors"))
    subprocess.run([bnb_python(), str(SCRIPT), str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")], check=True, timeout=600)
    ref = load_file(str(tmp_path / "out.safetensors"))
    for name, w in mats.items():
        for kind in ("nf4", "fp4"):
            for dq in (False, True):
                key = f"{name}.{kind}" + (".dq" if dq else "")
                enc = quantize_matrix(make_format(kind, group_size=64, double_quant=dq), w)
                assert torch.equal(enc.codes.reshape(-1), ref[f"{key}.codes"]), key
                assert torch.equal(enc.params["absmax"].reshape(-1), ref[f"{key}.absmax"]), key
                if dq:
                    assert torch.equal(enc.extra["absmax_q"], ref[f"{key}.absmax_q"]), key
                    assert torch.equal(enc.extra["absmax2"], ref[f"{key}.absmax2"]), key
                assert torch.equal(enc.dequantize(), ref[f"{key}.deq"].reshape(w.shape)), key
