"""QLLM (Liu et al., "QLLM: Accurate and Efficient Low-Bitwidth Quantization for Large
Language Models", ICLR 2024): adaptive channel reassembly, then low-bit weights and
activations, with optional low-rank tuning of each block.

Per block, before the runner's quantization pass (``transform_block``):

1. norm-fed inputs (q/k/v, gate/up): an RMSNorm's channel s is weight_s times residual
   channel s, so these inputs cannot be reassembled inside the same architecture; they get
   SmoothQuant's per-channel migration instead (``smooth_alpha``, 0 = off), folded into
   the norms. This is lowbit's choice, not the paper's (which reassembles at run time).
2. down_proj's input act(gate) * up: adaptive channel reassembly
   (``lowbit.algorithms.reassembly``): the threshold is searched on the calibration inputs
   against the quantized layer output, outlier channels are split into sub-channels (rows
   of gate_proj copied, of up_proj copied and divided by T) and as many similar channels
   merged (down_proj's columns), so the block keeps its architecture and computes the same
   function up to the merge error, which is measured and reported per layer.
3. ``lowrank_rank`` > 0: with the block's quantizers in place, low-rank corrections A @ B
   per Linear are trained (Adam, straight-through rounding) to match the output of the
   block as it was before step 1 in float, then merged into the weights
   (``zeroquant.layerwise_distill``, the same loop as ZeroQuant's distillation).

The runner then quantizes the weights (``solver``: rtn or gptq) and the activations.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import LowbitError
from ..formats.weights import QuantizedWeight
from ..runner import BlockContext
from .base import Algorithm, option, register
from .reassembly import Plan, merge_rel_error, plan_weight, search_threshold
from .smoothing import capture, full_precision, spread_windows
from .smoothquant import smooth_block
from .solver import RTNOrGPTQ
from .zeroquant import layerwise_distill, take_windows

log = logging.getLogger(__name__)

SAMPLE_TOKENS = 1024  # tokens of down_proj's input the threshold search evaluates on


def mlp_names(linears: dict) -> tuple[str, str, str] | None:
    """(gate, up, down) of a gated MLP (down reads act(gate) * up), by name and shape."""
    def find(leaf):
        hits = [n for n in linears if n.rsplit(".", 1)[-1] == leaf]
        return hits[0] if len(hits) == 1 else None

    gate, up, down = find("gate_proj"), find("up_proj"), find("down_proj")
    if not (gate and up and down):
        return None
    g, u, d = linears[gate], linears[up], linears[down]
    if not (g.out_features == u.out_features == d.in_features and g.in_features == u.in_features):
        return None
    return gate, up, down


@torch.no_grad()
def fold_mlp_plan(gate: nn.Linear, up: nn.Linear, down: nn.Linear, plan: Plan) -> None:
    """Apply a reassembly of down's input to a gated MLP, in place: slot s of act(gate)*up
    becomes scale[s] * channel source[s] (gate row copied, up row copied and scaled),
    down's columns become plan_weight(down)."""
    src, sc = plan.source, plan.scale
    for lin, scaled in ((gate, False), (up, True)):
        w = lin.weight.detach().double()[src]
        if scaled:
            w = w * sc.unsqueeze(1)
        lin.weight.copy_(w.to(lin.weight.dtype))
        if lin.bias is not None:
            b = lin.bias.detach().double()[src]
            lin.bias.copy_((b * sc if scaled else b).to(lin.bias.dtype))
    down.weight.copy_(plan_weight(down.weight.detach().double(), plan).to(down.weight.dtype))


@dataclass(frozen=True)
class QLLMOptions:
    reassembly: bool = option(True, "adaptive channel reassembly of down_proj's input; true/false")
    candidates: int = option(12, "thresholds tried per layer by the search (a positive integer)")
    max_extra: float = option(0.25, "most sub-channels a layer may add, as a fraction of its width, in (0, 0.5]")
    smooth_alpha: float = option(0.5, "SmoothQuant migration strength for the norm-fed inputs (q/k/v, gate/up), in [0, 1]; 0: off")
    stat_windows: int = option(8, "calibration windows (spread over the set) the statistics and search use (0: all)")
    search_holdout: bool = option(False, "fit the merges on half of the search's windows and judge each threshold on the other half (2 x stat_windows windows); true/false")
    search_error: str = option("sum", "threshold search objective: sum (squared output error over tokens) or token (each token's error relative to its output norm)")
    lowrank_rank: int = option(0, "rank of the low-rank corrections tuned per Linear (0: no tuning)")
    lowrank_steps: int = option(40, "Adam steps of low-rank tuning per block (a positive integer)")
    lowrank_lr: float = option(1e-3, "low-rank tuning learning rate, in (0, 1)")
    lowrank_windows: int = option(4, "calibration windows tuned on (0: all)")
    solver: str = option("rtn", "weight quantizer after reassembly: rtn or gptq (QLLM + GPTQ)")

    def __post_init__(self) -> None:
        for k in ("candidates", "lowrank_steps"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LowbitError(f"{k} must be a positive integer, got {v!r}")
        for k in ("stat_windows", "lowrank_rank", "lowrank_windows"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise LowbitError(f"{k} must be a non-negative integer, got {v!r}")
        if not 0 < self.max_extra <= 0.5:
            raise LowbitError(f"max_extra must be in (0, 0.5], got {self.max_extra!r}")
        if not 0 <= self.smooth_alpha <= 1:
            raise LowbitError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha!r}")
        if not 0 < self.lowrank_lr < 1:
            raise LowbitError(f"lowrank_lr must be in (0, 1), got {self.lowrank_lr!r}")
        if self.search_error not in ("sum", "token"):
            raise LowbitError(f"search_error must be sum or token, got {self.search_error!r}")
        if self.solver not in ("rtn", "gptq"):
            raise LowbitError(f"solver must be rtn or gptq, got {self.solver!r}")


@register
class QLLM(RTNOrGPTQ, Algorithm):
    name = "qllm"
    summary = "QLLM: adaptive channel reassembly (disassemble outlier channels, merge similar ones), low-bit weights and activations, optional low-rank tuning"
    Options = QLLMOptions
    default_weight = {"bits": 4, "group_size": None, "symmetric": False}
    default_act = {"bits": 4, "dynamic": True, "granularity": "token", "symmetric": False}
    defaults_source = "W4A4: weights per output channel asymmetric, activations dynamic per token asymmetric, the paper's W4A4 setting (W4A8 with --act-bits 8; W6A6 with --bits 6 --act-bits 6)"
    needs_weights = False

    def __init__(self, config):
        super().__init__(config)
        self._records: dict[str, dict] = {}
        self.use_solver(self.options.solver)

    def uses_calibration(self) -> bool:
        return True

    # --- per block ---------------------------------------------------------------------------

    def transform_block(self, ctx: BlockContext) -> None:
        if ctx.inputs is None:
            return
        o = self.options
        n = ctx.inputs.hidden.shape[0]
        tune_idx = torch.linspace(0, n - 1, n if o.lowrank_windows == 0 else min(o.lowrank_windows, n)).round().long()
        teacher = None
        if o.lowrank_rank > 0:  # the target: this block in float, before any transform
            teacher = self._teacher(ctx, tune_idx)
        if o.smooth_alpha > 0:
            self._records.update(smooth_block(ctx, o.smooth_alpha, False, o.stat_windows))
        if o.reassembly:
            self._reassemble(ctx)
        if o.lowrank_rank > 0:
            self._tune(ctx, tune_idx, teacher)

    @staticmethod
    def _teacher(ctx: BlockContext, idx: torch.Tensor) -> torch.Tensor:
        hidden, kw = ctx.inputs.hidden, ctx.inputs.kwargs
        n = hidden.shape[0]
        outs = []
        with torch.no_grad():
            for i in idx.tolist():
                one = torch.tensor([i])
                out = ctx.block(hidden[one], **take_windows(kw, n, one))
                outs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return torch.cat(outs)

    def _reassemble(self, ctx: BlockContext) -> None:
        linears = ctx.linears()
        names = mlp_names(linears)
        if names is None:
            log.debug("%s: no gated MLP found; no reassembly", ctx.prefix)
            return
        gate, up, down = names
        if self.config.is_ignored(ctx.full_name(down)):
            return
        t0 = time.perf_counter()
        d = linears[down].in_features
        o = self.options
        n = ctx.inputs.hidden.shape[0]
        k = 0 if o.stat_windows == 0 else (2 * o.stat_windows if o.search_holdout else o.stat_windows)
        windows = spread_windows(n, k)
        nw = n if windows is None else len(windows)
        got = []
        capture(ctx, [down], lambda _name, x: got.append(x.float()), windows)
        per_window = torch.cat(got).reshape(nw, -1, d)
        if o.search_holdout and nw >= 2:  # merges fitted on half the windows, judged on the other half
            fit, held = per_window[0::2].reshape(-1, d), per_window[1::2].reshape(-1, d)
        else:
            fit = held = per_window.reshape(-1, d)
        rows = per_window.reshape(-1, d)
        gram = (fit.t() @ fit).double()  # float32 products, accumulated by BLAS; kept in float64
        sample = held[torch.linspace(0, held.shape[0] - 1, min(SAMPLE_TOKENS, held.shape[0])).round().long()]
        W = linears[down].weight.detach().float()
        wspec = self.config.weight_spec_for(ctx.full_name(down))
        with full_precision():
            plan, tried = search_threshold(sample, gram, W, wspec, self.config.act, o.candidates, o.max_extra,
                                           absmax=rows.abs().amax(0), per_token=o.search_error == "token")
            merge_err = merge_rel_error(gram, W, plan)
            probe = ctx.inputs.hidden[:1]
            before = ctx.forward(probe)
            fold_mlp_plan(linears[gate], linears[up], linears[down], plan)
            after = ctx.forward(probe)
        block_change = float((after - before).norm() / before.norm().clamp_min(1e-30))
        absmax = rows.abs().amax(0)
        after_max = float((absmax[plan.source] * plan.scale.float()).max())
        base_err = tried[0][1]
        best_err = min(e for _, e in tried)
        self._records[ctx.full_name(down)] = {
            "reassembly_theta": plan.theta if plan.n_extra else None,
            "reassembly_disassembled": plan.n_disassembled,
            "reassembly_subchannels_added": plan.n_extra,
            "reassembly_merge_rel_error": merge_err,
            "reassembly_block_rel_change": block_change,
            "reassembly_act_absmax_before": float(absmax.max()),
            "reassembly_act_absmax_after": after_max,
            "reassembly_search_error_ratio": best_err / base_err if base_err > 0 else 1.0,
            "reassembly_seconds": time.perf_counter() - t0,
        }
        log.debug("%s: reassembly split %d channels (+%d), merge error %.2e, max|x| %.1f -> %.1f",
                  ctx.prefix, plan.n_disassembled, plan.n_extra, merge_err, float(absmax.max()), after_max)

    def _tune(self, ctx: BlockContext, idx: torch.Tensor, teacher: torch.Tensor) -> None:
        o = self.options
        specs = self.block_specs(ctx)
        if not any(w is not None for w, _ in specs.values()):
            return
        hidden, kw = ctx.inputs.hidden, ctx.inputs.kwargs
        n = hidden.shape[0]
        res = layerwise_distill(ctx.block, hidden[idx], take_windows(kw, n, idx), specs, o.lowrank_steps, o.lowrank_lr,
                                rank=o.lowrank_rank, teacher=teacher, seed=self.config.seed + ctx.index)
        log.debug("%s: low-rank tuning block error %.4f -> %.4f%s", ctx.prefix, res.rel_error_before, res.rel_error_after, "" if res.kept else " (not kept)")
        for name, (w, _) in specs.items():
            if w is not None:
                row = self._records.setdefault(ctx.full_name(name), {})
                row.update({"lowrank_block_rel_error_before": res.rel_error_before,
                            "lowrank_block_rel_error_after": res.rel_error_after, "lowrank_kept": res.kept})

    # --- the weight solver ---------------------------------------------------------------------

    def layer_record(self, name: str, module: nn.Module, qweight: QuantizedWeight, stats: Any) -> dict:
        return self.solver_record(self._records.pop(name, {}), name, module, qweight, stats)
