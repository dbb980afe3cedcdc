"""Evaluate a GGUF model with the activation rounding of llama.cpp's CPU matrix products.

llama.cpp does not multiply a quantized weight by float32 activations: ggml's CPU
``mul_mat`` first converts the activations (each row of the Linear's input) to the
weight type's "vec_dot type" and takes integer dot products block by block. So the same
weights score a slightly different perplexity in llama.cpp than in a float32 forward pass.
To compare the two on equal terms, ``llamacpp_activations`` hooks every Linear of a model
loaded from a GGUF file and rounds its input the way ggml does for that tensor's type:

- Q4_0, Q5_0, Q8_0, IQ4_NL (vec_dot type Q8_0) and Q4_1, Q5_1 (Q8_1, same values):
  blocks of 32, d = amax/127 stored as float16, q = round-half-even(x * 127/amax)
  (ggml's AVX2 quantize_row_q8_0); x becomes fp16(d) * q;
- the k-quants Q2_K..Q6_K and the ternary TQ1_0, TQ2_0 (vec_dot type Q8_K): blocks of 256, m = the element of largest
  magnitude, iscale = -128/m, q = min(127, round-half-even(iscale * x)), d = 1/iscale in
  float32 (quantize_row_q8_K_ref); x becomes d * q;
- F16 weights: activations rounded to float16; F32: untouched.

Everything else (attention products against the float16 KV cache, accumulation order) is
left as is: those differ by float rounding only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LowbitError

_Q8_0 = {"Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "Q4_1", "Q5_1"}
_Q8_K = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0"}


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """x (last dim a multiple of 32) as ggml's Q8_0 activation blocks decode."""
    b = x.float().reshape(-1, 32)
    amax = b.abs().amax(dim=1, keepdim=True)
    live = amax > 0
    q = torch.round(b * torch.where(live, 127.0 / torch.where(live, amax, 1.0), 0.0))
    d = (amax / 127).half().float()
    return (q * d).reshape(x.shape).to(x.dtype)


def round_q8_k(x: torch.Tensor) -> torch.Tensor:
    """x (last dim a multiple of 256) as ggml's Q8_K activation blocks decode."""
    b = x.float().reshape(-1, 256)
    idx = b.abs().argmax(dim=1, keepdim=True)  # first of equal maxima, as ggml's loop keeps
    m = torch.gather(b, 1, idx)
    live = m != 0
    iscale = torch.where(live, -128.0 / torch.where(live, m, 1.0), 0.0)
    q = torch.round(iscale * b).clamp_(max=127)
    d = torch.where(live, 1.0 / torch.where(live, iscale, 1.0), 0.0)
    return (q * d).reshape(x.shape).to(x.dtype)


def _rounder(type_name: str, width: int):
    if type_name in _Q8_0:
        return round_q8_0 if width % 32 == 0 else None
    if type_name in _Q8_K:
        return round_q8_k if width % 256 == 0 else None
    if type_name in ("F16", "BF16"):  # BF16 weights take BF16 activations in ggml
        dt = torch.float16 if type_name == "F16" else torch.bfloat16
        return lambda x: x.to(dt).to(x.dtype)
    return None  # F32: nothing to round


def llamacpp_activations(model: torch.nn.Module, gguf_path: str | Path) -> list:
    """Hook every Linear of ``model`` (loaded from ``gguf_path``) to round its input as
    llama.cpp's CPU kernels do for that tensor's GGML type. Returns the hook handles
    (call ``.remove()`` on each to undo)."""
    from ..export.gguf_writer import hf_to_gguf_names
    from ..models.gguf_read import open_gguf

    types = {t.name: t.tensor_type.name for t in open_gguf(gguf_path).tensors}
    names = hf_to_gguf_names(model)
    if "output.weight" not in types and "token_embd.weight" in types:
        names.setdefault("lm_head.weight", "token_embd.weight")  # tied: llama.cpp multiplies by token_embd
    handles = []
    for mname, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        g = names.get(f"{mname}.weight")
        if g is None or g not in types:
            raise LowbitError(f"{gguf_path}: no tensor for layer {mname}")
        fn = _rounder(types[g], mod.in_features)
        if fn is not None:
            handles.append(mod.register_forward_pre_hook(lambda _m, args, fn=fn: (fn(args[0]), *args[1:])))
    return handles
