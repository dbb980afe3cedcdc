"""LLM.int8() (Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers
at Scale", 2022).

Vector-wise quantization: weights int8 per output row, activations int8 per token, both
symmetric absmax, so an outer product of the two scale vectors dequantizes the int32
result. Mixed-precision decomposition: the few input columns (feature dimensions) where
any |x| exceeds the threshold (6.0 in the paper) are taken out of the int8 product and
multiplied in floating point, then added back. Which columns is decided for each input
at run time, as in the paper; nothing is calibrated.

Stored form: a QuantLinear with W8 per-channel symmetric codes (the paper's absmax/127
grid, ``restricted``) and an ActSpec carrying ``outlier_threshold``, so a checkpoint
reloads the same computation. The reference path computes it as a fake-quantized input
(formats.activations); ``lowbit.nn.set_kernel(model, "int8")`` runs real int8 products
with the outlier columns in float32.

Config: ``--method llm-int8 --bits 8 --group-size channel --restricted`` and the option
``threshold`` (default 6.0). Without an activation format the method uses A8 dynamic
per-token symmetric; a given one must be dynamic per token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import ActSpec, WeightSpec
from ..errors import LowbitError
from ..formats.names import round_to_nearest
from ..formats.weights import QuantizedWeight
from .base import Algorithm, option, register


@dataclass(frozen=True)
class LLMInt8Options:
    threshold: float | None = option(6.0, "input columns with any |x| above it run in float (a positive number; none: plain vector-wise int8)")

    def __post_init__(self) -> None:
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
            raise LowbitError(f"threshold must be a positive number or none, got {t!r}")


def llm_int8_act(act: ActSpec | None, threshold: float | None) -> ActSpec:
    """The activation format LLM.int8() runs with: the given one (dynamic per token) or
    A8 symmetric per token, with the outlier threshold set."""
    if act is None:
        act = ActSpec(bits=8, dynamic=True, granularity="token", symmetric=True)
    if not act.dynamic or act.granularity != "token" or act.group_size is not None:
        raise LowbitError("llm-int8 quantizes activations per token at run time: the activation format must be dynamic per token, without groups")
    return dataclasses.replace(act, outlier_threshold=None if threshold is None else float(threshold))


@register
class LLMInt8(Algorithm):
    name = "llm-int8"
    summary = "LLM.int8(): vector-wise int8 weights and activations, outlier input columns (|x| > threshold) in float"
    Options = LLMInt8Options
    default_weight = {"bits": 8, "group_size": None, "symmetric": True}
    defaults_source = "int8 per weight row and per token, symmetric, outlier threshold 6.0: the paper's and bitsandbytes' settings"

    def __init__(self, config):
        super().__init__(config)
        w = config.weight
        if w.group_size is not None or not w.symmetric:
            raise LowbitError("llm-int8 quantizes weights per output row, symmetric: use --group-size channel --sym")
        # the runner and the stored config both read self.config: it carries the ActSpec
        self.config = dataclasses.replace(self.config, act=llm_int8_act(config.act, self.options.threshold))

    def solve(self, name: str, module: nn.Module, spec: WeightSpec, stats: Any) -> QuantizedWeight:
        return round_to_nearest(module.weight, spec, name=name)
