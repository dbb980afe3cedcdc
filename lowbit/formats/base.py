"""One interface for every weight format, and the registry of them.

For every format a group of weights has a finite set of representable values, chosen by
the group's parameters: affine integers (q - z)·s, NF4 absmax·table, binary codes the 2^k
sums of ±alpha_i, ternary alpha·{-1, 0, 1}, a learned codebook its centroids. A format is
a small object that knows five things:

    fit(wg, mask, importance) -> params   choose each group's parameters
    encode(wg, params)        -> codes    nearest representable value (uint8 code per weight)
    decode(codes, params)     -> values   the value each code stands for (exact)
    pack(enc) / unpack(...)               bytes in the checkpoint and back (bit-exact)
    nbytes(enc)                           exact storage, from the packed tensors themselves

Shapes: ``wg`` is a weight matrix laid out by group, [rows, n_groups, width] (ragged or
permuted groups zero-padded, ``mask`` [n_groups, width] marking real entries, None when
none are padded); every parameter tensor is [rows, n_groups, ...]. GPTQ's column loop calls
``fit`` on one group ([rows, 1, width]) when its solve reaches the group and ``encode`` /
``decode`` on one column ([rows, 1, 1]) at a time; RTN calls them on the whole matrix
(``quantize_matrix``). ``importance`` [n_groups, width] (e.g. the Hessian diagonal) weighs
the fit where a format uses it.

Formats register by name (``register``); ``make_format("nf4", group_size=64)`` builds one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import LowbitError

REGISTRY: dict[str, type[WeightFormat]] = {}


def register(cls: type[WeightFormat]) -> type[WeightFormat]:
    if cls.kind in REGISTRY:
        raise ValueError(f"format {cls.kind} registered twice")
    REGISTRY[cls.kind] = cls
    return cls


def load_all() -> None:
    from . import affine, bcq, billm, bitnet, claq, codebook, ggml, mixed, normal_float, ternary  # noqa: F401  (importing registers them)


def make_format(kind: str, **fields: Any) -> WeightFormat:
    load_all()
    if kind not in REGISTRY:
        raise LowbitError(f"unknown weight format {kind!r}; available: {', '.join(sorted(REGISTRY))}")
    try:
        return REGISTRY[kind](**fields)
    except TypeError as e:
        raise LowbitError(f"format {kind}: {e}") from None


@dataclass
class Encoded:
    """One weight matrix in a format: codes, group parameters, and the column-to-group map."""

    fmt: WeightFormat
    codes: torch.Tensor  # [rows, cols] uint8
    params: dict[str, torch.Tensor]  # each [rows, n_groups, ...]
    g_idx: torch.Tensor  # [cols] int32
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # format-wide tensors (e.g. NF4's nested constants)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        return self.fmt.decode_matrix(self)


class WeightFormat:
    """Base class: subclasses set ``kind`` and implement fit / encode / decode / pack."""

    kind: ClassVar[str] = ""
    static_params: ClassVar[bool] = False  # True: parameters need the whole matrix (GPTQ fixes them up front)
    # parameters that scale the represented values linearly (QAT's learned scales multiply them)
    scale_keys: ClassVar[tuple[str, ...]] = ()
    group_size: int | None = 64

    def affine(self, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(scale, zero, bits) when every value of ``enc`` is (code - zero) * scale per (row,
        group), scale and zero float32 [rows, n_groups], codes below 2**bits; None when the
        levels are not affine in the code. Kernels for integer grids run such weights."""
        return None

    # --- per-group math: subclasses ---------------------------------------------------

    def fit(self, wg: torch.Tensor, mask: torch.Tensor | None = None, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode(self, wg: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Default: index of the nearest of ``levels(params)`` (ties to the lower code)."""
        return nearest_level(wg, self.levels(params))

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Default: the level each code names."""
        return torch.gather(self.levels(params), 2, codes.long())  # levels [rows, groups, L]

    def levels(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """[rows, groups, L] representable values, indexed by code."""
        raise NotImplementedError

    def finish(self, enc: Encoded) -> Encoded:
        """Matrix-level step after all groups are fitted and encoded (NF4's double
        quantization of its constants); default: nothing."""
        return enc

    # --- storage: subclasses ----------------------------------------------------------

    def pack(self, enc: Encoded) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def unpack(self, tensors: dict[str, torch.Tensor], rows: int, cols: int, g_idx: torch.Tensor) -> Encoded:
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"kind": self.kind, **asdict(self)}

    # --- shared ------------------------------------------------------------------------

    def nbytes(self, enc: Encoded) -> int:
        """Exact storage: the byte counts of the packed tensors."""
        return sum(t.numel() * t.element_size() for t in self.pack(enc).values())

    def bits_per_weight(self, enc: Encoded) -> float:
        return 8.0 * self.nbytes(enc) / max(enc.codes.numel(), 1)

    def decode_matrix(self, enc: Encoded) -> torch.Tensor:
        n_groups = next(iter(enc.params.values())).shape[1]
        layout = GroupLayout(enc.g_idx, n_groups)
        return layout.scatter(self.decode(layout.gather(enc.codes), enc.params))


def group_weights(wg: torch.Tensor, mask: torch.Tensor | None, importance: torch.Tensor | None) -> torch.Tensor:
    """Per-entry weights of a fit, [1 or rows, groups, width]: the mask (1 where real) times
    the importance, when given."""
    m = torch.ones(wg.shape[1:], dtype=torch.float32) if mask is None else mask.float()
    if importance is not None:
        m = m * importance.float()
    return m.unsqueeze(0)


def nearest_level_reference(wg: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Code of the nearest level for each value: wg [R, G, W], levels [R, G, L] -> uint8.
    Ties go to the lower code (argmin returns the first minimum)."""
    d = (wg.float().unsqueeze(-1) - levels.float().unsqueeze(2)).abs()
    return torch.argmin(d, dim=-1).to(torch.uint8)


def nearest_level(wg: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``nearest_level_reference`` by binary search over each group's sorted levels: only
    the two levels around a value can be nearest, so it compares those two (the lower code
    of equal levels, and of equal distances, as argmin's first minimum) instead of all L.
    Values that are not finite go to the reference."""
    w, lv = wg.float(), levels.float()
    L = lv.shape[-1]
    if L <= 4 or w.numel() == 0 or not (torch.isfinite(w).all() and torch.isfinite(lv).all()):
        return nearest_level_reference(w, lv)
    sl, order = torch.sort(lv, dim=-1, stable=True)  # equal levels keep their code order
    sl, order = sl.contiguous(), order.contiguous()
    first = torch.searchsorted(sl, sl)  # each sorted position -> the first position of its equal run
    pos = torch.searchsorted(sl, w.contiguous())  # first level >= the value
    hi = pos.clamp(max=L - 1)
    lo = torch.gather(first, -1, (pos - 1).clamp(min=0))
    v_hi, v_lo = torch.gather(sl, -1, hi), torch.gather(sl, -1, lo)
    c_hi, c_lo = torch.gather(order, -1, hi), torch.gather(order, -1, lo)
    d_hi, d_lo = (w - v_hi).abs(), (w - v_lo).abs()
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (c_hi < c_lo))
    return torch.where(take_hi, c_hi, c_lo).to(torch.uint8)


class GroupLayout:
    """Maps a matrix [rows, cols] with its g_idx to [rows, n_groups, width] and back."""

    def __init__(self, g_idx: torch.Tensor, n_groups: int):
        g = g_idx.long()
        n = g.numel()
        counts = torch.bincount(g, minlength=n_groups)
        self.width = int(counts.max()) if n else 0
        self.n_groups = n_groups
        self.n = n
        self.trivial = n == n_groups * self.width and torch.equal(g, torch.arange(n) // max(self.width, 1))
        if not self.trivial:
            order = torch.argsort(g, stable=True)
            gs = g[order]
            start = torch.cumsum(counts, 0) - counts
            self.cols, self.gs, self.pos = order, gs, torch.arange(n) - start[gs]
        self.mask = None if self.trivial else self._mask()

    def _mask(self) -> torch.Tensor:
        m = torch.zeros(self.n_groups, self.width)
        m[self.gs, self.pos] = 1
        return m

    def gather(self, w: torch.Tensor) -> torch.Tensor:
        rows = w.shape[0]
        if self.trivial:
            return w.reshape(rows, self.n_groups, self.width)
        out = torch.zeros(rows, self.n_groups, self.width, dtype=w.dtype)
        out[:, self.gs, self.pos] = w[:, self.cols]
        return out

    def scatter(self, wg: torch.Tensor) -> torch.Tensor:
        rows = wg.shape[0]
        if self.trivial:
            return wg.reshape(rows, self.n)
        out = torch.empty(rows, self.n, dtype=wg.dtype)
        out[:, self.cols] = wg[:, self.gs, self.pos]
        return out


def default_g_idx(cols: int, group_size: int | None) -> torch.Tensor:
    c = torch.arange(cols, dtype=torch.int32)
    return torch.zeros_like(c) if group_size is None else c // group_size


def check_weight(w: torch.Tensor, name: str, fmt: WeightFormat) -> torch.Tensor:
    if w.dim() != 2:
        raise LowbitError(f"layer {name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().float()
    bad = ~torch.isfinite(w)
    if bad.any():
        raise LowbitError(f"layer {name} has {int(bad.sum())} NaN/inf weights; refusing to quantize it")
    gs = fmt.group_size
    if gs is not None and gs > w.shape[1]:
        raise LowbitError(f"group size {gs} is larger than the input width {w.shape[1]} of layer {name}")
    return w


def quantize_matrix(
    fmt: WeightFormat,
    w: torch.Tensor,
    name: str = "weight",
    g_idx: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    params: dict[str, torch.Tensor] | None = None,
) -> Encoded:
    """Round-to-nearest of w [rows, cols] in ``fmt``: fit every group, encode, finish.
    ``importance`` [cols] weighs the fit (formats that use it); ``params``: group
    parameters already chosen (AWQ's clipping search), used instead of the fit."""
    if hasattr(fmt, "quantize"):  # a wrapper with a matrix-level step (formats.outliers)
        if params is not None:
            raise ValueError(f"{fmt.describe()}: a wrapper fits its own parameters")
        return fmt.quantize(w, name, importance=importance)
    w = check_weight(w, name, fmt)
    g_idx = default_g_idx(w.shape[1], fmt.group_size) if g_idx is None else g_idx.to(torch.int32)
    n_groups = int(g_idx.max()) + 1 if g_idx.numel() else 1
    layout = GroupLayout(g_idx, n_groups)
    wg = layout.gather(w)
    imp = None if importance is None else layout.gather(importance.float().reshape(1, -1))[0]
    if params is None:
        params = fmt.fit(wg, layout.mask, imp)
    enc = fmt.finish(Encoded(fmt, torch.empty(0, dtype=torch.uint8), params, g_idx))
    codes = fmt.encode(wg, enc.params)
    enc.codes = layout.scatter(codes)
    return enc


def pack_check(tensors: dict[str, torch.Tensor], need: list[str], where: str) -> None:
    for k in need:
        if k not in tensors:
            raise LowbitError(f"{where}: no tensor {k!r}")


def check_shape(t: torch.Tensor, shape: tuple, what: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise LowbitError(f"{what} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t
