"""ZeroQuant (Yao et al., "ZeroQuant: Efficient and Affordable Post-Training Quantization
for Large-Scale Transformers", 2022).

Fine-grained, hardware-friendly quantization: weights group-wise (the config's WeightSpec,
e.g. W4 g64 or W8 g64) and activations token-wise, i.e. dynamic per token (the config's
ActSpec, which must be dynamic per token when given). On top of that, layer-by-layer
knowledge distillation (LKD): each block is trained on its own, with the unquantized block
as the teacher, to make the quantized block's output match the teacher's on calibration
inputs, one block in memory at a time and no labels.

Here, per block before the runner's quantization pass (``transform_block``):

1. teacher outputs: the float block on ``lkd_windows`` calibration windows of its inputs
   (ctx.inputs.hidden, i.e. the outputs of the already quantized blocks before it: the
   student learns to undo its predecessors' error too, where the paper feeds both the
   original model's activations);
2. the block's Linears are swapped for straight-through copies that fake-quantize the
   weight (round-to-nearest of the current float weight, min-max group scales) and the
   input exactly as the final model will, with the rounding's gradient taken as 1;
3. ``lkd_steps`` Adam steps (lr ``lkd_lr``) on the mean squared error to the teacher,
   ``lkd_batch`` windows per step, updating the float weights only;
4. if the distilled block is not better than the undistilled one on those windows, the
   weights are put back. The runner then quantizes the trained float weights.

``lkd_steps=0`` is plain group-wise weights with token-wise activations (no data needed
for dynamic activations).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ActSpec, WeightSpec
from ..errors import LowbitError
from ..formats.activations import fake_quantize_act
from ..formats.names import round_to_nearest
from ..formats.weights import QuantizedWeight
from ..nn.qlinear import set_submodule
from ..runner import BlockContext
from .base import Algorithm, option, register

log = logging.getLogger(__name__)


class STELinear(nn.Module):
    """A Linear whose forward fake-quantizes its weight and input with straight-through
    gradients (identity through the rounding); it trains ``linear.weight`` in place, or,
    with ``rank`` > 0, only a low-rank correction A @ B added to the frozen weight before
    the rounding (QLLM's low-rank tuning; A starts at zero, so the block starts unchanged)."""

    def __init__(self, linear: nn.Linear, wspec: WeightSpec | None, aspec: ActSpec | None, rank: int = 0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.linear, self.wspec, self.aspec = linear, wspec, aspec
        self.lora_a = self.lora_b = None
        if rank > 0:
            out_f, in_f = linear.weight.shape
            self.lora_a = nn.Parameter(torch.zeros(out_f, rank, dtype=linear.weight.dtype))
            b = torch.randn(rank, in_f, generator=generator, dtype=torch.float32) / math.sqrt(in_f)
            self.lora_b = nn.Parameter(b.to(linear.weight.dtype))

    def merged_weight(self) -> torch.Tensor:
        w = self.linear.weight
        return w if self.lora_a is None else w + self.lora_a @ self.lora_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aspec is not None:
            x = x + (fake_quantize_act(x.detach(), self.aspec) - x).detach()
        w = self.merged_weight()
        if self.wspec is not None:
            w = w + (round_to_nearest(w.detach(), self.wspec).dequantize().to(w.dtype) - w).detach()
        return F.linear(x, w, self.linear.bias)


def take_windows(kwargs: dict, batch: int, idx: torch.Tensor) -> dict:
    """The block's keyword inputs for windows ``idx`` of a batch of ``batch`` (tensors with
    that leading dimension are indexed; shared ones, like position embeddings, are kept)."""

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            return v[idx]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return {k: cut(v) for k, v in kwargs.items()}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LKDResult:
    rel_error_before: float  # sqrt(MSE / mean teacher^2) on the distillation windows
    rel_error_after: float
    kept: bool  # False: distillation did not help and the weights were restored


def layerwise_distill(
    block: nn.Module,
    hidden: torch.Tensor,
    kwargs: dict,
    specs: dict[str, tuple[WeightSpec | None, ActSpec | None]],
    steps: int,
    lr: float,
    batch: int = 1,
    rank: int = 0,
    teacher: torch.Tensor | None = None,
    seed: int = 0,
) -> LKDResult:
    """Train the named Linears of ``block`` so that the block with those Linears quantized
    (``specs``: name -> (weight spec, activation spec)) matches the float block's output on
    ``hidden`` [n, seq, dim] (straight-through estimator, Adam). ``rank`` 0 trains the
    float weights themselves (ZeroQuant's LKD); ``rank`` > 0 freezes them and trains a
    low-rank correction A @ B per Linear, merged into the weight at the end (QLLM's
    low-rank tuning). ``teacher``: the target outputs (default: this block in float, before
    training). In place; the weights are restored if the result is not better."""
    n = hidden.shape[0]
    linears = {name: block.get_submodule(name) for name in specs}
    trainable = [name for name, (w, _) in specs.items() if w is not None]
    if teacher is None:
        with torch.no_grad():
            teacher = torch.cat([_first(block(hidden[i : i + 1], **take_windows(kwargs, n, torch.tensor([i])))) for i in range(n)])
    scale = float(teacher.pow(2).mean())
    saved_grad = {p: p.requires_grad for p in block.parameters()}
    originals = {name: linears[name].weight.detach().clone() for name in trainable}
    gen = torch.Generator().manual_seed(seed)
    wrapped = {}
    for name, (w, a) in specs.items():
        wrapped[name] = STELinear(linears[name], w, a, rank if w is not None else 0, gen)
        set_submodule(block, name, wrapped[name])

    def rel_error() -> float:
        with torch.no_grad():
            mse = sum(float(F.mse_loss(_first(block(hidden[i : i + 1], **take_windows(kwargs, n, torch.tensor([i])))), teacher[i : i + 1], reduction="sum")) for i in range(n))
        return math.sqrt(mse / teacher.numel() / scale) if scale > 0 else 0.0

    try:
        for p in block.parameters():
            p.requires_grad_(False)
        if rank > 0:
            params = [p for name in trainable for p in (wrapped[name].lora_a, wrapped[name].lora_b)]
        else:
            params = [linears[name].weight for name in trainable]
        for p in params:
            p.requires_grad_(True)
        before = rel_error()
        opt = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for step in range(steps):
                idx = torch.arange(step * batch, (step + 1) * batch) % n
                out = _first(block(hidden[idx], **take_windows(kwargs, n, idx)))
                loss = F.mse_loss(out, teacher[idx]) / scale if scale > 0 else F.mse_loss(out, teacher[idx])
                if not torch.isfinite(loss):
                    raise LowbitError("layer-wise distillation diverged (non-finite loss); lower lkd_lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        after = rel_error()
        kept = after < before
        if kept and rank > 0:  # merge A @ B into the weights, which the runner then quantizes
            with torch.no_grad():
                for name in trainable:
                    linears[name].weight.copy_(wrapped[name].merged_weight())
        if not kept:
            with torch.no_grad():
                for name in trainable:
                    linears[name].weight.copy_(originals[name])
        return LKDResult(before, after, kept)
    finally:
        for name in specs:
            set_submodule(block, name, linears[name])
        for p, flag in saved_grad.items():
            p.requires_grad_(flag)
            p.grad = None


@dataclass(frozen=True)
class ZeroQuantOptions:
    lkd_steps: int = option(20, "Adam steps of layer-wise distillation per block (0: none)")
    lkd_lr: float = option(5e-5, "distillation learning rate, in (0, 1)")
    lkd_windows: int = option(4, "calibration windows distilled on (0: all)")
    lkd_batch: int = option(1, "windows per distillation step (a positive integer)")

    def __post_init__(self) -> None:
        for k in ("lkd_steps", "lkd_windows"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise LowbitError(f"{k} must be a non-negative integer, got {v!r}")
        if not isinstance(self.lkd_batch, int) or isinstance(self.lkd_batch, bool) or self.lkd_batch < 1:
            raise LowbitError(f"lkd_batch must be a positive integer, got {self.lkd_batch!r}")
        lr = self.lkd_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
            raise LowbitError(f"lkd_lr must be in (0, 1), got {lr!r}")


@register
class ZeroQuant(Algorithm):
    name = "zeroquant"
    summary = "ZeroQuant: group-wise weights, token-wise dynamic activations, layer-wise knowledge distillation (LKD)"
    Options = ZeroQuantOptions
    default_weight = {"bits": 8, "group_size": 64, "symmetric": True}
    default_act = {"bits": 8, "dynamic": True, "granularity": "token"}
    defaults_source = "W8 group-wise symmetric, A8 dynamic per token, layer-wise distillation: the paper's W8A8 (W4A8 with --bits 4)"

    def __init__(self, config):
        super().__init__(config)
        a = config.act
        if a is not None and (not a.dynamic or a.granularity != "token"):
            raise LowbitError("zeroquant quantizes activations token-wise: the activation format must be dynamic per token")
        self._records: dict[str, dict] = {}

    def uses_calibration(self) -> bool:
        return self.options.lkd_steps > 0 or super().uses_calibration()

    def transform_block(self, ctx: BlockContext) -> None:
        o = self.options
        if o.lkd_steps == 0 or ctx.inputs is None:
            return
        specs = self.block_specs(ctx)
        if not any(w is not None for w, _ in specs.values()):
            return
        hidden = ctx.inputs.hidden
        n = hidden.shape[0]
        k = n if o.lkd_windows == 0 else min(o.lkd_windows, n)
        idx = torch.linspace(0, n - 1, k).round().long()  # spread over the calibration set
        if not bool(torch.isfinite(hidden[idx]).all()):
            raise LowbitError(f"block {ctx.prefix}: its calibration inputs have NaN/inf values")
        res = layerwise_distill(ctx.block, hidden[idx], take_windows(ctx.inputs.kwargs, n, idx), specs, o.lkd_steps, o.lkd_lr, o.lkd_batch)
        log.debug("%s: LKD block output error %.4f -> %.4f%s", ctx.prefix, res.rel_error_before, res.rel_error_after, "" if res.kept else " (not kept)")
        for name, (w, _) in specs.items():
            if w is not None:
                self._records[ctx.full_name(name)] = {
                    "lkd_block_rel_error_before": res.rel_error_before,
                    "lkd_block_rel_error_after": res.rel_error_after,
                    "lkd_kept": res.kept,
                }

    def solve(self, name: str, module: nn.Module, spec: WeightSpec, stats: Any) -> QuantizedWeight:
        return round_to_nearest(module.weight, spec, name=name)

    def layer_record(self, name: str, module: nn.Module, qweight: QuantizedWeight, stats: Any) -> dict:
        return self._records.pop(name, {})
