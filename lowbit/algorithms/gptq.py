"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", 2022).

Observe: the Hessian of the layer-wise squared error, H = 2/N * sum x x^T over the N
calibration tokens of the layer's input. Solve: quantize the weight one input column at a
time and spread each column's rounding error over the columns not yet quantized, weighted
by the inverse Hessian, so the layer's output on the calibration inputs moves as little as
possible. The paper's three tricks are here: a fixed column order shared by all rows, lazy
batch updates over blocks of ``block_size`` columns, and the Cholesky form of the inverse
Hessian (with damping, raised automatically when the factorization fails).

Options (``--option key=value``): damp_percent (0.01), block_size (128), act_order (the
"desc_act" order: columns by decreasing Hessian diagonal; on by default), static_groups
(group scales from the original weights, fixed before the first update, so act-order
keeps a trivial g_idx; off by default). With static_groups off, each group's scale comes
from the error-updated weights when the solve reaches the group, as in the reference code,
and groups run along the solve order.
Layers that share an input (q/k/v, gate/up) share one Hessian and are solved as one
stacked matrix: GPTQ treats rows independently, so this is exact and cheaper.
"""

from __future__ import annotations

import dataclasses

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import WeightSpec
from ..errors import LowbitError
from ..formats.integer import torch_dtype
from ..formats.weights import QuantizedWeight, default_g_idx, grid_of, qparams_for, quantize_weight
from .base import Algorithm, option, register

log = logging.getLogger(__name__)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class Hessian:
    """Running H = 2/N * X^T X over the inputs seen (float32, as the reference does).

    Only block rows on and above the diagonal are accumulated (H is symmetric): with four
    block rows that is 10/16 of the full product's work, and the result is exactly
    symmetric. ``H`` mirrors the upper triangle on first read."""

    BLOCKS = 4

    def __init__(self, n_in: int):
        self._upper = torch.zeros(n_in, n_in)
        self._full: torch.Tensor | None = None
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        if m == 0:
            return
        self._full = None
        self._upper.mul_(self.n / (self.n + m))
        self.n += m
        x = x * math.sqrt(2.0 / self.n)
        n = x.shape[1]
        b = -(-n // self.BLOCKS)
        for i in range(0, n, b):
            self._upper[i : i + b, i:].addmm_(x[:, i : i + b].t(), x[:, i:])

    @property
    def H(self) -> torch.Tensor:
        if self._full is None:
            self._full = torch.triu(self._upper) + torch.triu(self._upper, 1).t()
        return self._full


def inverse_hessian_cholesky(H: torch.Tensor, damp_percent: float, name: str = "layer") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*I)^-1, with damp = damp_percent * mean(diag H).

    Factorized in float32 as the reference does, retried in float64 when that fails; when
    H + damp*I is still not positive definite (too few tokens, duplicated inputs), damping
    is raised tenfold, up to six times, each time with a logged note.
    """
    if not torch.isfinite(H).all():
        raise LowbitError(f"layer {name}: the Hessian has NaN/inf entries (non-finite calibration activations)")
    mean_diag = float(torch.diagonal(H).double().mean())
    damp = damp_percent * (mean_diag if mean_diag > 0 else 1.0)
    for attempt in range(7):
        for dtype in (torch.float32, torch.float64):
            Hd = H.to(dtype) + damp * torch.eye(H.shape[0], dtype=dtype)
            L, info = torch.linalg.cholesky_ex(Hd)
            if int(info) == 0:
                U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
                if int(info) == 0 and torch.isfinite(U).all():
                    return U.float(), damp
        if attempt < 6:
            log.info("layer %s: Hessian not positive definite with damping %.3g; raising it tenfold", name, damp)
            damp *= 10
    raise LowbitError(f"layer {name}: Hessian not positive definite even with damping {damp:.3g}")


@dataclass
class GPTQResult:
    qweight: QuantizedWeight
    loss: torch.Tensor  # per row: sum over columns of (w - q)^2 / (2 * Hinv_jj^2), GPTQ's proxy
    damp: float
    dead: int = 0  # input columns whose Hessian row was zero (set to weight 0)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: WeightSpec,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    name: str = "layer",
) -> GPTQResult:
    """Quantize W [out, in] with GPTQ under the Hessian H [in, in]. Pure function."""
    W = W.detach().float().clone()
    n_rows, n = W.shape
    if H.shape != (n, n):
        raise LowbitError(f"layer {name}: Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    H = H.clone()
    dead = torch.diagonal(H) == 0  # inputs that are always zero: their weights never matter
    H[dead, dead] = 1
    W[:, dead] = 0
    grid = grid_of(spec)
    sdtype = torch_dtype(spec.scale_dtype)
    gs = spec.group_size or n
    n_groups = math.ceil(n / gs)
    natural_g = default_g_idx(n, spec.group_size)

    if static_groups:
        fixed_scale, fixed_zero = qparams_for(W, spec, natural_g, n_groups)
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp = inverse_hessian_cholesky(H, damp_percent, name)

    scale = torch.ones(n_rows, n_groups, dtype=sdtype)
    zero = torch.zeros(n_rows, n_groups)
    codes = torch.empty(n, n_rows)  # transposed: column j of W is row j, contiguous
    losses = torch.zeros(n_rows)
    Wt = W.t().contiguous()
    s = z = None
    with single_thread():  # ~10 small ops per column: thread hand-offs cost more than they save
        for i1 in range(0, n, block_size):
            i2 = min(i1 + block_size, n)
            W1 = Wt[i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diagonal(Hinv1).tolist()  # python floats: no 0-d tensor per column
            for i in range(i2 - i1):
                col = i1 + i
                if static_groups:
                    g = int(natural_g[perm[col]] if perm is not None else natural_g[col])
                    s, z = fixed_scale[:, g].float(), fixed_zero[:, g]
                elif col % gs == 0:
                    # group parameters from the current (already error-updated) weights
                    g = col // gs
                    cur = torch.cat([W1[i:], Wt[i2:]])[:gs].t()
                    sc, zc = qparams_for(cur, spec, torch.zeros(cur.shape[1], dtype=torch.int32), 1)
                    scale[:, g], zero[:, g] = sc[:, 0], zc[:, 0]
                    s, z = sc[:, 0].float(), zc[:, 0]
                # q = clamp(round(w / s) + z), err = (w - (q - z) * s) / Hinv_ii, in place:
                # the same arithmetic as quantize()/dequantize(), without allocations.
                w, q, err = W1[i], codes[col], Err1[i]
                torch.div(w, s, out=q).round_().add_(z).clamp_(grid.qmin, grid.qmax)
                torch.sub(q, z, out=err).mul_(s)
                torch.sub(w, err, out=err).div_(d[i])
                W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
            losses += Err1.pow(2).sum(0) / 2
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)
    codes = codes.t()

    if static_groups:
        scale, zero = fixed_scale, fixed_zero
        g_idx = natural_g.clone()
    else:
        g_idx = (torch.arange(n) // gs).to(torch.int32)  # groups run along the solve order
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if not static_groups:
            g_idx = g_idx[inv]
    qw = QuantizedWeight(
        codes=codes.to(torch.uint8),
        scale=scale.to(sdtype),
        zero=None if spec.symmetric else zero.to(torch.uint8),
        g_idx=g_idx.to(torch.int32),
        grid=grid,
        group_size=spec.group_size,
    )
    return GPTQResult(qw, losses, damp, int(dead.sum()))


def output_errors(W: torch.Tensor, W_hats: list[torch.Tensor], H: torch.Tensor) -> list[float]:
    """Relative error of the layer output on the calibration inputs, from the Hessian, for
    each W_hat: ||X (W - W_hat)^T|| / ||X W^T|| = sqrt(tr(D H D^T) / tr(W H W^T)),
    D = W - W_hat. One stacked matmul for all of them (at the calibration precision: a
    report figure, where bf16 inputs move the third digit at most)."""
    W = W.float()
    n = W.shape[0]
    D = torch.cat([W] + [W - Wh.float() for Wh in W_hats])
    quad = ((D @ H.float()) * D).sum(1).double()  # per-row quadratic forms
    den = float(quad[:n].sum())
    out = []
    for k in range(len(W_hats)):
        num = float(quad[n * (k + 1) : n * (k + 2)].sum())
        out.append(math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0)
    return out


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    return output_errors(W, [W_hat], H)[0]


@dataclass(frozen=True)
class GPTQOptions:
    """Defaults: act-order with groups along the solve order. Measured on SmolLM2-135M
    W4 g64 asym (perplexity; RTN 30.09, fp32 23.49), float32 calibration: plain GPTQ 32.5
    (worse than RTN, as llm-compressor's GPTQ without act-order is there), act-order with
    static groups 29.5, act-order with groups along the solve order 28.6 (29.2 with the
    default bf16 calibration matmuls). The latter stores a permuted g_idx (the GPTQ
    layout's desc_act); static_groups=true keeps g_idx trivial, which compressed-tensors
    and the fastest kernels require. At 3 bits, min-max group ranges leave most of RTN's
    loss in place (W3 g64: 68.3 against RTN's 72.5); the MSE clipping search
    (``--observer mse``) brings it to 43.9 (BENCHMARKS.md)."""

    damp_percent: float = option(0.01, "Hessian damping as a fraction of its mean diagonal, in (0, 1); raised tenfold while the Cholesky factorization fails")
    block_size: int = option(128, "columns solved per lazy batch (a positive integer); changes speed, not the result beyond rounding")
    act_order: bool = option(True, "solve columns by decreasing Hessian diagonal ('desc_act'); true/false")
    static_groups: bool = option(False, "group scales fixed from the original weights before the solve (trivial g_idx, which compressed-tensors needs); false: scales taken as the solve reaches each group, along the solve order")

    def __post_init__(self) -> None:
        if not 0 < self.damp_percent < 1:
            raise LowbitError(f"damp_percent must be in (0, 1), got {self.damp_percent}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise LowbitError(f"block_size must be a positive integer, got {self.block_size}")


class FormatSolver(Algorithm):
    """A method with its own Hessian-driven solve on a format of its own (BiLLM, CLAQ):
    collects H per layer, checks the layer's format, hands both to ``solve_format``."""

    label: ClassVar[str] = ""  # the method's name in messages
    format_class: ClassVar[type] = object
    format_hint: ClassVar[str] = ""  # e.g. "binarizes into the billm format ... (use --format billm)"

    def uses_calibration(self) -> bool:
        return True

    def new_stats(self, name: str, module: nn.Module) -> Hessian:
        return Hessian(module.in_features)

    def solve(self, name: str, module: nn.Module, spec: WeightSpec, stats: Any):
        from ..formats.names import format_of

        if stats is None or stats.n == 0:
            raise LowbitError(f"layer {name}: {self.label} needs calibration inputs, and this layer saw none")
        fmt = format_of(spec)
        if not isinstance(fmt, self.format_class):
            raise LowbitError(f"layer {name}: {self.label} {self.format_hint.format(spec.describe())}")
        return self.solve_format(name, module, fmt, stats)

    def solve_format(self, name: str, module: nn.Module, fmt, stats: Any):
        raise NotImplementedError


@register
class GPTQ(Algorithm):
    name = "gptq"
    summary = "GPTQ: Hessian-weighted column-by-column rounding with error feedback (act-order, static groups, damping)"
    Options = GPTQOptions
    defaults_source = "asymmetric weights, act-order, damping 0.01, lazy batches of 128: the reference code's (IST-DASLab/gptq) defaults"

    def __init__(self, config):
        super().__init__(config)
        self._extra: dict[int, tuple] = {}  # id(module) -> (GPTQ loss, damping) for its report row

    def uses_calibration(self) -> bool:
        return True

    def fit_importance(self) -> bool:
        return True

    def new_stats(self, name: str, module: nn.Module) -> Hessian:
        return Hessian(module.in_features)

    def solve(self, name: str, module: nn.Module, spec: WeightSpec, stats: Any) -> QuantizedWeight:
        return self.solve_many([name], [module], [spec], stats)[0]

    def solve_many(self, names, modules, specs, stats) -> list[QuantizedWeight]:
        if stats is None or stats.n == 0:
            raise LowbitError(f"layer {names[0]}: GPTQ needs calibration inputs, and this layer saw none")
        o = self.options
        if specs[0].in_family:
            return self._solve_format(names, modules, specs, stats)
        if all(sp == specs[0] for sp in specs):  # one stacked solve: rows are independent
            W = torch.cat([m.weight.detach().float() for m in modules])
            res = gptq_quantize(W, stats.H, specs[0], o.damp_percent, o.block_size, o.act_order, o.static_groups, names[0])
            out, row = [], 0
            for m in modules:
                k = m.weight.shape[0]
                q = res.qweight
                out.append(QuantizedWeight(q.codes[row : row + k], q.scale[row : row + k], None if q.zero is None else q.zero[row : row + k], q.g_idx, q.grid, q.group_size))
                self._extra[id(m)] = (float(res.loss[row : row + k].sum()), res.damp, res.dead)
                row += k
            return out
        return [self.solve_many([n], [m], [sp], stats)[0] for n, m, sp in zip(names, modules, specs)]

    def _solve_format(self, names, modules, specs, stats) -> list:
        """GPTQ on a format of the family (algorithms.gptq_format). Layers sharing the input
        are stacked when their formats agree and need no whole-matrix step (NF4's double
        quantization does: its nested constants belong to one matrix)."""
        from ..formats.base import Encoded
        from ..formats.names import format_of
        from .gptq_format import gptq_format, needs_static

        o = self.options
        share = specs[0].outliers
        fmt = format_of(dataclasses.replace(specs[0], outliers=0.0))  # the base format; outliers are the solve's
        shared = getattr(fmt, "shares_rows", False)  # one codebook for all rows: stacking would mix layers
        # outliers are a share of each matrix, and a whole-matrix step belongs to one matrix
        if len(modules) > 1 and (needs_static(fmt) or shared or share or any(sp != specs[0] for sp in specs)):
            return [self._solve_format([n], [m], [sp], stats)[0] for n, m, sp in zip(names, modules, specs)]
        W = torch.cat([m.weight.detach().float() for m in modules])
        res = gptq_format(W, stats.H, fmt, o.damp_percent, o.block_size, o.act_order, o.static_groups, names[0], outliers=share)
        out, row = [], 0
        for m in modules:
            k = m.weight.shape[0]
            e = res.enc
            out.append(e if len(modules) == 1 else Encoded(fmt, e.codes[row : row + k], {n: v[row : row + k] for n, v in e.params.items()}, e.g_idx, e.extra))
            self._extra[id(m)] = (float(res.loss[row : row + k].sum()), res.damp, res.dead)
            row += k
        return out

    def layer_record(self, name: str, module: nn.Module, qweight: QuantizedWeight, stats: Any) -> dict:
        W = module.weight.detach().float()
        spec = self.config.weight_spec_for(name)
        if spec.in_family:
            from ..formats.base import quantize_matrix
            from ..formats.names import format_of

            rtn = quantize_matrix(format_of(spec), W, name=name).dequantize()
        else:
            rtn = quantize_weight(W, spec, name=name).dequantize()
        loss, damp, dead = self._extra.pop(id(module), (None, None, None))
        err, rtn_err = output_errors(W, [qweight.dequantize(), rtn], stats.H)
        row = {
            "output_rel_error": err,
            "rtn_output_rel_error": rtn_err,
            "gptq_loss": loss,
            "damp": damp,
            "dead_inputs": dead,
        }
        log.debug("%s: output error %.4f (RTN %.4f)", name, row["output_rel_error"], row["rtn_output_rel_error"])
        return row
