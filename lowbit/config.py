"""Quantization configs: small frozen dataclasses that say *what* to do, validated on creation.

A ``QuantConfig`` names a method (looked up in the algorithm registry), the weight format,
optionally an activation format, and per-layer overrides by name pattern. It round-trips
through a plain dict (``to_dict``/``from_dict``) so it can be stored next to a checkpoint.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import LowbitError

CONFIG_VERSION = 1
SCALE_DTYPES = ("float16", "bfloat16", "float32")
WEIGHT_OBSERVERS = ("minmax", "mse")
ACT_OBSERVERS = ("minmax", "percentile", "mse", "kl")
# fp32: calibration matmuls in float32. bf16: their inputs rounded to bfloat16, products
# accumulated and returned in float32 (oneDNN's reduced-precision float32 matmul), 2-4x
# faster. auto: bf16 where the CPU has native bfloat16, else fp32; a quantized model's
# stored config records which one ran.
CALIB_PRECISIONS = ("auto", "fp32", "bf16")


BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
NONE_WORDS = ("none",)


def _parse_one(value: Any, kind: type, what: str) -> Any:
    """``value`` as a ``kind`` (bool, int, float or str): strings are parsed, other values
    checked. Booleans accept exactly true/false/yes/no/1/0; ints refuse 2.5 and True."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
            return BOOL_WORDS[value.strip().lower()]
        raise LowbitError(f"{what} must be true or false (also yes/no, 1/0), got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise LowbitError(f"{what} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                v = float(value.strip())
            except ValueError:
                v = None
            if v is not None and math.isfinite(v):
                return v
        raise LowbitError(f"{what} must be a finite number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise LowbitError(f"{what} must be a string, got {value!r}")
    raise TypeError(f"unsupported field type {kind!r}")


def parse_field(value: Any, annotation: Any, what: str) -> Any:
    """``value`` converted to a dataclass field's declared type (``int``, ``float``,
    ``bool``, ``str``, or one of them ``| None``); a one-line error naming ``what``."""
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
            return None
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) != 1:
            raise TypeError(f"unsupported field type {annotation!r}")
        annotation = kinds[0]
    try:
        return _parse_one(value, annotation, what)
    except LowbitError as e:
        if optional:
            raise LowbitError(f"{e} (or none)") from None
        raise


def parse_fields(cls: type, values: dict[str, Any], what: str) -> dict[str, Any]:
    """``values`` (strings from a command line, or already typed) converted to the field
    types of dataclass ``cls``; unknown keys are an error listing the valid ones."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise LowbitError(f"{what} has no field {', '.join(unknown)} (valid: {', '.join(valid) or 'none'})")
    return {k: parse_field(v, hints[k], f"{what} {k}") for k, v in values.items()}


def check_pattern(pattern: Any, what: str) -> None:
    """A layer-name pattern: fnmatch, or 're:REGEX' whose regular expression must compile."""
    if not isinstance(pattern, str) or not pattern:
        raise LowbitError(f"{what} pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise LowbitError(f"{what} pattern {pattern!r} is not a valid regular expression ({e})") from None


def _check_bits(bits: Any, what: str, lo: int = 2, hi: int = 8) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not lo <= bits <= hi:
        raise LowbitError(f"{what} must be an integer from {lo} to {hi}, got {bits!r}")


@dataclass(frozen=True)
class WeightSpec:
    """Integer weight format: ``bits`` per code, one scale (and zero) per group of inputs.

    group_size=None means one group per output channel (per-channel quantization).
    symmetric with restricted=False uses all 2**bits codes, scale = 2*absmax/(2**bits - 1)
    (the convention GPTQ and compressed-tensors share); restricted=True drops the most
    negative code so the grid is symmetric around zero: scale = absmax/(2**(bits-1) - 1).
    A group size that does not divide a layer's input width leaves the last group of each
    row narrower (GPTQ-style g_idx handles it); strict_groups=True makes that an error.
    """

    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = True
    restricted: bool = False
    observer: str = "minmax"
    scale_dtype: str = "float16"
    strict_groups: bool = False
    # "int": the affine integer grid the fields above describe; any other name is a format
    # of the family (lowbit.formats.names: nf4, nf4-dq, fp4, bcq3, ternary, codebook4, ...)
    # with group_size as its group (NF4's block) and scale_dtype for its scales
    format: str = "int"
    # share of each matrix's weights kept as exact float16 outliers (row, column, value) on
    # top of the format (formats.outliers); 0: none. RTN, AWQ and GPTQ (chosen by w^2·diag(H)).
    outliers: float = 0.0

    def __post_init__(self) -> None:
        _check_bits(self.bits, "weight bits")
        o = self.outliers
        if isinstance(o, bool) or not isinstance(o, (int, float)) or not 0 <= o < 0.5:
            raise LowbitError(f"outlier share must be a number in [0, 0.5), got {o!r}")
        if self.format != "int":
            from .formats.names import check_format_name

            check_format_name(self.format)
        gs = self.group_size
        if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0):
            raise LowbitError(f"group size must be a positive integer or None (per-channel), got {gs!r}")
        if self.observer not in WEIGHT_OBSERVERS:
            raise LowbitError(f"weight observer must be one of {', '.join(WEIGHT_OBSERVERS)}, got {self.observer!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"scale dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.restricted and not self.symmetric:
            raise LowbitError("restricted range applies to symmetric quantization only")

    @property
    def in_family(self) -> bool:
        """Stored through lowbit.formats.base (any format but the plain affine grid)."""
        return self.format != "int" or bool(self.outliers)

    def describe(self) -> str:
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        from .formats.names import is_ggml, is_mixture

        if is_ggml(self.format) or is_mixture(self.format):
            return self.format  # the GGML block defines the group
        if self.in_family:
            name = self.format if self.format != "int" else f"int{self.bits} {'sym' if self.symmetric else 'asym'}"
            return f"{name} {g}" + (f" +{100 * self.outliers:g}% fp16 outliers" if self.outliers else "")
        kind = ("sym-restricted" if self.restricted else "sym") if self.symmetric else "asym"
        return f"W{self.bits} {g} {kind}"


@dataclass(frozen=True)
class ActSpec:
    """Integer activation format for the input of each quantized Linear.

    dynamic=True computes the range from each input at run time: per token (optionally per
    group of ``group_size`` channels within a token, as DeepSeek-V3's 1x128 blocks) or per
    tensor. dynamic=False uses one range per tensor fixed from calibration data by
    ``observer``. Asymmetric is the default: measured on SmolLM2-135M, 8-bit per-token
    activations cost +1.0% perplexity asymmetric and +2.8% symmetric, because a token's
    outlier channels are mostly one-sided (see BENCHMARKS.md).

    outlier_threshold (LLM.int8()'s mixed-precision decomposition, dynamic per-token only):
    the input columns in which any |x| exceeds it are decided per input at run time,
    multiplied in floating point and added back; the rest are quantized. None: off.
    """

    bits: int = 8
    dynamic: bool = True
    granularity: str = "token"
    symmetric: bool = False
    group_size: int | None = None
    observer: str = "minmax"
    percentile: float = 99.99
    outlier_threshold: float | None = None

    def __post_init__(self) -> None:
        _check_bits(self.bits, "activation bits")
        if self.granularity not in ("token", "tensor"):
            raise LowbitError(f"activation granularity must be 'token' or 'tensor', got {self.granularity!r}")
        if not self.dynamic and self.granularity != "tensor":
            raise LowbitError("static activation quantization is per-tensor: use granularity='tensor'")
        gs = self.group_size
        if gs is not None:
            if not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0:
                raise LowbitError(f"activation group size must be a positive integer or None, got {gs!r}")
            if self.granularity != "token":
                raise LowbitError("activation groups apply to per-token quantization only")
        if self.observer not in ACT_OBSERVERS:
            raise LowbitError(f"activation observer must be one of {', '.join(ACT_OBSERVERS)}, got {self.observer!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise LowbitError(f"percentile must be in (50, 100], got {self.percentile!r}")
        t = self.outlier_threshold
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise LowbitError(f"outlier threshold must be a positive number or None, got {t!r}")
            if not self.dynamic or self.granularity != "token" or self.group_size is not None:
                raise LowbitError("the outlier threshold (LLM.int8() decomposition) needs dynamic per-token activations without groups")

    def describe(self) -> str:
        mode = "dynamic" if self.dynamic else f"static({self.observer})"
        gran = f"per-token-g{self.group_size}" if self.group_size else f"per-{self.granularity}"
        out = f" outliers>{self.outlier_threshold:g} in float" if self.outlier_threshold is not None else ""
        return f"A{self.bits} {mode} {gran} {'sym' if self.symmetric else 'asym'}{out}"


def _match(pattern: str, name: str) -> bool:
    """fnmatch-style pattern, or a regular expression when it starts with 're:'."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how: the single argument of ``lowbit.quantize``.

    ignore: name patterns of Linear layers (inside decoder blocks) left in full precision.
    overrides: name pattern -> dict of WeightSpec fields that replace the defaults for
    matching layers (first matching pattern wins), e.g. {"*.down_proj": {"bits": 8}}.
    options: method-specific settings, validated by the method's own Options dataclass.
    """

    method: str = "rtn"
    weight: WeightSpec | None = field(default_factory=WeightSpec)
    act: ActSpec | None = None
    ignore: tuple[str, ...] = ()
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    calib_precision: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ignore", tuple(self.ignore))
        for pattern in self.ignore:
            check_pattern(pattern, "ignore")
        if self.calib_precision not in CALIB_PRECISIONS:
            raise LowbitError(f"calibration precision must be one of {', '.join(CALIB_PRECISIONS)}, got {self.calib_precision!r}")
        if self.weight is None and self.act is None:
            raise LowbitError("nothing to quantize: give a weight format, an activation format, or both")
        for pattern, fields in self.overrides.items():
            check_pattern(pattern, "override")
            if not isinstance(fields, dict):
                raise LowbitError(f"override {pattern!r} must map to a dict of weight fields")
        # values from a command line arrive as strings: typed once, here
        typed = {p: parse_fields(WeightSpec, f, f"override {p!r}") for p, f in self.overrides.items()}
        object.__setattr__(self, "overrides", typed)
        if self.weight is not None:
            for fields in typed.values():
                dataclasses.replace(self.weight, **fields)  # validates eagerly

    def weight_spec_for(self, name: str) -> WeightSpec | None:
        """The weight format of the layer called ``name``; None leaves it unquantized."""
        if any(_match(p, name) for p in self.ignore) or self.weight is None:
            return None
        for pattern, fields in self.overrides.items():
            if _match(pattern, name):
                return dataclasses.replace(self.weight, **fields)
        return self.weight

    def is_ignored(self, name: str) -> bool:
        return any(_match(p, name) for p in self.ignore)

    def describe(self) -> str:
        parts = [self.method]
        if self.weight is not None:
            parts.append(self.weight.describe())
        if self.act is not None:
            parts.append(self.act.describe())
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CONFIG_VERSION,
            "method": self.method,
            "weight": None if self.weight is None else dataclasses.asdict(self.weight),
            "act": None if self.act is None else dataclasses.asdict(self.act),
            "ignore": list(self.ignore),
            "overrides": dict(self.overrides),
            "options": dict(self.options),
            "seed": self.seed,
            "calib_precision": self.calib_precision,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        version = d.get("version")
        if version != CONFIG_VERSION:
            raise LowbitError(f"quantization config version {version!r} is not supported (expected {CONFIG_VERSION})")
        try:
            return cls(
                method=d["method"],
                weight=None if d.get("weight") is None else WeightSpec(**d["weight"]),
                act=None if d.get("act") is None else ActSpec(**d["act"]),
                ignore=tuple(d.get("ignore", ())),
                overrides=dict(d.get("overrides", {})),
                options=dict(d.get("options", {})),
                seed=int(d.get("seed", 0)),
                calib_precision=d.get("calib_precision", "auto"),
            )
        except (KeyError, TypeError) as e:
            raise LowbitError(f"malformed quantization config: {e}") from None
