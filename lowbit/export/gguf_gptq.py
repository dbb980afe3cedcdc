"""GPTQ-fed GGUF: each Linear of the decoder blocks quantized to the GGML type its preset
gives it, with GPTQ choosing the codes on that type's grid.

One pass of lowbit's block-wise runner over the calibration windows. In each block, when
the forward reaches the first Linear of an input group (q/k/v, o, gate/up, down), its
input X gives the Hessian H = 2/N X^T X and the importance diag(H)/2 = mean x^2 per input
column (llama.cpp's imatrix, here on the inputs the already-quantized layers produce).
For each Linear of the group:

1. the GGML codec quantizes the original weight with that importance: this fixes every
   block's scales (and mins) exactly as ``quantize_tensor(w, type, importance)`` does;
2. ``gptq_on_grid`` re-chooses the codes on those scales, with error feedback; Linears of
   the same type in the group are solved as one stacked matrix (rows are independent);
3. the new codes are written into the codec's bytes, and the Linear's weight becomes
   their decoding, so the rest of the block, and the next blocks, see the quantized layer
   (GPTQ's "true sequential" order).

The model's Linear weights are left holding the quantized values. Types without a code
grid (F16/F32, or a Linear the preset leaves unquantized) are not touched here; the writer
quantizes them as usual.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ..algorithms.gptq import Hessian, output_error
from ..algorithms.gptq_grid import gptq_on_grid
from ..errors import LowbitError
from ..formats.gguf import dequantize_tensor, quantize_tensor
from ..formats.gguf.grid import grid_of, grid_types, with_codes
from ..runner import BlockContext, run_blocks

log = logging.getLogger(__name__)


@dataclass
class GridGPTQResult:
    raw: dict[str, tuple] = field(default_factory=dict)  # HF weight name -> (GGML type, uint8 [rows, row_bytes])
    records: dict[str, dict] = field(default_factory=dict)  # Linear name -> output errors (GPTQ and plain rounding)


def gptq_gguf(model: torch.nn.Module, windows: torch.Tensor, types: dict, damp_percent: float = 0.01,
              block_size: int = 128, act_order: bool = True, progress=None) -> GridGPTQResult:
    """types: {HF weight name (``model.layers.0.self_attn.q_proj.weight``): GGML type}."""
    if windows is None or windows.numel() == 0:
        raise LowbitError("GGUF GPTQ: no calibration windows")
    from ..nn.qlinear import QuantLinear

    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise LowbitError("GGUF GPTQ quantizes a float model; this one already holds lowbit-quantized layers")
    result = GridGPTQResult()
    gridded = set(grid_types())

    def solve_group(ctx: BlockContext, members: list[str], x: torch.Tensor) -> None:
        h = Hessian(x.shape[-1])
        h.update(x)
        importance = (torch.diagonal(h.H) / 2).numpy()
        mods = ctx.linears()
        by_type: dict = {}
        for local in members:
            full = ctx.full_name(local)
            t = types.get(f"{full}.weight")
            if t is not None and t.name in gridded:
                by_type.setdefault(t, []).append((full, mods[local]))
        for t, layers in by_type.items():
            Ws = [m.weight.detach().float().numpy() for _, m in layers]
            raws = [quantize_tensor(W, t, importance) for W in Ws]
            grids = [grid_of(r, t, W.shape) for r, W in zip(raws, Ws)]
            stacked = grids[0]
            if len(grids) > 1:
                stacked = type(stacked)(np.concatenate([g.scale for g in grids]), np.concatenate([g.offset for g in grids]),
                                        stacked.zero, stacked.qmin, stacked.qmax)
            sol = gptq_on_grid(np.concatenate(Ws), h.H, stacked, damp_percent, block_size, act_order, layers[0][0])
            row = 0
            for (full, mod), W, raw0 in zip(layers, Ws, raws):
                codes = sol.codes[row : row + W.shape[0]]
                row += W.shape[0]
                raw = with_codes(raw0, t, codes)
                deq = dequantize_tensor(raw, t, W.shape)
                Wt = torch.from_numpy(W)
                result.records[full] = {
                    "type": t.name,
                    "output_rel_error": output_error(Wt, torch.from_numpy(deq), h.H),
                    "rtn_output_rel_error": output_error(Wt, torch.from_numpy(dequantize_tensor(raw0, t, W.shape)), h.H),
                }
                log.debug("%s %s: output error %.4f (plain rounding %.4f)", full, t.name,
                         result.records[full]["output_rel_error"], result.records[full]["rtn_output_rel_error"])
                result.raw[f"{full}.weight"] = (t, raw)
                with torch.no_grad():
                    mod.weight.copy_(torch.from_numpy(deq).to(mod.weight.dtype))

    def one_block(ctx: BlockContext) -> torch.Tensor:
        first_of = {g[0]: g for g in ctx.groups()}

        def hook_for(local):
            def hook(_module, args):
                solve_group(ctx, first_of[local], args[0].detach())

            return hook

        return ctx.forward_with_hooks({local: hook_for(local) for local in first_of})

    run_blocks(model, one_block, windows, progress=progress)
    return result
