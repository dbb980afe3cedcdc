"""What the runner needs to know about a model's structure, found generically.

- ``decoder_layers``: the ModuleList of transformer blocks.
- ``block_linears``: the nn.Linear (or QuantLinear) modules inside a block, by name.
- ``input_groups``: the block's Linear layers grouped by the tensor they read, in the
  order the forward pass calls them. For Llama-style blocks this yields
  [q, k, v], [o], [gate, up], [down]: the "true sequential" order of GPTQ, found by
  tracing one forward pass instead of a table per architecture.
"""

from __future__ import annotations

from torch import nn

from ..errors import LowbitError

_KNOWN_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "model.decoder.layers", "layers")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the decoder blocks."""
    for path in _KNOWN_PATHS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise LowbitError(f"cannot find the decoder blocks of {type(model).__name__}")
    return best


def is_linear(m: nn.Module) -> bool:
    from ..nn.qlinear import QuantLinear

    return isinstance(m, (nn.Linear, QuantLinear))


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in block.named_modules() if name and is_linear(m)}


def input_groups(block: nn.Module, run_forward) -> list[list[str]]:
    """Group the block's linears by shared input tensor, in call order.

    ``run_forward()`` runs the block once (on any real input); hooks note which Linear
    reads which tensor.
    """
    order: list[tuple[str, int]] = []
    alive = []  # hold every input so no id is reused by a later tensor during the trace
    handles = []

    def hook(name):
        def fn(_mod, args):
            alive.append(args[0])
            order.append((name, id(args[0])))

        return fn

    for name, mod in block_linears(block).items():
        handles.append(mod.register_forward_pre_hook(hook(name)))
    try:
        run_forward()
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_key = None
    seen = set()
    for name, key in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and key == last_key:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_key = key
    missing = set(block_linears(block)) - seen
    if missing:
        groups.append(sorted(missing))  # never called on this input: quantize them last
    return groups
