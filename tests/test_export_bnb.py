"""``lowbit export bnb``: NF4 / FP4 checkpoints in the 4-bit layout transformers reloads with
bitsandbytes. The layout is checked here against its own description; the reload runs in
the bitsandbytes venv (tests/loaders/bnb_load.py) and is skipped without it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.algorithms.base import method_config
from lowbit.errors import LowbitError
from lowbit.export.bnb import export_bnb
from lowbit.formats.normal_float import dequantize_dynamic_blockwise, table
from lowbit.nn.qlinear import QuantLinear
from tests.test_bnb_oracle import bnb_python
from tests.test_gguf_export import kdir  # noqa: F401  (fixture)

LOADER = Path(__file__).parent / "loaders" / "bnb_load.py"


def _quantized(kdir, fmt, method="rtn", excerpt=None, **opts):
    model, tok, _ = lowbit.load(str(kdir))
    ids = None
    if method != "rtn":
        ids = torch.tensor(tok(excerpt[:30000])["input_ids"][: 8 * 64]).reshape(8, 64)
    lowbit.quantize(model, method_config(method, weight={"format": fmt}, options=opts, calib_precision="fp32"), ids, progress=False)
    return model, tok


def _decode_bnb(t: dict, name: str, shape) -> torch.Tensor:
    """A bitsandbytes 4-bit layer decoded from its stored tensors by the layout's rules."""
    w = f"{name}.weight"
    state = json.loads(bytes(t[f"{w}.quant_state.bitsandbytes__{'nf4' if f'{w}.quant_state.bitsandbytes__nf4' in t else 'fp4'}"].tolist()))
    p = t[w].reshape(-1)
    codes = torch.stack([p >> 4, p & 0xF], -1).reshape(-1)[: shape[0] * shape[1]]
    absmax = t[f"{w}.absmax"]
    if "nested_offset" in state:
        absmax = dequantize_dynamic_blockwise(absmax, t[f"{w}.nested_absmax"], state["nested_blocksize"]) + state["nested_offset"]
    vals = t[f"{w}.quant_map"][codes.long()] * absmax.repeat_interleave(state["blocksize"])
    assert state["shape"] == list(shape)
    return vals.reshape(shape)


@pytest.mark.parametrize("fmt", ["nf4", "nf4-dq", "fp4-dq"])
def test_layout_holds_the_quantized_weights(kdir, tmp_path, fmt):  # noqa: F811
    model, tok = _quantized(kdir, fmt)
    out = export_bnb(model, tok, tmp_path / "bnb")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == fmt[:3]
    assert cfg["bnb_4bit_use_double_quant"] == fmt.endswith("-dq") and cfg["llm_int8_skip_modules"] == ["lm_head"]
    t = load_file(str(out / "model.safetensors"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, m in layers.items():
        assert torch.equal(_decode_bnb(t, name, (m.out_features, m.in_features)), m.dequantized_weight()), name
        assert torch.equal(t[f"{name}.weight.quant_map"], table(fmt[:3]))


def test_refusals(kdir, tmp_path, excerpt):  # noqa: F811
    model, tok = _quantized(kdir, "bcq3")
    with pytest.raises(LowbitError, match="stores nf4, nf4-dq, fp4 or fp4-dq only"):
        export_bnb(model, tok, tmp_path / "a")
    model, tok = _quantized(kdir, "nf4", method="gptq", excerpt=excerpt)  # act-order groups
    with pytest.raises(LowbitError, match="permuted groups"):
        export_bnb(model, tok, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.skipif(bnb_python() is None, reason="needs the bitsandbytes venv (.venv-bnb, see tests/test_bnb_oracle.py)")
@pytest.mark.parametrize("fmt", ["nf4", "fp4-dq"])
def test_transformers_reloads_it_with_bitsandbytes(kdir, tmp_path, excerpt, fmt):  # noqa: F811
    model, tok = _quantized(kdir, fmt, method="gptq", excerpt=excerpt, static_groups=True)
    out = export_bnb(model, tok, tmp_path / "bnb")
    ids = torch.tensor(tok(excerpt[:2000])["input_ids"][:64]).reshape(1, 64)
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    subprocess.run([bnb_python(), str(LOADER), str(out), str(tmp_path / "ids.safetensors"), str(tmp_path / "o.safetensors")], check=True, timeout=600)
    theirs = load_file(str(tmp_path / "o.safetensors"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(theirs) - {"logits"} == set(layers)
    for name, m in layers.items():
        assert torch.equal(theirs[name], m.dequantized_weight()), name
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    # bitsandbytes' CPU kernel (gemv_4bit on AVX512-BF16 machines) rounds the inputs and the
    # absmax constants to bfloat16, so its forward is close but not float32-exact
    torch.testing.assert_close(theirs["logits"], ours, rtol=0, atol=0.03)
