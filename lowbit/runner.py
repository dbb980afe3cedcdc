"""The block-wise calibration runner, written once for every algorithm.

1. Capture the inputs of the first decoder block for every calibration window (a
   pre-forward hook stores the hidden states and keyword arguments and stops the forward).
2. For each block in order: let the algorithm observe the inputs of its Linear layers
   through hooks (in the sequential groups the algorithm asks for), solve, and replace the
   layers with quantized ones; then run the quantized block to produce the next block's
   inputs, so every block is calibrated on what the quantized model really feeds it.

Only one block's activations are alive at a time (calibration windows x hidden size), on
top of the model itself; nothing copies the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import LowbitError
from .models.arch import block_linears, decoder_layers, input_groups

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Inputs of one decoder block: hidden states and keyword arguments, per chunk."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def capture_first_block_inputs(model: nn.Module, first_block: nn.Module, windows: torch.Tensor, batch_size: int) -> BlockInputs:
    """Run the model on calibration windows up to the first block and keep its inputs."""
    hidden, kwargs = [], []

    def grab(_module, args, kw):
        h = args[0] if args else kw.pop("hidden_states")
        hidden.append(h.detach())
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for chunk in windows.split(batch_size):
                try:
                    model(input_ids=chunk, use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if not hidden:
        raise LowbitError("no calibration windows: the calibration set is empty")
    return BlockInputs(hidden, kwargs)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockContext:
    """One block being quantized, with its calibration inputs; handed to algorithms."""

    index: int
    prefix: str  # dotted name of the block, e.g. model.layers.3
    block: nn.Module
    inputs: BlockInputs | None
    records: dict = field(default_factory=dict)  # per-layer report rows

    def linears(self) -> dict[str, nn.Module]:
        return block_linears(self.block)

    def full_name(self, local: str) -> str:
        return f"{self.prefix}.{local}"

    def forward(self, stop_after: nn.Module | None = None) -> list[torch.Tensor]:
        """Run the block on every input chunk; return the outputs (none if stopped early)."""
        assert self.inputs is not None
        outs = []
        handle = None
        if stop_after is not None:

            def stop(*_):
                raise _StopForward

            handle = stop_after.register_forward_hook(stop)
        try:
            with torch.no_grad():
                for h, kw in zip(self.inputs.hidden, self.inputs.kwargs):
                    try:
                        outs.append(_first(self.block(h, **kw)))
                    except _StopForward:
                        pass
        finally:
            if handle is not None:
                handle.remove()
        return outs

    def observe(self, names: list[str], on_input: Callable[[str, torch.Tensor], None]) -> None:
        """Run the block and call on_input(name, x) with the input of each named Linear,
        x flattened to [tokens, in_features]. Stops after the last of them has run."""
        mods = self.linears()
        handles = []

        def hook(name):
            def fn(_mod, args):
                x = args[0].detach()
                on_input(name, x.reshape(-1, x.shape[-1]))

            return fn

        for n in names:
            handles.append(mods[n].register_forward_pre_hook(hook(n)))
        try:
            self.forward(stop_after=mods[names[-1]] if names else None)
        finally:
            for h in handles:
                h.remove()

    def groups(self) -> list[list[str]]:
        """The block's linears grouped by shared input, in forward order (see arch)."""
        assert self.inputs is not None
        h, kw = self.inputs.hidden[0][:1], self.inputs.kwargs[0]
        kw1 = {k: (v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == self.inputs.hidden[0].shape[0] else v) for k, v in kw.items()}
        with torch.no_grad():
            return input_groups(self.block, lambda: self.block(h, **kw1))


def run_blocks(
    model: nn.Module,
    quantize_block: Callable[[BlockContext], None],
    windows: torch.Tensor | None,
    batch_size: int = 8,
    progress: Callable | None = None,
) -> list[BlockContext]:
    """Walk the decoder blocks in order, calling quantize_block(ctx) on each.

    With calibration windows, each ctx carries the block's inputs as produced by the
    already-quantized blocks before it. Without (weight-only methods that need no data),
    ctx.inputs is None and no forward pass runs at all.
    """
    prefix, layers = decoder_layers(model)
    inputs = None
    if windows is not None:
        inputs = capture_first_block_inputs(model, layers[0], windows, batch_size)
    contexts = []
    iterator = progress(range(len(layers))) if progress else range(len(layers))
    for i in iterator:
        ctx = BlockContext(index=i, prefix=f"{prefix}.{i}", block=layers[i], inputs=inputs)
        quantize_block(ctx)
        if inputs is not None and i + 1 < len(layers):
            inputs = BlockInputs(ctx.forward(), inputs.kwargs)
        ctx.inputs = None  # release this block's activations
        contexts.append(ctx)
    return contexts
