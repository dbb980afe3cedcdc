"""AWQ's clipping search on any format of the weight-format family (pure functions).

The affine int grid has its own search (``awq.search_clip``: the range [lo, hi] times p,
turned into a scale and zero point directly). Every other format is searched through the
format interface alone, so a new format gets the search for free: for each ratio p on the
grid {1, 1 - max_shrink/n_grid, ...},

1. clamp each (row, group) of W to [-p·max|w|, p·max|w|] (max over the group's real
   entries), and ``fit`` the format's parameters on the clamped weights: the range the
   parameters cover shrinks (NF4's absmax becomes p·absmax, a codebook's outer centroids
   move in, BCQ's scales shrink);
2. ``encode`` the *unclamped* weights with those parameters (the tails take the outermost
   representable values) and ``decode`` them;
3. score each (row, group) by its share of the layer output's squared error,
   d_g H_gg d_g^T, H_gg the group's diagonal block of the Gram matrix H = X^T X.

Per (row, group) the parameters of the ratio with the least error are kept (ties to the
larger ratio). p = 1 clamps nothing, so its parameters are exactly the format's own fit
and no (row, group) scores worse than plain round-to-nearest, even for formats whose fit
already minimizes an unweighted squared error (BCQ's alternating least squares, the
codebook's k-means): their optimum is for ||d_g||^2, not for d_g H_gg d_g^T.

Matrix-level ``finish`` steps (NF4/FP4 double quantization of the absmax constants) run
once after the search on the chosen parameters; the search scores the parameters before
that step (the 8-bit nested constants move each absmax by well under a percent).
``search_clip_format_reference`` is the same search one (row, group) at a time, the plain
form the tests hold the fast one to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.base import GroupLayout, WeightFormat, default_g_idx


def clip_skip_reason(fmt) -> str | None:
    """Why the search does not apply to ``fmt`` (None: it does)."""
    if getattr(fmt, "static_params", False):
        # mixed widths: each group's width comes from the whole matrix's salience ranking;
        # fits on differently clamped copies could give a group different widths, and
        # parameters picked per (row, group) from them would not share one width per group.
        # GGML types: a super-block's scales are quantized together by the codec's search.
        return "its parameters are chosen over the whole matrix, not per (row, group)"
    if getattr(fmt, "shares_rows", False):
        # column codebooks, BiLLM's salient columns: one parameter set serves every row, so
        # it cannot be picked row by row from differently clamped fits
        return "its parameters are shared by all rows of the matrix"
    if hasattr(fmt, "quantize"):
        # the float16-outlier wrapper takes the largest weights out as exact values before
        # its base format is fitted: it already removes the tails clipping would cut, and its
        # one matrix-level step (which weights are outliers) has no per-group parameters to pick
        return "its outliers already take the largest weights out of the groups' ranges"
    return None


def clip_ratios(n_grid: int, max_shrink: float) -> list[float]:
    """The ratios tried, largest first: 1 - max_shrink·i/n_grid for i = 0 .. n_grid - 1."""
    return [1.0 - max_shrink * i / n_grid for i in range(n_grid)]


def clamp_groups(wg: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """wg [rows, groups, width] clamped per (row, group) to ±p·max|w| of its real entries.
    p = 1 returns the values unchanged (max|w|·1 is exact)."""
    a = wg.abs() if mask is None else wg.abs() * mask
    c = a.amax(-1, keepdim=True) * p
    return torch.maximum(torch.minimum(wg, c), -c)


def group_blocks_of(H: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """H's diagonal blocks in the layout's [groups, width, width] order (zero rows and
    columns where a group is padded)."""
    # columns into the layout, then (transposed) the rows: Hl[(g, w), g', w'] = H[col(g, w), col(g', w')]
    Hl = layout.gather(layout.gather(H.float().t()).reshape(H.shape[0], -1).t().contiguous())
    G, Wd = layout.n_groups, layout.width
    Hl = Hl.reshape(G, Wd, G, Wd)
    idx = torch.arange(G)
    return Hl[idx, :, idx, :]


def group_errors(fmt: WeightFormat, wg: torch.Tensor, mask: torch.Tensor | None, params: dict, Hb: torch.Tensor) -> torch.Tensor:
    """[rows, groups] d_g H_gg d_g^T of the round trip of wg through ``params``."""
    D = wg.float() - fmt.decode(fmt.encode(wg, params), params)
    if mask is not None:
        D = D * mask
    Dg = D.transpose(0, 1)  # [groups, rows, width]
    return (torch.bmm(Dg, Hb) * Dg).sum(-1).t()


def _pick(better: torch.Tensor, new: dict, old: dict) -> dict:
    out = {}
    for k, v in new.items():
        b = better.reshape(better.shape + (1,) * (v.dim() - 2))
        out[k] = torch.where(b, v, old[k])
    return out


@dataclass
class FormatClip:
    params: dict[str, torch.Tensor]  # the format's group parameters, each [rows, groups, ...]
    ratio: torch.Tensor  # [rows, groups] the chosen ratio
    error: torch.Tensor  # [rows, groups] its d_g H_gg d_g^T
    plain_error: torch.Tensor  # [rows, groups] the same at ratio 1 (the format's own fit)


def search_clip_format(
    fmt: WeightFormat, W: torch.Tensor, H: torch.Tensor, n_grid: int = 20, max_shrink: float = 0.5
) -> FormatClip:
    """AWQ's clipping search for ``fmt`` on W [out, in] with Gram matrix H [in, in]: the
    format's parameters fitted per ratio on the clamped groups, kept per (row, group) where
    they give the least output error. Contiguous groups of ``fmt.group_size`` (the last
    one narrower where it does not divide the width), as ``quantize_matrix`` lays them out."""
    W = W.detach().float()
    g_idx = default_g_idx(W.shape[1], fmt.group_size)
    layout = GroupLayout(g_idx, int(g_idx.max()) + 1 if g_idx.numel() else 1)
    wg, mask = layout.gather(W), layout.mask
    Hb = group_blocks_of(H, layout)
    best = ratio = err = plain = None
    for p in clip_ratios(n_grid, max_shrink):
        params = fmt.fit(clamp_groups(wg, mask, p), mask)
        e = group_errors(fmt, wg, mask, params, Hb)
        if best is None:
            best, err, plain, ratio = params, e, e, torch.ones_like(e)
            continue
        better = e < err
        best = _pick(better, params, best)
        err = torch.where(better, e, err)
        ratio = torch.where(better, torch.full_like(ratio, p), ratio)
    return FormatClip(best, ratio, err, plain)


def search_clip_format_reference(
    fmt: WeightFormat, W: torch.Tensor, H: torch.Tensor, n_grid: int = 20, max_shrink: float = 0.5
) -> FormatClip:
    """The same search one (row, group) at a time on its real entries, with the error
    written out as d H_gg d^T: slow and plain, for the tests."""
    W = W.detach().float()
    out, n = W.shape
    gs = fmt.group_size or n
    starts = list(range(0, n, gs))
    ratio = torch.ones(out, len(starts))
    err = torch.zeros(out, len(starts))
    plain = torch.zeros(out, len(starts))
    chosen: dict[str, list] = {}
    for r in range(out):
        for g, lo in enumerate(starts):
            hi = min(lo + gs, n)
            w = W[r, lo:hi]
            Hg = H[lo:hi, lo:hi].float()
            best_e, best_p, best_params = None, None, None
            for p in clip_ratios(n_grid, max_shrink):
                c = w.abs().max() * p
                params = fmt.fit(torch.maximum(torch.minimum(w, c), -c).reshape(1, 1, -1))
                d = w - fmt.decode(fmt.encode(w.reshape(1, 1, -1), params), params).reshape(-1)
                e = float(d @ Hg @ d)
                if best_e is None:
                    plain[r, g] = e
                if best_e is None or e < best_e:
                    best_e, best_p, best_params = e, p, params
            ratio[r, g], err[r, g] = best_p, best_e
            for k, v in best_params.items():
                chosen.setdefault(k, []).append(v[0, 0])
    params = {k: torch.stack(v).reshape(out, len(starts), *v[0].shape) for k, v in chosen.items()}
    return FormatClip(params, ratio, err, plain)
