"""The GGML types lowbit can write, their block geometry, and the codec registry.

Block size (weights per block) and type size (bytes per block) come from gguf-py's
``GGML_QUANT_SIZES`` so they cannot drift from what GGUF readers expect. A codec is a
class holding two vectorized methods over whole arrays of blocks; subclassing
``BlockCodec`` with ``ggml_type=...`` fills in the geometry and registers it.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.constants import QK_K as GGML_QK_K

from ...errors import LowbitError

QK_K = GGML_QK_K  # super-block width of the k-quants, from gguf-py like the sizes below

_REGISTRY: dict[GGMLQuantizationType, type[BlockCodec]] = {}


class BlockCodec:
    """One GGML block type. Subclasses are namespaces: all methods are classmethods.

    quantize_blocks:   float32 (n_blocks, block_size)  -> uint8 (n_blocks, type_size)
    dequantize_blocks: uint8 (n_blocks, type_size)     -> float32 (n_blocks, block_size)

    ``importance``, when given, has the shape of ``blocks``: the per-column importance
    (imatrix) already broadcast to every block of every row.
    """

    ggml_type: ClassVar[GGMLQuantizationType]
    name: ClassVar[str]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    # The legacy types' importance path weighs each block by the variance of its whole
    # row (as llama.cpp does), so the row helper must hand that in; see legacy.py.
    needs_row_sigma2: ClassVar[bool] = False

    def __init_subclass__(cls, ggml_type: GGMLQuantizationType | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if ggml_type is None:  # an intermediate base, not a concrete type
            return
        if ggml_type in _REGISTRY:
            raise RuntimeError(f"two codecs registered for {ggml_type.name}")
        cls.ggml_type = ggml_type
        cls.name = ggml_type.name
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[ggml_type]
        _REGISTRY[ggml_type] = cls

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError(cls.__name__)

    @classmethod
    def dequantize_blocks(cls, raw: np.ndarray) -> np.ndarray:
        raise NotImplementedError(cls.__name__)


def resolve_type(qtype: str | int | GGMLQuantizationType) -> GGMLQuantizationType:
    """Accept 'Q4_K' (any case), the enum, or its integer value."""
    try:
        if isinstance(qtype, GGMLQuantizationType):
            t = qtype
        elif isinstance(qtype, str):
            t = GGMLQuantizationType[qtype.strip().upper()]
        else:
            t = GGMLQuantizationType(int(qtype))
    except (KeyError, ValueError, TypeError):
        raise LowbitError(f"unknown GGML type {qtype!r}; supported: {', '.join(supported_types())}") from None
    if t not in _REGISTRY:
        raise LowbitError(f"GGML type {t.name} has no lowbit codec; supported: {', '.join(supported_types())}")
    return t


def codec_for(qtype: str | int | GGMLQuantizationType) -> type[BlockCodec]:
    return _REGISTRY[resolve_type(qtype)]


def supported_types() -> list[str]:
    return [t.name for t in sorted(_REGISTRY, key=int)]


def block_geometry(qtype: str | int | GGMLQuantizationType) -> tuple[int, int]:
    """(weights per block, bytes per block)."""
    c = codec_for(qtype)
    return c.block_size, c.type_size


def row_bytes(qtype: str | int | GGMLQuantizationType, width: int) -> int:
    c = codec_for(qtype)
    if width % c.block_size:
        raise LowbitError(f"{c.name}: width {width} is not a multiple of its block size {c.block_size}")
    return width // c.block_size * c.type_size


# What llama.cpp's quantizer writes instead of a k-quant when a row's width is not a
# multiple of 256 (llama-quant.cpp); if the substitute's block does not fit either, F16.
# Q2_K/Q3_K -> Q4_0 is what the llama.cpp of llama-cpp-python 0.3.36 writes (older
# releases used IQ4_NL); benchmarks/gguf_llamacpp.py compares every preset's per-tensor types with
# llama.cpp's own files.
FALLBACK = {
    GGMLQuantizationType.Q2_K: GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q3_K: GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_K: GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_K: GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q6_K: GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.TQ1_0: GGMLQuantizationType.Q4_0,  # llama.cpp: "TODO: use a symmetric type instead"
    GGMLQuantizationType.TQ2_0: GGMLQuantizationType.Q4_0,
}


def fallback_type(qtype: str | int | GGMLQuantizationType, width: int) -> GGMLQuantizationType:
    """The type llama.cpp would actually use for rows of ``width`` when asked for ``qtype``."""
    t = resolve_type(qtype)
    if width % GGML_QUANT_SIZES[t][0] == 0:
        return t
    sub = FALLBACK.get(t)
    if sub is None or width % GGML_QUANT_SIZES[sub][0]:
        return GGMLQuantizationType.F16
    return sub
