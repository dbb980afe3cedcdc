"""Weighted scale searches used by the k-quants, IQ4_NL and the legacy importance path.

Each function works on many groups at once: ``x`` and ``w`` are (n_groups, group_size)
float32 and every per-group quantity is an (n_groups,) array. Where llama.cpp walks a
short list of candidate scales, or sweeps the elements of a group a few times, we loop in
Python over those candidates or positions and vectorize over the groups.

The searches follow llama.cpp's ggml-quants.c in shape and constants:

* symmetric_search         -- make_qx_quants:  codes in [-nmax, nmax-1], scale refit by
                              weighted least squares, 18 perturbed starting scales
* symmetric_refine         -- make_q3_quants:  the same start, then coordinate descent on
                              single codes (Q3_K without importance)
* asymmetric_search        -- make_qkx2/qkx3_quants: codes in [0, nmax] with a min,
                              scale and min refit jointly over a sweep of start scales
* positive_scale_search    -- make_qp_quants:  quantize the non-negative sub-block scales
                              (or mins) of a super-block against one float scale

Sums are float32 as in ggml; only the tiny per-group normal equations of the asymmetric
fit use float64, which changes nothing but the last bits of a comparison.
"""

from __future__ import annotations

import numpy as np

from .common import F32, GROUP_MAX_EPS, round_half_even, safe_div, signed_absmax


# Row sums through einsum: several times faster than ndarray.sum(axis=1) on short rows.
def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


def _rowsum(a: np.ndarray) -> np.ndarray:
    return np.einsum("ij->i", a)


def symmetric_search(x: np.ndarray, w: np.ndarray, nmax: int, steps: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Best weighted-least-squares scale for symmetric codes; returns (scale, codes+nmax).

    The element of largest magnitude is mapped to -nmax (the side with one more level),
    so scales come out with the opposite sign of that element. Start scales are
    -(nmax + 0.1*s)/max for s in -steps..steps; each start fixes the codes, the codes fix
    the best scale sum(w x l)/sum(w l^2), and the start with the largest
    sum(w x l)^2/sum(w l^2) (= smallest weighted error) wins.
    """
    mx = signed_absmax(x)
    live = np.abs(mx) >= GROUP_MAX_EPS
    mx = np.where(live, mx, F32(1))
    lo, hi = F32(-nmax), F32(nmax - 1)

    def codes_for(iscale):
        return np.clip(round_half_even(iscale[:, None] * x), lo, hi)

    codes = codes_for(F32(-nmax) / mx)
    wl = w * codes
    sumlx, suml2 = _rowdot(wl, x), _rowdot(wl, codes)
    scale = safe_div(sumlx, suml2, suml2 > 0)
    best = scale * sumlx
    for s in range(-steps, steps + 1):
        if s == 0:
            continue
        trial = codes_for(-(F32(nmax) + F32(0.1) * F32(s)) / mx)
        wl = w * trial
        slx, sl2 = _rowdot(wl, x), _rowdot(wl, trial)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        scale = np.where(better, safe_div(slx, sl2, better), scale)
        best = np.where(better, scale * slx, best)
        codes = np.where(better[:, None], trial, codes)
    scale = np.where(live, scale, F32(0))
    codes = np.where(live[:, None], codes + F32(nmax), F32(0))
    return scale.astype(F32), codes


def symmetric_refine(x: np.ndarray, nmax: int, passes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes by coordinate descent with weights x^2; returns (scale, codes+nmax).

    Starts from the max-magnitude scale -nmax/max, then visits each position in turn and
    moves its code to the value the other codes' best scale suggests, keeping the move if
    it raises sum(w x l)^2/sum(w l^2). Up to ``passes`` sweeps, stopping once a sweep
    changes nothing anywhere.
    """
    mx = signed_absmax(x)
    live = np.abs(mx) >= GROUP_MAX_EPS
    mx = np.where(live, mx, F32(1))
    lo, hi = F32(-nmax), F32(nmax - 1)
    w = x * x
    wx = w * x
    codes = np.clip(round_half_even((F32(-nmax) / mx)[:, None] * x), lo, hi)
    sumlx, suml2 = _rowdot(wx, codes), _rowdot(w * codes, codes)
    # Position-major copies, so that each step of the sweep reads contiguous memory.
    xt, wt, wxt, ct = (np.ascontiguousarray(a.T) for a in (x, w, wx, codes))
    with np.errstate(divide="ignore", invalid="ignore"):
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
    scale = np.where(live, safe_div(sumlx, suml2, suml2 > 0), F32(0))
    codes = np.where(live[:, None], ct.T + F32(nmax), F32(0))
    return scale.astype(F32), codes


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
    f64 = np.float64
    xmax = x.max(axis=1)
    mn = np.minimum(x.min(axis=1), F32(0))
    live = xmax > mn
    nm = F32(nmax)
    wx = w * x
    sum_w = _rowsum(w).astype(f64)
    sum_x = _rowsum(wx).astype(f64)

    def codes_at(iscale, out):
        np.subtract(x, mn[:, None], out=out)
        out *= iscale[:, None]
        np.rint(out, out=out)
        return np.clip(out, F32(0), nm, out=out)

    def error(a, m, l, sl, sll, sxl):
        if use_mad:
            diff = a.astype(F32)[:, None] * l + m.astype(F32)[:, None] - x
            return _rowdot(w, np.abs(diff, out=diff)).astype(f64)
        # sum w (a l + m - x)^2 expanded, minus the constant sum w x^2: every term is a
        # per-group sum we already have, so no extra pass over the elements is needed.
        return a * a * sll + 2 * a * m * sl - 2 * a * sxl + m * m * sum_w - 2 * m * sum_x

    def sums(l):
        wl = w * l
        return _rowsum(wl).astype(f64), _rowdot(wl, l).astype(f64), _rowdot(wx, l).astype(f64)

    span = np.where(live, xmax - mn, F32(1))
    iscale = nm / span
    scale = (F32(1) / iscale).astype(F32)
    codes = codes_at(iscale, np.empty_like(x))
    best = error(scale.astype(f64), mn.astype(f64), codes, *sums(codes))
    trial = np.empty_like(x)
    for s in range(nstep + 1):
        span = xmax - mn
        # After a refit the min can reach max; such a start gives all-zero codes (rejected).
        ok_span = span > 0
        iscale = safe_div(F32(rmin) + F32(rdelta) * F32(s) + nm, span, ok_span)
        codes_at(iscale, trial)
        sl, sll, sxl = sums(trial)
        det = sum_w * sll - sl * sl
        ok = live & (det > 0)
        det = np.where(ok, det, 1.0)
        t_scale = (sum_w * sxl - sum_x * sl) / det
        t_min = (sll * sum_x - sl * sxl) / det
        clamp = t_min > 0
        t_min = np.where(clamp, 0.0, t_min)
        t_scale = np.where(clamp, sxl / np.where(sll > 0, sll, 1.0), t_scale)
        # Round the fit to float32 first: that is what would be stored and compared.
        t_scale, t_min = t_scale.astype(F32).astype(f64), t_min.astype(F32).astype(f64)
        err = error(t_scale, t_min, trial, sl, sll, sxl)
        better = ok & (err < best)
        if not better.any():
            continue
        best = np.where(better, err, best)
        scale = np.where(better, t_scale, scale).astype(F32)
        mn = np.where(better, t_min, mn).astype(F32)
        if want_codes:
            codes = np.where(better[:, None], trial, codes)
    scale = np.where(live, scale, F32(0)).astype(F32)
    the_min = (-mn).astype(F32)
    if want_codes:
        return scale, the_min, np.where(live[:, None], codes, F32(0))
    return scale, the_min, None


def positive_scale_search(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """One float scale d and codes in [0, nmax] with x ~ d*l, for non-negative x.

    Used for the 4- or 6-bit sub-block scales and mins of a super-block, weighted by each
    sub-block's total weight. Tries (nmax + 0.1*s)/max for s in -4..4 by weighted squared
    error, then runs coordinate descent on single codes as symmetric_refine does.
    Returns (d, codes).
    """
    x = np.maximum(x, F32(0))  # a negative fitted scale or min is noise; treat it as 0
    mx = x.max(axis=1)
    live = mx >= GROUP_MAX_EPS
    mx = np.where(live, mx, F32(1))
    nm = F32(nmax)

    def sq_error(iscale, clamp):
        l = round_half_even(iscale[:, None] * x)
        if clamp:
            l = np.minimum(l, nm)
        diff = x - (F32(1) / iscale)[:, None] * l
        return (w * diff * diff).sum(axis=1)

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

    codes = np.minimum(round_half_even(iscale[:, None] * x), nm)
    wx = w * x
    sumlx, suml2 = _rowdot(wx, codes), _rowdot(w * codes, codes)
    for _ in range(5):
        changed = False
        for i in range(x.shape[1]):
            li, wi, wxi = codes[:, i], w[:, i], wx[:, i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = np.minimum(round_half_even(safe_div(x[:, i] * sl2, slx, ok)), nm)
            slx = slx + wxi * new
            sl2 = sl2 + wi * new * new
            take = ok & (new != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            if take.any():
                changed = True
                codes[:, i] = np.where(take, new, li)
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
        if not changed:
            break
    d = np.where(live, safe_div(sumlx, suml2, suml2 > 0), F32(0)).astype(F32)
    codes = np.where(live[:, None], codes, F32(0))
    return d, codes
