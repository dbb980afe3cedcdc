"""lowbit: make large language models small, and measure what it cost.

One data path: load model -> calibration data -> block-wise runner -> per-layer
algorithms -> quantized model -> evaluation -> checkpoint / exporters.
"""

from .api import QuantReport, evaluate_model, load, prepare_windows, quantize, reference_for, save
from .algorithms import REGISTRY, make_algorithm, method_config
from .calibration.data import Protocol
from .config import ActSpec, QuantConfig, WeightSpec
from .errors import LowbitError
from .evaluation.metrics import EvalResult, Reference, evaluate
from .export.checkpoint import load_checkpoint, save_checkpoint

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "ActSpec",
    "EvalResult",
    "LowbitError",
    "Protocol",
    "QuantConfig",
    "QuantReport",
    "Reference",
    "WeightSpec",
    "evaluate",
    "evaluate_model",
    "load",
    "load_checkpoint",
    "make_algorithm",
    "method_config",
    "prepare_windows",
    "quantize",
    "reference_for",
    "save",
    "save_checkpoint",
]
