"""Weighted scale searches used by the k-quants, IQ4_NL and the legacy importance path.

Each function takes many groups at once, ``x`` and ``w`` of shape (n_groups, group_size)
float32, and returns per-group results. Where llama.cpp walks a short list of candidate
scales, or sweeps the positions of a group a few times, we loop in Python over those
candidates or positions and vectorize over the groups.

Internally the groups are laid out position-major, (group_size, n_groups), so that a
sum over a group is ``np.add.reduce(axis=0)``: numpy then adds position 0, 1, 2, ... in
order, in float32 -- the order of ggml's C loops -- and does it for all groups in one
vectorized pass. Matching the order matters: the searches compare candidates whose
errors often differ in the last bits, and a different summation order would flip some
of those comparisons. Products are also formed in ggml's order (w*l*x is (w*l)*x).

The searches follow llama.cpp's ggml-quants.c in shape and constants:

* symmetric_search       -- make_qx_quants: codes in [-nmax, nmax-1], scale refit by
                            weighted least squares from 19 starting scales
* symmetric_refine       -- make_q3_quants: the same first start, then coordinate descent
                            on single codes (Q3_K without importance)
* asymmetric_search      -- make_qkx2/qkx3_quants: codes in [0, nmax] with a min; scale
                            and min refit jointly over a sweep of starting scales
* positive_scale_search  -- make_qp_quants: quantize non-negative sub-block scales (or
                            mins) of a super-block against one float scale
"""

from __future__ import annotations

import numpy as np

from .common import F32, GROUP_MAX_EPS, round_half_even, safe_div


def columns(a: np.ndarray) -> np.ndarray:
    """(n_groups, size) -> contiguous (size, n_groups) float32."""
    return np.ascontiguousarray(np.asarray(a, dtype=F32).T)


def colsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 of a position-major array, position by position, in float32.

    numpy reduces axis 0 of a C-contiguous (m, n) array row after row -- sequentially --
    except when n == 1, where the lone column becomes the inner loop and is summed
    pairwise; a zero twin column keeps that case sequential too.
    """
    if a.shape[1] == 1:
        return np.add.reduce(np.concatenate([a, np.zeros_like(a)], axis=1), axis=0)[:1]
    return np.add.reduce(a, axis=0)


def seq_rowsum(a: np.ndarray) -> np.ndarray:
    """Row sums of (n, m) accumulated left to right in float32, as a C loop does."""
    return colsum(columns(a))


def first_absmax(xt: np.ndarray) -> np.ndarray:
    """Per column of (size, n), the first element of largest magnitude, with its sign."""
    idx = np.argmax(np.abs(xt), axis=0)
    return xt[idx, np.arange(xt.shape[1])]


def symmetric_search(x: np.ndarray, w: np.ndarray, nmax: int, steps: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Best weighted-least-squares scale for symmetric codes; returns (scale, codes + nmax).

    The element of largest magnitude goes to -nmax (the side with one more level), so the
    scale has the opposite sign of that element. Start scales are -(nmax + 0.1*s)/max for
    s in -steps..steps; each start fixes the codes, the codes fix the best scale
    sum(w x l)/sum(w l^2), and the start with the largest sum(w x l)^2/sum(w l^2)
    (= smallest weighted squared error) wins.
    """
    xt, wt = columns(x), columns(w)
    wxt = wt * xt
    mx = first_absmax(xt)
    live = np.abs(mx) >= GROUP_MAX_EPS
    mx = np.where(live, mx, F32(1))
    lo, hi = F32(-nmax), F32(nmax - 1)

    def fit(iscale):
        l = np.clip(round_half_even(iscale * xt), lo, hi)
        return l, colsum(wxt * l), colsum(wt * l * l)

    codes, sumlx, suml2 = fit(F32(-nmax) / mx)
    scale = safe_div(sumlx, suml2, suml2 > 0)
    best = scale * sumlx
    for s in range(-steps, steps + 1):
        if s == 0:
            continue
        trial, slx, sl2 = fit(-(F32(nmax) + F32(0.1) * F32(s)) / mx)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        if better.any():
            scale = np.where(better, safe_div(slx, sl2, better), scale)
            best = np.where(better, scale * slx, best)
            np.copyto(codes, trial, where=better)
    scale = np.where(live, scale, F32(0)).astype(F32)
    codes = np.where(live, codes + F32(nmax), F32(0))
    return scale, codes.T


def symmetric_refine(x: np.ndarray, nmax: int, passes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes by coordinate descent with weights x^2; returns (scale, codes + nmax).

    Starts from the max-magnitude scale -nmax/max, then visits each position in turn and
    moves its code to the one the other codes' best scale suggests, keeping the move if it
    raises sum(w x l)^2/sum(w l^2). Up to ``passes`` sweeps, stopping once a sweep changes
    nothing anywhere (a group that did not change would not change on a further sweep).
    """
    xt = columns(x)
    mx = first_absmax(xt)
    live = np.abs(mx) >= GROUP_MAX_EPS
    # The sweep compares products of eight powers of x (x^2 weights, squared sums), which
    # overflow float32 once |x| passes ~1e4. Every comparison and code is unchanged when
    # a group is scaled by a power of two, which is exact, so work on groups brought to
    # max |x| in [0.5, 1) and scale the result back.
    exp = np.frexp(np.where(live, mx, F32(1)))[1]
    xt = np.ldexp(xt, -exp).astype(F32)
    mx = np.where(live, np.ldexp(mx, -exp), F32(1)).astype(F32)
    lo, hi = F32(-nmax), F32(nmax - 1)
    wt = xt * xt
    wxt = wt * xt
    ct = np.clip(round_half_even((F32(-nmax) / mx) * xt), lo, hi)
    sumlx, suml2 = colsum(wxt * ct), colsum(wt * ct * ct)
    for _ in range(passes):
        changed = False
        for i in range(xt.shape[0]):
            li, wi, wxi = ct[i], wt[i], wxt[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            pos = slx > 0
            new = np.clip(round_half_even(xt[i] * sl2 / np.where(pos, slx, F32(1))), lo, hi)
            slx += wxi * new
            sl2 += wi * new * new
            take = pos & (new != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            if take.any():
                changed = True
                np.copyto(li, new, where=take)
                np.copyto(sumlx, slx, where=take)
                np.copyto(suml2, sl2, where=take)
        if not changed:
            break
    scale = np.where(live, np.ldexp(safe_div(sumlx, suml2, suml2 > 0), exp), F32(0)).astype(F32)
    codes = np.where(live, ct + F32(nmax), F32(0))
    return scale, codes.T


def asymmetric_search(
    x: np.ndarray,
    w: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool = False,
    want_codes: bool = False,
):
    """Scale and min for codes in [0, nmax] with x ~ scale*l + min, min <= 0.

    Returns (scale, -min, codes or None). The first fit maps [min(x, 0), max(x)] onto
    [0, nmax]. Then for each start iscale = (nmax + rmin + rdelta*s)/(max - min), s in
    0..nstep, the codes are fixed and scale and min refit by weighted least squares (min
    clamped to <= 0); a fit is kept when its weighted squared error (absolute error with
    ``use_mad``) beats the best so far. As in ggml, the next start uses the min of the
    best fit so far, so the sweep is sequential per group.
    """
    xt, wt = columns(x), columns(w)
    xmax = xt.max(axis=0)
    # The first smallest element, then clamped to <= 0 -- ggml's loop, down to a -0.0.
    mn = xt[np.argmin(xt, axis=0), np.arange(xt.shape[1])]
    mn = np.where(mn > 0, F32(0), mn)
    live = xmax > mn
    nm = F32(nmax)
    sum_w = colsum(wt)
    sum_x = colsum(wt * xt)

    def codes_at(iscale, out):
        np.subtract(xt, mn, out=out)
        out *= iscale
        np.rint(out, out=out)
        return np.clip(out, F32(0), nm, out=out)

    tmp, wl = np.empty_like(xt), np.empty_like(xt)  # scratch, reused by every candidate

    def error(a, m, l):
        diff = np.multiply(l, a, out=tmp)
        diff += m
        diff -= xt  # (a*l + m) - x, ggml's order
        if use_mad:
            np.abs(diff, out=diff)
        else:
            diff *= diff
        diff *= wt
        return colsum(diff)

    iscale = safe_div(nm, xmax - mn, live)
    scale = safe_div(F32(1), iscale, live)
    codes = codes_at(iscale, np.empty_like(xt))
    best = error(scale, mn, codes)
    trial = np.empty_like(xt)
    for s in range(nstep + 1):
        span = xmax - mn
        # After a refit the min can reach max; such a start gives all-zero codes,
        # which the determinant test below rejects.
        iscale = safe_div(F32(rmin) + F32(rdelta) * F32(s) + nm, span, span > 0)
        codes_at(iscale, trial)
        np.multiply(wt, trial, out=wl)
        sl = colsum(wl)
        sll = colsum(np.multiply(wl, trial, out=tmp))
        sxl = colsum(np.multiply(wl, xt, out=tmp))
        det = sum_w * sll - sl * sl
        ok = live & (det > 0)
        det = np.where(ok, det, F32(1))
        t_scale = (sum_w * sxl - sum_x * sl) / det
        t_min = (sll * sum_x - sl * sxl) / det
        clamp = t_min > 0
        t_min = np.where(clamp, F32(0), t_min)
        t_scale = np.where(clamp, sxl / np.where(sll > 0, sll, F32(1)), t_scale)
        err = error(t_scale, t_min, trial)
        better = ok & (err < best)
        if not better.any():
            continue
        best = np.where(better, err, best)
        scale = np.where(better, t_scale, scale).astype(F32)
        mn = np.where(better, t_min, mn).astype(F32)
        if want_codes:
            np.copyto(codes, trial, where=better)
    scale = np.where(live, scale, F32(0)).astype(F32)
    the_min = (-mn).astype(F32)
    if want_codes:
        return scale, the_min, np.where(live, codes, F32(0)).T
    return scale, the_min, None


def positive_scale_search(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """One float scale d and codes in [0, nmax] with x ~ d*l, for non-negative x.

    Used for the 4- or 6-bit sub-block scales and mins of a super-block, each weighted by
    its sub-block's total weight. Tries (nmax + 0.1*s)/max for s in -4..4 by weighted
    squared error, then runs coordinate descent on single codes as symmetric_refine does.
    Returns (d, codes).
    """
    xt = np.maximum(columns(x), F32(0))  # a negative fitted scale or min is noise: use 0
    wt = columns(w)
    mx = xt.max(axis=0)
    live = mx >= GROUP_MAX_EPS
    mx = np.where(live, mx, F32(1))
    nm = F32(nmax)

    def sq_error(iscale, clamp):
        l = round_half_even(iscale * xt)
        if clamp:
            l = np.minimum(l, nm)
        diff = xt - (F32(1) / iscale) * l
        return colsum(wt * diff * diff)

    iscale = nm / mx
    best = sq_error(iscale, clamp=False)
    for s in range(-4, 5):
        if s == 0:
            continue
        cand = (F32(0.1) * F32(s) + nm) / mx
        err = sq_error(cand, clamp=True)
        better = err < best
        best = np.where(better, err, best)
        iscale = np.where(better, cand, iscale)

    ct = np.minimum(round_half_even(iscale * xt), nm)
    wxt = wt * xt
    sumlx, suml2 = colsum(wxt * ct), colsum(wt * ct * ct)
    for _ in range(5):
        changed = False
        for i in range(xt.shape[0]):
            li, wi, wxi = ct[i], wt[i], wxt[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = np.minimum(round_half_even(xt[i] * sl2 / np.where(ok, slx, F32(1))), nm)
            slx += wxi * new
            sl2 += wi * new * new
            take = ok & (new != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            if take.any():
                changed = True
                np.copyto(li, new, where=take)
                np.copyto(sumlx, slx, where=take)
                np.copyto(suml2, sl2, where=take)
        if not changed:
            break
    d = np.where(live, safe_div(sumlx, suml2, suml2 > 0), F32(0)).astype(F32)
    return d, np.where(live, ct, F32(0)).T
