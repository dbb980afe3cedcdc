"""Adaptive channel reassembly (QLLM: Liu et al., "QLLM: Accurate and Efficient
Low-Bitwidth Quantization for Large Language Models", ICLR 2024), as pure functions of
matrices plus the fold into a Llama-style block.

For a Linear y = X W^T (X: [tokens, d], W: [out, d]):

- **Channel disassembly** splits an outlier input channel j (max|x_j| > theta) into
  T_j = ceil(max|x_j| / theta) sub-channels, each carrying x_j / T_j, with W's column j
  repeated for each: sum_t (x_j / T_j) w_j = x_j w_j, so the product is unchanged exactly
  and every sub-channel is at most theta in magnitude.
- **Channel assembly** brings the width back to d by merging as many pairs of similar
  channels as sub-channels were added, chosen by a bipartite matching (ToMe's bipartite
  soft matching, which the paper uses: the candidate channels are split alternately into
  two sets A and B, each channel of A finds its most similar channel of B, and the most
  similar of those edges are merged).
- **Adaptive threshold**: theta is searched per layer on the calibration data, minimizing
  the layer's output error after quantizing the reassembled input and weight
  (``search_threshold``); theta = max|x| (no disassembly) is always a candidate.

The paper merges channels a and b into one channel carrying x_a + x_b with the weight
(w_a + w_b) / 2, at the cost of an add at run time; its similarity is the error of that
merge, ||(x_a - x_b)(w_a - w_b)^T / 2||. lowbit keeps the model an ordinary float model of
the same architecture, so every slot of the reassembled input must be something the
previous layer can compute: a scaled copy of one of its output channels. The merge that
fits is a least-squares one: a is dropped and its contribution carried by b's slot,
x_a ~ lambda x_b (lambda = <x_a, x_b> / <x_b, x_b>), so b's weight column becomes
w_b + lambda w_a. Its error is exactly (x_a - lambda x_b) w_a^T, and the similarity used by
the matching is that error's squared norm, ||w_a||^2 (<x_a,x_a> - <x_a,x_b>^2/<x_b,x_b>)
(``merge_distance``; ``paper_distance`` is the paper's, for reference). Unlike the paper's
merge it never enlarges an activation (b's slot still carries x_b). Everything needs only
the Gram matrix G = X^T X of the calibration inputs.

Where it folds (``lowbit.algorithms.qllm``): down_proj's input act(gate) * up is computed
channel by channel, so a slot carrying (x_j / T) is made by copying row j of gate_proj and
row j of up_proj divided by T. An RMSNorm's output channel s is always weight_s times
residual channel s, so the inputs of q/k/v and gate/up cannot be reassembled without an
extra operation at run time; QLLM in lowbit smooths those instead (see qllm.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import ActSpec, WeightSpec
from ..formats.activations import fake_quantize_act
from ..formats.names import round_to_nearest


def disassembly_counts(absmax: torch.Tensor, theta: float) -> torch.Tensor:
    """T_j = ceil(max|x_j| / theta) sub-channels for every channel above theta, else 1."""
    t = torch.ceil(absmax.double() / theta).long()
    return torch.where(absmax > theta, t.clamp_min(1), torch.ones_like(t))


def disassemble(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The widened (x', w'): channel j repeated counts[j] times, x' divided by counts[j],
    w' columns repeated (reference of the exact identity x' w'^T = x w^T)."""
    idx = torch.repeat_interleave(torch.arange(x.shape[-1]), counts)
    return x[..., idx] / counts[idx].to(x.dtype), w[:, idx]


def merge_distance(gram: torch.Tensor, wnorm2: torch.Tensor) -> torch.Tensor:
    """D[a, b] = squared error of dropping channel a onto channel b (least-squares merge):
    ||w_a||^2 * (G_aa - G_ab^2 / G_bb). gram: [d, d] = X^T X, wnorm2: [d] = ||w_j||^2."""
    g = gram.double()
    diag = g.diagonal()
    resid = diag.unsqueeze(1) - g.pow(2) / diag.clamp_min(1e-300).unsqueeze(0)
    resid = torch.where(diag.unsqueeze(0) > 0, resid.clamp_min(0), diag.unsqueeze(1))
    return wnorm2.double().unsqueeze(1) * resid


def paper_distance(gram: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The paper's similarity (the error of its averaging merge), for reference:
    ||x_a - x_b||^2 * ||w_a - w_b||^2 / 4."""
    g = gram.double()
    diag = g.diagonal()
    dx = diag.unsqueeze(1) + diag.unsqueeze(0) - 2 * g
    wd = w.double()
    wg = wd.t() @ wd
    wdiag = wg.diagonal()
    dw = wdiag.unsqueeze(1) + wdiag.unsqueeze(0) - 2 * wg
    return dx.clamp_min(0) * dw.clamp_min(0) / 4


def bipartite_merges(dist: torch.Tensor, candidates: torch.Tensor, r: int) -> list[tuple[int, int]]:
    """Up to r (dropped a, kept b) pairs by bipartite soft matching over ``candidates``
    (channel indices, in order): A = the even positions, B = the odd ones; each a in A
    takes its nearest b in B; the r smallest edges win (several a may share one b)."""
    a_set, b_set = candidates[0::2], candidates[1::2]
    r = min(r, len(a_set))
    if r <= 0 or len(b_set) == 0:
        return []
    sub = dist[a_set][:, b_set]
    best, arg = sub.min(dim=1)
    order = torch.argsort(best, stable=True)[:r]
    return [(int(a_set[i]), int(b_set[arg[i]])) for i in order]


@dataclass
class Plan:
    """A reassembly of d channels into d slots: slot s carries scale[s] * x[source[s]],
    and W' = plan_weight(W). ``merges`` lists (dropped a, kept b, lambda)."""

    source: torch.Tensor  # [d] long
    scale: torch.Tensor  # [d] float64
    merges: list[tuple[int, int, float]] = field(default_factory=list)
    theta: float = math.inf
    n_disassembled: int = 0  # outlier channels split
    n_extra: int = 0  # sub-channels added (= channels merged)

    @staticmethod
    def identity(d: int) -> Plan:
        return Plan(torch.arange(d), torch.ones(d, dtype=torch.float64))


def make_plan(gram: torch.Tensor, absmax: torch.Tensor, w: torch.Tensor, theta: float) -> Plan:
    """Disassemble the channels above theta and merge the same number of others.

    Merges are taken among channels not disassembled; if fewer slots can be freed than
    sub-channels are needed, the largest outliers are served first and the others get
    fewer sub-channels (every channel keeps at least one)."""
    d = absmax.shape[0]
    counts = disassembly_counts(absmax, theta)
    if int((counts - 1).sum()) == 0:
        return Plan.identity(d)
    candidates = torch.nonzero(counts == 1).flatten()
    dist = merge_distance(gram, w.double().pow(2).sum(0))
    merges = bipartite_merges(dist, candidates, int((counts - 1).sum()))
    free = [a for a, _ in merges]
    # hand the freed slots to the outliers, largest first, one sub-channel at a time each
    # round so a shortage is shared rather than starving the smaller outliers
    outliers = [int(j) for j in torch.argsort(absmax, descending=True, stable=True) if counts[j] > 1]
    given = {j: 1 for j in outliers}
    want = {j: int(counts[j]) for j in outliers}
    slots: dict[int, list[int]] = {j: [j] for j in outliers}
    k = 0
    while k < len(free):
        progressed = False
        for j in outliers:
            if k < len(free) and given[j] < want[j]:
                slots[j].append(free[k])
                given[j] += 1
                k += 1
                progressed = True
        if not progressed:
            break
    merges = merges[:k]  # (only as many merges as slots used)
    source = torch.arange(d)
    scale = torch.ones(d, dtype=torch.float64)
    for j, ss in slots.items():
        for s in ss:
            source[s] = j
            scale[s] = 1.0 / len(ss)
    g = gram.double()
    lam = [(a, b, float(g[a, b] / g[b, b]) if g[b, b] > 0 else 0.0) for a, b in merges]
    split = sum(1 for j in outliers if len(slots[j]) > 1)
    return Plan(source, scale, lam, theta, split, k)


def plan_weight(w: torch.Tensor, plan: Plan) -> torch.Tensor:
    """W' with x' W'^T = x W^T up to the merges: column s = column source[s] (sub-channels
    repeat it), and each kept b gains lambda * w_a of the channel a dropped onto it."""
    out = w[:, plan.source].clone()
    for a, b, lam in plan.merges:
        out[:, b] += lam * w[:, a]
    return out


def plan_input(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """x' = the reassembled input: slot s carries scale[s] * x[:, source[s]]."""
    return x[..., plan.source] * plan.scale.to(x.dtype)


def merge_rel_error(gram: torch.Tensor, w: torch.Tensor, plan: Plan) -> float:
    """||X W^T - X' W'^T||_F / ||X W^T||_F on the calibration inputs, from G = X^T X alone:
    X' W'^T = X W_eff^T with W_eff[:, j] = sum over slots s of j: scale[s] W'[:, s]."""
    wd = w.double()
    wp = plan_weight(wd, plan)
    eff = torch.zeros_like(wd)
    eff.index_add_(1, plan.source, wp * plan.scale.unsqueeze(0))
    diff = wd - eff
    g = gram.double()
    num = float(torch.einsum("oi,ij,oj->", diff, g, diff))
    den = float(torch.einsum("oi,ij,oj->", wd, g, wd))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def quantized_output_error(x: torch.Tensor, w: torch.Tensor, plan: Plan, wspec: WeightSpec | None, aspec: ActSpec | None,
                           ref: torch.Tensor | None = None, per_token: bool = False) -> float:
    """||x W^T - Q(x') Q(W')^T||^2 on the sample x: the search objective (ref: x W^T, if known).
    per_token: the sum over tokens of each token's squared error relative to its ||x_t W^T||^2,
    so that a few tokens of huge norm (the attention-sink tokens, |x| in the thousands) do
    not outweigh all the others, as they do in the plain sum."""
    xp = plan_input(x.float(), plan)
    wp = plan_weight(w.double(), plan).float()
    if aspec is not None:
        xp = fake_quantize_act(xp, aspec)
    if wspec is not None:
        wp = round_to_nearest(wp, wspec).dequantize()
    if ref is None:
        ref = x.float() @ w.float().t()
    err = (ref - xp @ wp.t()).pow(2)
    if per_token:
        return float((err.sum(1).double() / ref.pow(2).sum(1).double().clamp_min(1e-30)).sum())
    return float(err.sum())


def threshold_candidates(absmax: torch.Tensor, n: int, max_extra: int) -> list[float]:
    """theta = max|x| (nothing split) and n thresholds spaced geometrically down to the
    median channel's max|x|, keeping those that add at most ``max_extra`` sub-channels."""
    top = float(absmax.max())
    low = max(float(absmax.median()), top * 1e-3)
    if not top > 0 or low >= top:
        return [top] if top > 0 else [math.inf]
    out = [top]
    for k in range(1, n + 1):
        theta = top * (low / top) ** (k / n)
        if int((disassembly_counts(absmax, theta) - 1).sum()) > max_extra:
            break
        out.append(theta)
    return out


def search_threshold(
    x: torch.Tensor,
    gram: torch.Tensor,
    w: torch.Tensor,
    wspec: WeightSpec | None,
    aspec: ActSpec | None,
    n_candidates: int = 12,
    max_extra_frac: float = 0.25,
    absmax: torch.Tensor | None = None,
    per_token: bool = False,
) -> tuple[Plan, list[tuple[float, float]]]:
    """The plan whose threshold minimizes the quantized output error on the sample x
    ([tokens, d]); gram is X^T X of the tokens the merges are fitted on (x may be other
    tokens of the same layer: a held-out sample judges the merges without the selection bias
    of scoring them on the tokens they were chosen on); absmax: max|x_j| over all tokens
    (default: the sample's). Returns (plan, [(theta, error)])."""
    absmax = (x.abs().amax(0) if absmax is None else absmax).float()
    d = absmax.shape[0]
    tried = []
    best, best_err = Plan.identity(d), math.inf
    ref = x.float() @ w.float().t()
    for theta in threshold_candidates(absmax, n_candidates, int(max_extra_frac * d)):
        plan = make_plan(gram, absmax, w, theta)
        err = quantized_output_error(x, w, plan, wspec, aspec, ref, per_token)
        tried.append((theta, err))
        if err < best_err:
            best, best_err = plan, err
    return best, tried
