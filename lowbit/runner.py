"""The block-wise calibration runner, written once for every algorithm.

1. Capture the inputs of the first decoder block for the whole calibration set, and the
   keyword arguments (masks, rotary embeddings) of every block, in one call of the model
   in which the blocks are stand-ins (``capture_layer_inputs``).
2. For each block in order, run it ONCE on those inputs with a pre-forward hook on every
   Linear to quantize. When the forward reaches a layer, the hook hands the layer's input
   to the algorithm (observe), asks for the quantized weight (solve), writes the
   dequantized weight into the layer, and fake-quantizes the input if activations are
   quantized. Everything after that layer in the block therefore already sees the
   quantized layer: q/k/v are solved on the block input, o_proj on the output of the
   quantized attention, and so on (GPTQ's "true sequential" order, for free), and the
   block's output is the quantized block's output, which is the next block's input.
3. After the forward, each Linear is replaced by a QuantLinear holding the codes.

One forward per block is the least work possible. Only one block's activations are alive
at a time (calibration tokens x the block's widths), on top of the model itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
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
    """Inputs of one decoder block for the whole calibration set."""

    hidden: torch.Tensor  # [n_windows, seq_len, hidden]
    kwargs: dict

    @property
    def n_tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]


def capture_first_block_inputs(model: nn.Module, first_block: nn.Module, windows: torch.Tensor) -> BlockInputs:
    """Run the model on the calibration windows up to the first block and keep its inputs."""
    hidden, kwargs = capture_layer_inputs(model, [first_block], windows)
    return BlockInputs(hidden, kwargs[0])


def capture_layer_inputs(model: nn.Module, layers, windows: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """(the first block's hidden input, each block's own keyword arguments) for the
    windows, from one call of the model in which no block computes anything.

    Blocks of one model may get different arguments: Gemma 3's sliding-window layers get
    the local rotary embedding (base 10,000) and a sliding mask, its full-attention layers
    the global one (base 1,000,000) and a causal mask. For this one call each block is
    replaced by a stand-in that records what it was given and passes its input on, so the
    blocks' weights are not needed (they may not be loaded yet, see models.stream)."""
    if windows.numel() == 0:
        raise LowbitError("no calibration windows: the calibration set is empty")
    hidden: list[torch.Tensor] = []
    kwargs: list[dict] = []

    def stand_in(*args, **kw):
        h = args[0] if args else kw.pop("hidden_states")
        if not hidden:
            hidden.append(h.detach())
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        if len(kwargs) == len(layers):
            raise _StopForward
        return h

    for layer in layers:
        layer.forward = stand_in  # an attribute of this instance, removed below
    try:
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    except _StopForward:
        pass
    finally:
        for layer in layers:
            del layer.forward
    if len(kwargs) != len(layers):
        raise LowbitError(f"the model called {len(kwargs)} of its {len(layers)} decoder blocks")
    return hidden[0], kwargs


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _rows(kwargs: dict, batch: int, a: int, b: int) -> dict:
    """kwargs for rows a:b of a batch of ``batch`` (tensors with that batch dimension are
    cut; masks and rotary embeddings shared across the batch are kept whole)."""

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            return v[a:b]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return {k: cut(v) for k, v in kwargs.items()}


def _slice_batch(kwargs: dict, batch: int, n: int) -> dict:
    """kwargs for the first n rows of a batch of ``batch``."""
    return _rows(kwargs, batch, 0, n)


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

    def forward(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Run the block on the calibration inputs (or on ``hidden``, a batch of them)."""
        assert self.inputs is not None
        h = self.inputs.hidden if hidden is None else hidden
        kw = self.inputs.kwargs
        if h.shape[0] != self.inputs.hidden.shape[0]:
            kw = _slice_batch(kw, self.inputs.hidden.shape[0], h.shape[0])
        with torch.no_grad():
            return _first(self.block(h, **kw))

    def groups(self) -> list[list[str]]:
        """The block's linears grouped by shared input, in forward order (see arch)."""
        assert self.inputs is not None
        return input_groups(self.block, lambda: self.forward(self.inputs.hidden[:1]))

    def forward_with_hooks(self, pre_hooks: dict[str, Callable], hidden: torch.Tensor | None = None) -> torch.Tensor:
        """One forward of the block (on ``hidden`` when given, as in ``forward``) with
        pre-forward hooks on the named Linear layers; a hook may return a replacement
        input, as in ``register_forward_pre_hook``."""
        mods = self.linears()
        handles = [mods[n].register_forward_pre_hook(fn) for n, fn in pre_hooks.items()]
        try:
            return self.forward(hidden)
        finally:
            for h in handles:
                h.remove()


@contextlib.contextmanager
def float32_matmul_precision(level: str) -> Iterator[None]:
    """torch's float32 matmul precision ("highest", "high", "medium") for the duration."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def run_blocks(
    model: nn.Module,
    quantize_block: Callable[[BlockContext], torch.Tensor | None],
    windows: torch.Tensor | None,
    progress: Callable | None = None,
) -> list[BlockContext]:
    """Walk the decoder blocks in order, calling quantize_block(ctx) on each.

    With calibration windows, ctx carries the block's inputs as produced by the already
    quantized blocks before it, and quantize_block returns the quantized block's output on
    them (the next block's input). Without (methods that need no data), ctx.inputs is None
    and no forward pass runs at all. A streamed model's blocks (``models.stream``) are read
    from disk as the walk reaches them.
    """
    from .models.stream import stream_of

    was_training = model.training
    model.eval()  # calibration passes never use dropout
    stream = stream_of(model)
    try:
        prefix, layers = decoder_layers(model)
        if stream is not None:
            stream.before_blocks(model)
        hidden, layer_kwargs = capture_layer_inputs(model, layers, windows) if windows is not None else (None, None)
        if stream is not None:
            stream.drop_input_embedding(model)  # read again when needed (an evaluation, the checkpoint)
        contexts = []
        iterator = progress(range(len(layers))) if progress else range(len(layers))
        for i in iterator:
            inputs = None if hidden is None else BlockInputs(hidden, layer_kwargs[i])
            ctx = BlockContext(index=i, prefix=f"{prefix}.{i}", block=layers[i], inputs=inputs)
            if stream is not None:  # a streamed model's block is read from disk when reached, and kept
                stream.load(layers[i], ctx.prefix)
            out = quantize_block(ctx)
            if inputs is not None:
                hidden = ctx.forward() if out is None else out
            ctx.inputs = None  # release this block's activations
            contexts.append(ctx)
        return contexts
    finally:
        model.train(was_training)
