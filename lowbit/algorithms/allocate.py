"""Automatic bit allocation: one format per decoder Linear, chosen for a size budget.

    budget (average bits per weight, or bytes of the quantized Linears) + candidate formats
      -> each Linear's sensitivity to each candidate, measured once on the float model
      -> the choice per layer with the least predicted loss within the budget
      -> a QuantConfig with one exact-name override per Linear, run by any method

Sensitivity is the layer's output error on the calibration inputs under round-to-nearest
(importance-weighted, llama.cpp's imatrix, when the method fits that way), weighted per
output channel by how much the model's loss feels that channel (``sensitivity="fisher"``,
the default):
    err(layer, format) = sum_j F_j (D H D^T)_jj,  D = W - Q(W),  H = X^T X,
    F_j = sum over calibration tokens of (dLoss/dy_j)^2,
with X the inputs the layer sees in the float model and y its outputs; the loss is the
next-token cross entropy, so F is the diagonal of the empirical Fisher over the layer's
outputs, and err the second-order estimate of the loss increase (up to a common factor).
One forward and one backward pass per calibration window give every H and F.
``sensitivity="output"`` drops F (every output channel of every layer counts the same,
the quantity GPTQ minimises within one layer). Why not the model's KL with one layer
quantized at a time: one evaluation per (layer, candidate), 210 layers x 6 formats = 1,260
evaluations of SmolLM2, hours on a laptop CPU. Both estimates treat the layers' errors as
additive, the approximation the predicted-against-measured report checks.

The solve is a multiple-choice knapsack (one candidate per layer, least total error
within the bytes), exact by dynamic programming over bytes in units of 1/50,000 of the
largest plan (rounded up, so the plan always fits), then the bytes that rounding leaves are
spent greedily on the upgrades with the best error saved per byte. Bytes are the exact stored bytes of each candidate on that layer (codes,
scales, zero points, tables), as ``lowbit inspect`` counts them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import QuantConfig, WeightSpec
from ..errors import LowbitError
from ..formats.budget import solve
from ..formats.memory import weight_storage
from ..formats.names import check_format_name, format_of, round_to_nearest
from ..models.arch import block_linears, decoder_layers

DEFAULT_CANDIDATES = ("int2", "int3", "int4", "int5", "int6", "int8")
SENSITIVITIES = ("fisher", "output")


def candidate_fields(name: str) -> dict:
    """A candidate as WeightSpec fields: int<k> is the affine grid of k bits, any other
    name a format of the family (nf4, bcq3, Q4_K, ...)."""
    t = name.strip()
    if t.lower().startswith("int") and t[3:].isdigit():
        return {"format": "int", "bits": int(t[3:])}
    from ..formats.names import canonical

    t = canonical(t)
    check_format_name(t)
    return {"format": t}


@dataclass(frozen=True)
class Budget:
    """What the quantized decoder Linears may take: ``bpw`` (average exact bits per weight)
    or ``bytes`` (their total stored bytes); exactly one."""

    bpw: float | None = None
    bytes: int | None = None
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    sensitivity: str = "fisher"

    def __post_init__(self) -> None:
        if self.sensitivity not in SENSITIVITIES:
            raise LowbitError(f"bit budget sensitivity must be one of {', '.join(SENSITIVITIES)}, got {self.sensitivity!r}")
        if (self.bpw is None) == (self.bytes is None):
            raise LowbitError("a bit budget needs exactly one of a target bits per weight or a size in bytes")
        if self.bpw is not None and not self.bpw > 0:
            raise LowbitError(f"target bits per weight must be positive, got {self.bpw}")
        if self.bytes is not None and not self.bytes > 0:
            raise LowbitError(f"size budget must be positive, got {self.bytes}")
        if not self.candidates:
            raise LowbitError("a bit budget needs at least one candidate format")
        object.__setattr__(self, "candidates", tuple(self.candidates))
        for c in self.candidates:
            candidate_fields(c)


@dataclass
class Allocation:
    config: QuantConfig
    choices: dict[str, str]  # layer -> candidate name
    predicted: dict[str, float]  # layer -> its predicted error (module doc) under the chosen candidate
    bytes: int
    weights: int
    table: dict[str, list[tuple[str, float, int]]] = field(default_factory=dict)
    sensitivity: str = "fisher"

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / max(self.weights, 1)

    @property
    def predicted_total(self) -> float:
        return float(sum(self.predicted.values()))

    def to_dict(self) -> dict:
        return {"choices": self.choices, "sensitivity": self.sensitivity, "predicted_error": self.predicted,
                "predicted_total": self.predicted_total,
                "bytes": self.bytes, "bits_per_weight": self.bits_per_weight,
                "candidates": {n: [{"format": c, "predicted_error": e, "bytes": b} for c, e, b in rows] for n, rows in self.table.items()}}


def _targets(model: nn.Module, config: QuantConfig) -> dict[str, nn.Linear]:
    prefix, layers = decoder_layers(model)
    out = {}
    for i, block in enumerate(layers):
        for local, mod in block_linears(block).items():
            full = f"{prefix}.{i}.{local}"
            if config.weight_spec_for(full) is not None:
                out[full] = mod
    return out


@torch.no_grad()
def input_hessians(model: nn.Module, linears: dict[str, nn.Linear], calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """X^T X of each Linear's inputs over the calibration windows, on the float model."""
    return _pass(model, linears, calib, fisher=False)[0]


def input_hessians_and_fisher(model: nn.Module, linears: dict[str, nn.Linear], calib: torch.Tensor):
    """(X^T X of each Linear's inputs, the sum over tokens of (dLoss/dy)^2 per output
    channel), on the float model, the loss being each window's summed next-token cross
    entropy. The weights get no gradient (they are frozen for the pass)."""
    return _pass(model, linears, calib, fisher=True)


def _pass(model, linears, calib, fisher: bool):
    H = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in linears.items()}
    F = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in linears.items()}
    hooks = []

    def add_fisher(n):
        def on_grad(g):
            F[n].add_(g.detach().reshape(-1, g.shape[-1]).double().pow(2).sum(0))
        return on_grad

    for n, m in linears.items():
        def pre(mod, args, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            H[n].addmm_(x.t(), x)
        hooks.append(m.register_forward_pre_hook(pre))
        if fisher:
            hooks.append(m.register_forward_hook(lambda mod, args, out, n=n: out.register_hook(add_fisher(n)) and None))
    frozen = [p for p in model.parameters() if p.requires_grad]
    if fisher:  # gradients of activations only: the graph starts at the embedding's output
        for p in frozen:
            p.requires_grad_(False)
        hooks.append(model.get_input_embeddings().register_forward_hook(lambda mod, args, out: out.requires_grad_()))
    try:
        for row in calib:
            if not fisher:
                model(input_ids=row.unsqueeze(0), use_cache=False)
                continue
            with torch.enable_grad():
                logits = model(input_ids=row.unsqueeze(0), use_cache=False).logits[0, :-1].float()
                torch.nn.functional.cross_entropy(logits, row[1:].long(), reduction="sum").backward()
    finally:
        for h in hooks:
            h.remove()
        if fisher:
            for p in frozen:
                p.requires_grad_(True)
    return H, F


def stored_bytes(enc, spec: WeightSpec, rows: int, cols: int) -> int:
    if spec.in_family:
        return int(format_of(spec).nbytes(enc))
    return int(weight_storage(rows, cols, spec).total)


def measure(model: nn.Module, config: QuantConfig, calib: torch.Tensor, candidates: tuple[str, ...],
            progress=None, sensitivity: str = "fisher", weighted: bool = False) -> dict[str, list[tuple[str, float, int]]]:
    """layer -> [(candidate, predicted error, bytes)] for every decoder Linear (module doc).
    weighted: fit each candidate that weighs its fit with the layer's importance (mean x^2
    per input column), as the method will (RTN with an imatrix, GPTQ)."""
    if calib is None:
        raise LowbitError("bit allocation measures each layer on calibration data; give calibration windows")
    if sensitivity not in SENSITIVITIES:
        raise LowbitError(f"bit budget sensitivity must be one of {', '.join(SENSITIVITIES)}, got {sensitivity!r}")
    linears = _targets(model, config)
    if not linears:
        raise LowbitError("bit allocation found no decoder Linear to quantize")
    H, F = _pass(model, linears, calib, fisher=sensitivity == "fisher")
    tokens = calib.numel()
    table: dict[str, list[tuple[str, float, int]]] = {}
    items = list(linears.items())
    for name, mod in progress(items) if progress else items:
        W = mod.weight.detach().float()
        Hn = H[name].float()
        importance = (torch.diagonal(H[name]) / tokens).float() if weighted else None
        channel = F[name].float() if sensitivity == "fisher" else torch.ones(W.shape[0])
        base = config.weight_spec_for(name)
        rows = []
        for cand in candidates:
            spec = dataclasses.replace(base, **candidate_fields(cand))
            try:
                enc = _fit(W, spec, name, importance)
            except LowbitError as e:
                if "multiple of" in str(e) or "divide" in str(e) or "larger than" in str(e):
                    continue  # this format does not fit the layer's width (a GGML block): not a candidate here
                raise
            D = W - enc.dequantize()
            err = float((((D @ Hn) * D).sum(1) * channel).sum())
            rows.append((cand, max(err, 0.0), stored_bytes(enc, spec, *W.shape)))
        if not rows:
            raise LowbitError(f"layer {name}: none of the candidate formats ({', '.join(candidates)}) fits its width {W.shape[1]}")
        table[name] = rows
    return table


def _fit(W, spec: WeightSpec, name: str, importance):
    """Round-to-nearest of W in the candidate, its fit weighted by ``importance`` where the
    format weighs its fit (GGML types, BCQ, codebooks; the others ignore it, as the methods do)."""
    from .rtn import WEIGHTED_KINDS

    if importance is None or not spec.in_family or format_of(spec).kind not in WEIGHTED_KINDS:
        return round_to_nearest(W, spec, name)
    from ..formats.base import quantize_matrix

    return quantize_matrix(format_of(spec), W, name=name, importance=importance)


def allocate(model: nn.Module, config: QuantConfig, calib: torch.Tensor, budget: Budget, progress=None,
             weighted: bool = False) -> Allocation:
    """``config`` with one format per decoder Linear chosen for ``budget`` (see module doc);
    weighted: the method fits with an importance matrix, so the candidates are fit so too."""
    table = measure(model, config, calib, budget.candidates, progress, sensitivity=budget.sensitivity, weighted=weighted)
    n_weights = {n: m.weight.numel() for n, m in _targets(model, config).items()}
    weights = sum(n_weights.values())
    cap = budget.bytes if budget.bytes is not None else budget.bpw * weights / 8
    choice = solve(table, cap)
    from ..config import _match

    # exact names first (the first matching pattern wins), the user's own fields kept under the choice
    overrides = {n: {**next((f for p, f in config.overrides.items() if _match(p, n)), {}), **candidate_fields(table[n][i][0])}
                 for n, i in choice.items()}
    overrides.update({p: f for p, f in config.overrides.items() if p not in overrides})
    new = dataclasses.replace(config, overrides=overrides)
    return Allocation(
        config=new,
        choices={n: table[n][i][0] for n, i in choice.items()},
        predicted={n: table[n][i][1] for n, i in choice.items()},
        bytes=sum(table[n][i][2] for n, i in choice.items()),
        weights=weights,
        table=table,
        sensitivity=budget.sensitivity,
    )
