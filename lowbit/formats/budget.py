"""Splitting a bit budget: one choice per item (a layer's format, a group's width) with
the least total error within a total cost. Used by automatic bit allocation
(algorithms.allocate) and by the mixed-width format's per-group widths (formats.mixed)."""

from __future__ import annotations

from ..errors import LowbitError


def solve(table: dict[str, list[tuple[str, float, int]]], budget_bytes: float, units: int = 50_000) -> dict[str, int]:
    """layer -> index of its candidate: least total error with total bytes <= budget.

    A multiple-choice knapsack solved exactly by dynamic programming over bytes counted in
    units of (largest total / ``units``), each candidate's bytes rounded up to whole units
    so the plan always fits; the exact bytes that rounding leaves unused are then spent
    greedily on the upgrades that save the most error per byte."""
    import numpy as np

    names = list(table)
    smallest = sum(min(b for _, _, b in table[n]) for n in names)
    if smallest > budget_bytes:
        raise LowbitError(f"the budget ({budget_bytes:,.0f} bytes) is below the smallest candidates' total ({smallest:,} bytes)")
    largest = sum(max(b for _, _, b in table[n]) for n in names)
    unit = max(1, -(-largest // units))
    cap = int(min(budget_bytes, largest) // unit)
    inf = float("inf")
    best = np.zeros(cap + 1)  # least error of the layers so far within each number of units
    picks = []
    for n in names:
        nxt = np.full(cap + 1, inf)
        arg = np.full(cap + 1, -1, dtype=np.int16)
        for i, (_, e, b) in enumerate(table[n]):
            c = -(-b // unit)
            if c > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[c:] = best[: cap + 1 - c] + e
            better = cand < nxt
            nxt[better], arg[better] = cand[better], i
        best = nxt
        picks.append(arg)
    u = int(np.argmin(best))
    if not np.isfinite(best[u]):  # rounding up to units made the budget infeasible: the smallest candidates
        choice = {n: min(range(len(table[n])), key=lambda i: table[n][i][2]) for n in names}
    else:
        choice = {}
        for n, arg in zip(reversed(names), reversed(picks)):
            i = int(arg[u])
            choice[n] = i
            u -= -(-table[n][i][2] // unit)
    left = budget_bytes - sum(table[n][i][2] for n, i in choice.items())
    while True:
        top = None
        for n, i in choice.items():
            e0, b0 = table[n][i][1], table[n][i][2]
            for j, (_, e, b) in enumerate(table[n]):
                if e < e0 and b - b0 <= left:
                    gain = (e0 - e) / max(b - b0, 1)
                    if top is None or gain > top[0]:
                        top = (gain, n, j, b - b0)
        if top is None:
            return choice
        _, n, j, db = top
        choice[n] = j
        left -= db
