"""GGUF mixture presets: which GGML type each tensor gets under Q4_K_M, Q6_K, ...

A llama.cpp "file type" such as Q4_K_M is not one type but a rule per tensor, made by
``llama_tensor_get_type`` in llama.cpp's src/llama-quant.cpp. This module carries those
rules over for dense decoder-only models (llama, qwen2, gemma3), as in the llama.cpp
bundled with llama-cpp-python 0.3.36, so that our files have the same layout as
``llama-quantize``'s and differ only in how each tensor is quantized:

- only tensors whose names end in "weight", with 2 dimensions, and that are not norms
  are quantized; everything else (norms, biases) stays F32;
- ``output.weight``, and ``token_embd.weight`` when the model has no separate output
  tensor (tied embeddings: llama.cpp then quantizes the shared tensor like the output),
  get Q6_K, or Q8_0 when the preset's own type is Q8_0 or its block does not divide the
  row width; an untied ``token_embd.weight`` simply gets the preset's type;
- attn_v and ffn_down get more bits in some layers (see ``use_more_bits``), attn_output
  more bits for Q2_K/Q3_K_M/Q3_K_L;
- last, a type whose block does not divide the row width (ne[0], the number of input
  columns) is replaced: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and a
  32-wide type that still does not fit -> F16; TQ1_0/TQ2_0 -> Q4_0 (an untied
  token_embd.weight gets Q4_K under them).

benchmarks/gguf_llamacpp.py checks the result on SmolLM2 against llama.cpp's own files: every
preset's 272 tensors get the same types.

Rules that only fire for mixture-of-experts models, the 70B-class attn_v bump, Falcon
and the IQ1-IQ3 file types (no lowbit codecs) are not carried over.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from ..errors import LowbitError
from ..formats.gguf.table import FALLBACK

T = GGMLQuantizationType


@dataclass(frozen=True)
class Preset:
    name: str
    file_type: LlamaFileType  # written to general.file_type, as llama-quantize does
    base: T  # the type of every quantized tensor no rule overrides


def _p(name: str, base: T, ftype: str | None = None) -> Preset:
    return Preset(name, LlamaFileType[f"MOSTLY_{ftype or name}"], base)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("F32", LlamaFileType.ALL_F32, T.F32),
        _p("F16", T.F16),
        _p("BF16", T.BF16),
        _p("Q8_0", T.Q8_0),
        _p("Q6_K", T.Q6_K),
        _p("Q5_K_M", T.Q5_K),
        _p("Q5_K_S", T.Q5_K),
        _p("Q4_K_M", T.Q4_K),
        _p("Q4_K_S", T.Q4_K),
        _p("Q3_K_L", T.Q3_K),
        _p("Q3_K_M", T.Q3_K),
        _p("Q3_K_S", T.Q3_K),
        _p("Q2_K", T.Q2_K),
        _p("Q5_1", T.Q5_1),
        _p("Q5_0", T.Q5_0),
        _p("Q4_1", T.Q4_1),
        _p("Q4_0", T.Q4_0),
        _p("IQ4_NL", T.IQ4_NL),
        _p("TQ1_0", T.TQ1_0),
        _p("TQ2_0", T.TQ2_0),
    )
}

_BLOCK = re.compile(r"^blk\.(\d+)\.")


def preset(name: str) -> Preset:
    key = name.strip().upper()
    if key not in PRESETS:
        raise LowbitError(f"unknown GGUF type {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get a bigger type in the _M mixtures: the first
    and last eighth of the layers, and every third layer in between (C integer division;
    the remainder test is only reached for i_layer >= n_layers/8, so it is never negative)."""
    eighth = n_layers // 8
    return i_layer < eighth or i_layer >= 7 * n_layers // 8 or (i_layer - eighth) % 3 == 2


def _block(ggml_type: T) -> int:
    return GGML_QUANT_SIZES[ggml_type][0]


def fallback(ggml_type: T, ncols: int) -> T:
    """The type llama.cpp writes for rows ``ncols`` wide when it asked for ``ggml_type``."""
    if ggml_type in (T.F32, T.F16, T.BF16) or ncols % _block(ggml_type) == 0:
        return ggml_type
    sub = FALLBACK.get(ggml_type, ggml_type)  # the codecs' table of llama.cpp's choices
    return sub if ncols % _block(sub) == 0 else T.F16


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """tensor_allows_quantization, restricted to what dense llama-family models hold."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name and "ffn_gate_inp" not in name


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key in ("attn_v.weight", "attn_k.weight", "attn_q.weight", "attn_output.weight"):
        if key in name:
            return key.split(".")[0]
    for key in ("ffn_up", "ffn_gate", "ffn_down"):
        if key in name:
            return key
    return "other"


@dataclass(frozen=True)
class ModelShape:
    """The hyper-parameters the rules look at."""

    n_layer: int
    n_head: int
    n_head_kv: int

    @property
    def n_gqa(self) -> int:
        return self.n_head // max(1, self.n_head_kv)  # llama.cpp: integer n_head / n_head_kv


def _mixture(p: Preset, cat: str, layer: int, n_attn_v: int, hp: ModelShape, ncols: int, tied: bool, imatrix: bool) -> T:
    """llama_tensor_get_type_impl for one tensor (before the width fallback)."""
    f, t = p.name, p.base
    if cat == "output" or (tied and cat == "token_embd"):
        if ncols % _block(t) != 0 or t == T.Q8_0:
            return T.Q8_0
        return T.Q6_K
    if cat == "token_embd":
        return T.Q4_K if f in ("TQ1_0", "TQ2_0") else t
    if cat == "attn_v":
        if f == "Q2_K":
            t = T.Q4_K if hp.n_gqa >= 4 else T.Q3_K
        elif f == "Q3_K_M":
            t = T.Q5_K if layer < 2 else T.Q4_K
        elif f == "Q3_K_L":
            t = T.Q5_K
        elif f == "IQ4_NL" and hp.n_gqa >= 4:
            t = T.Q5_K
        elif f in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_attn_v):
            t = T.Q6_K
        elif f == "Q4_K_S" and layer < 4:
            t = T.Q5_K
        return t
    if cat == "ffn_down":
        n = hp.n_layer
        if f == "Q2_K":
            t = T.Q3_K
        elif f == "Q3_K_M":
            t = T.Q5_K if layer < n // 16 else T.Q4_K  # (Falcon alone keeps Q3_K in some layers)
        elif f == "Q3_K_L":
            t = T.Q5_K
        elif f == "Q4_K_M":
            t = T.Q6_K if use_more_bits(layer, n) else t
        elif f == "IQ4_NL" and layer < n // 8 and not imatrix:
            t = T.Q5_K
        elif f == "Q5_K_M" and use_more_bits(layer, n):
            t = T.Q6_K
        elif f == "Q4_K_S" and layer < n // 8:
            t = T.Q5_K
        elif f in ("Q4_0", "Q5_0") and imatrix and layer < n // 8:
            t = T.Q4_1 if f == "Q4_0" else T.Q5_1
        return t
    if cat == "attn_output":
        return {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}.get(f, t)
    return t


def choose_types(
    name: str, tensors: Iterable[tuple[str, tuple[int, ...]]], hp: ModelShape, imatrix: bool = False
) -> dict[str, T]:
    """GGML type of every tensor under preset ``name``.

    tensors: (GGUF name, shape as [rows, cols] i.e. PyTorch order; ne[0] is the last
    entry). imatrix: whether importance data is used (two rules depend on it)."""
    p = preset(name)
    tensors = list(tensors)
    names = {n for n, _ in tensors}
    tied = "output.weight" not in names
    n_attn_v = sum(1 for n in names if _category(n) == "attn_v")
    out: dict[str, T] = {}
    for tname, shape in tensors:
        if not is_quantizable(tname, shape):
            out[tname] = T.F32
            continue
        if p.base in (T.F32, T.F16, T.BF16):
            out[tname] = p.base
            continue
        m = _BLOCK.match(tname)
        layer = int(m.group(1)) if m else -1
        t = _mixture(p, _category(tname), layer, n_attn_v, hp, int(shape[-1]), tied, imatrix)
        out[tname] = fallback(t, int(shape[-1]))
    return out
