"""Per-channel scalings folded into a block, shared by AWQ and SmoothQuant.

For a Linear reading x, ``W x = (W diag(s)) (x / s)`` for any positive s: the weight's
input column j is multiplied by s_j and the previous operation's output channel j divided
by s_j, so the block computes the same function in exact arithmetic (float rounding
apart) while the quantizers see different ranges. The previous operation is

- a norm, y = n(x) * (w + c) + b (c = 0 for Llama's RMSNorm and LayerNorm, c = 1 for
  Gemma's "1 + weight" RMSNorm; found by probing, not by class name): w <- (w + c)/s - c
  and b <- b / s;
- a Linear whose output channels are the input channels (up_proj for down_proj, v_proj
  for o_proj without grouped-query attention): its rows and bias are divided by s.

Which pairs exist is ``lowbit.models.arch.scaling_pairs``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LowbitError
from ..models.arch import is_linear
from ..runner import BlockContext, float32_matmul_precision

log = logging.getLogger(__name__)
# relative change of a block's output that a fold may cause (float32 rounding is ~1e-6)
FOLD_TOLERANCE = 1e-3


def norm_offset(norm: nn.Module, name: str = "norm") -> float:
    """c in y = n(x) * (weight + c) + bias, found by running the norm with weight 0 and 1
    on a fixed probe; raises if the norm is not of that form (then it cannot absorb s)."""
    w = norm.weight
    b = getattr(norm, "bias", None)
    probe = torch.randn(4, w.shape[0], generator=torch.Generator().manual_seed(0), dtype=w.dtype)
    saved = w.detach().clone()
    with torch.no_grad():
        try:
            y_w = norm(probe).float()
            w.zero_()
            y0 = norm(probe).float()
            w.fill_(1.0)
            y1 = norm(probe).float()
            w.fill_(2.0)
            y2 = norm(probe).float()
        finally:
            w.copy_(saved)
    bias = 0.0 if b is None else b.detach().float()
    n = y1 - y0  # the normalized input n(x)
    big = n.abs() > 1e-3 * n.abs().max()
    if not bool(big.any()):
        raise LowbitError(f"cannot fold scales into {name}: its output does not depend on its weight")
    c = float(((y0 - bias)[big] / n[big]).median())
    c = round(c) if abs(c - round(c)) < 1e-4 else c
    for weight, y in ((saved.float(), y_w), (2.0, y2)):
        if not torch.allclose(n * (weight + c) + bias, y, rtol=1e-4, atol=1e-5 * float(y.abs().max())):
            raise LowbitError(f"cannot fold scales into {name}: its output is not (weight + c) * normalized input")
    return float(c)


@torch.no_grad()
def fold_scales(block: nn.Module, prev: str, linears: list[str], s: torch.Tensor, prefix: str = "") -> None:
    """Divide the output channels of ``prev`` by s and multiply the input columns of each
    of ``linears`` by s, in place (see the module doc); s > 0, one entry per channel."""
    s = s.detach().float()
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise LowbitError(f"{prefix}{prev}: scales must be positive and finite")
    p = block.get_submodule(prev)
    if is_linear(p):
        p.weight.div_(s.to(p.weight.dtype).unsqueeze(1))
    else:
        c = norm_offset(p, prefix + prev)
        p.weight.copy_(((p.weight.float() + c) / s - c).to(p.weight.dtype))
    bias = getattr(p, "bias", None)
    if bias is not None:
        bias.div_(s.to(bias.dtype))
    for name in linears:
        lin = block.get_submodule(name)
        lin.weight.mul_(s.to(lin.weight.dtype))


def spread_windows(n: int, k: int) -> torch.Tensor | None:
    """Indices of k of n calibration windows spread evenly over them (None: all, k = 0 or k >= n)."""
    if k == 0 or k >= n:
        return None
    return torch.linspace(0, n - 1, k).round().long()


def capture(ctx: BlockContext, names: list[str], fn, windows: torch.Tensor | None = None) -> None:
    """One forward of the block with ``fn(name, x)`` called on the input x [tokens, in] of
    each named Linear (the layers keep their inputs unchanged), on the calibration windows
    of index ``windows`` (default: all; every window shares the block's other inputs, as the
    runner's equal-length windows do). Inputs with NaN/inf are a LowbitError naming the layer."""

    def make(name: str):
        def hook(_mod, args):
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1])
            if not bool(torch.isfinite(flat).all()):
                raise LowbitError(f"layer {ctx.full_name(name)}: its calibration inputs have NaN/inf values")
            fn(name, flat)

        return hook

    hidden = None if windows is None else ctx.inputs.hidden[windows]
    ctx.forward_with_hooks({n: make(n) for n in names}, hidden)



@dataclass
class FoldCheck:
    ok: bool = True
    rel_change: float = 0.0


def full_precision():
    """Exact float32 matmuls for the searches, whatever the calibration precision."""
    return float32_matmul_precision("highest")


@contextlib.contextmanager
def checked_folding(ctx: BlockContext, what: str) -> Iterator[FoldCheck]:
    """Fold scales inside the with-block; afterwards the block's float output on one
    calibration window must be unchanged (within FOLD_TOLERANCE). If it is not (a block
    whose names promise a structure it does not have), every change is undone, a warning
    logged and ``check.ok`` set to False."""
    saved = {k: v.detach().clone() for k, v in ctx.block.state_dict().items()}
    probe = ctx.inputs.hidden[:1]
    with full_precision():
        before = ctx.forward(probe)
    check = FoldCheck()
    yield check
    with full_precision():
        after = ctx.forward(probe)
    denom = float(before.norm())
    check.rel_change = float((after - before).norm()) / denom if denom > 0 else float((after - before).norm())
    if not check.rel_change <= FOLD_TOLERANCE:  # (NaN included)
        ctx.block.load_state_dict(saved)
        check.ok = False
        log.warning("%s: %s changed the block's output by %.2g (relative); undone, block left unscaled", ctx.prefix, what, check.rel_change)
