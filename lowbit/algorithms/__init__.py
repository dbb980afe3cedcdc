"""Quantization algorithms. Each is one module that registers itself in ``base.REGISTRY``;
adding a method means adding a module here and naming it in ``_MODULES``."""

from __future__ import annotations

import importlib

from .base import REGISTRY, Algorithm, algorithm_class, describe_options, make_algorithm, method_config, register

_MODULES = ("rtn", "gptq", "awq", "smoothquant", "llm_int8", "zeroquant", "qllm", "rotate", "billm", "slim", "claq")


def load_all() -> None:
    for m in _MODULES:
        importlib.import_module(f"{__name__}.{m}")


__all__ = ["REGISTRY", "Algorithm", "algorithm_class", "describe_options", "load_all", "make_algorithm", "method_config", "register"]
