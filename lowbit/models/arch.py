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


def scaling_pairs(block: nn.Module) -> list[tuple[str, list[str]]]:
    """(previous module, [Linear layers reading its output]) for the per-channel scalings of
    AWQ and SmoothQuant, found by name and shape in Llama-style blocks, in forward order:

        input_layernorm           -> q_proj, k_proj, v_proj
        v_proj                    -> o_proj     only when v's outputs are o's inputs one to
                                                one (no grouped-query attention: SmolLM2's
                                                3 kv heads feed 9 query heads, so not there)
        post_attention_layernorm  -> gate_proj, up_proj   (pre_feedforward_layernorm where a
                                                block has one, as Gemma 2/3 do)
        up_proj                   -> down_proj  (down reads act(gate) * up: linear in up's rows)

    A norm qualifies only if it has a weight of the width its Linears read. Blocks without
    these names (fused qkv, GPT-2 style) give fewer pairs or none; callers then skip the
    scaling. Folding a scale into the previous module is ``lowbit.algorithms.smoothing``'s job.
    """
    modules = dict(block.named_modules())
    linears = block_linears(block)

    def find(leaf: str, pool: dict) -> str | None:
        hits = [n for n in pool if n.rsplit(".", 1)[-1] == leaf]
        return hits[0] if len(hits) == 1 else None

    def norm(leaf: str, width: int) -> str | None:
        name = find(leaf, modules)
        if name is None or is_linear(modules[name]):
            return None
        w = getattr(modules[name], "weight", None)
        return name if w is not None and tuple(w.shape) == (width,) else None

    pairs: list[tuple[str, list[str]]] = []
    q, k, v, o = (find(f"{p}_proj", linears) for p in ("q", "k", "v", "o"))
    if q and k and v:
        prev = norm("input_layernorm", linears[q].in_features)
        if prev and linears[k].in_features == linears[v].in_features == linears[q].in_features:
            pairs.append((prev, [q, k, v]))
    if v and o and linears[v].out_features == linears[o].in_features:
        pairs.append((v, [o]))
    gate, up, down = (find(f"{p}_proj", linears) for p in ("gate", "up", "down"))
    if up:
        width = linears[up].in_features
        prev = norm("pre_feedforward_layernorm", width) or norm("post_attention_layernorm", width)
        readers = [gate, up] if gate and linears[gate].in_features == width else [up]
        if prev:
            pairs.append((prev, readers))
        if down and linears[up].out_features == linears[down].in_features:
            pairs.append((up, [down]))
    return pairs
