"""A llama.cpp file type (Q4_K_M, Q6_K, Q2_K, ...) as a per-layer format plan.

``--format Q4_K_M`` names no single format: llama.cpp gives each tensor its own GGML type
(gguf_presets: more bits for some attn_v / ffn_down layers, fallbacks where a block does
not divide the width). ``plan_config`` resolves that for one model before the runner
starts: every decoder Linear gets an exact-name override with its GGML type (a format of
the family, formats.ggml), and a Linear the plan leaves in float16/float32 is ignored (the
GGUF export writes it as the plan says). The config keeps the file type's name as its
weight format, so ``lowbit export gguf`` of the checkpoint knows the file type and the
types of the tensors outside the decoder blocks (embedding, output).

Overrides and ignores the user gave still apply: a user override's fields are laid over
the plan's format for the layers it matches.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..config import QuantConfig, _match
from ..errors import LowbitError
from ..formats.names import is_mixture
from ..models.arch import block_linears, decoder_layers

log = logging.getLogger(__name__)

FLOAT_TYPES = ("F32", "F16", "BF16")


def plan_config(model: torch.nn.Module, config: QuantConfig, fit_importance: bool) -> QuantConfig:
    """``config`` with the file type of its weight format resolved for ``model``'s decoder
    Linears (unchanged when the format is not a llama.cpp file type). fit_importance: the
    method weighs its fits by calibration importance (two of llama.cpp's rules change)."""
    w = config.weight
    if w is None or not is_mixture(w.format):
        return config
    from .gguf_writer import plan_types

    types = plan_types(model, w.format, imatrix=fit_importance)
    prefix, layers = decoder_layers(model)
    overrides: dict[str, dict] = {}
    ignore = list(config.ignore)
    fallbacks: dict[str, int] = {}
    for i, block in enumerate(layers):
        for local in block_linears(block):
            full = f"{prefix}.{i}.{local}"
            t = types.get(f"{full}.weight")
            if t is None:
                raise LowbitError(f"format {w.format}: layer {full} has no tensor in the GGUF plan of this model")
            if config.is_ignored(full):
                continue
            if t.name in FLOAT_TYPES:
                ignore.append(full)
                continue
            user = next((f for p, f in config.overrides.items() if _match(p, full)), {})
            overrides[full] = {"format": t.name, **user}
            fallbacks[t.name] = fallbacks.get(t.name, 0) + 1
    log.info("format %s: %s", w.format, ", ".join(f"{n} {t}" for t, n in sorted(fallbacks.items(), key=lambda kv: -kv[1])))
    # exact names first; the user's patterns stay for any other layer they match
    merged = {**overrides, **{p: f for p, f in config.overrides.items() if p not in overrides}}
    return dataclasses.replace(config, overrides=merged, ignore=tuple(ignore))


def plan_summary(config: QuantConfig) -> dict[str, int]:
    """{GGML type: number of layers} of a resolved plan."""
    counts: dict[str, int] = {}
    for fields in config.overrides.values():
        t = fields.get("format")
        if t is not None:
            counts[t] = counts.get(t, 0) + 1
    return counts
