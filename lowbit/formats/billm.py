"""BiLLM's binarized weights (Huang et al., 2024): salient columns by residual binarization,
the rest split at a break point into two binarized groups.

Per block of ``group_size`` (128) input columns:

- **salient columns**, the same for every row of the matrix: the k columns of largest
  salience sum_rows w^2 · importance_j (BiLLM: importance 1 / [H^-1]_jj^2 from the GPTQ
  solve; uniform when none is given), k searched in 1 .. max_salient - 1 to minimise the
  block's importance-weighted squared error. Their weights are binarized twice ("residual
  approximation"): w ≈ (mu1 + a1·b1) + (mu2 + a2·b2), b ∈ {-1, +1}, with mean and scale
  per row taken over the salient entries, the second pair fitted to the first's residual.
- **the other weights** are split at a break point p of |w| (the same for every row of
  the block; searched among the 10th..90th percentiles of the non-salient |w|, 81 values, in float16):
  the concentrated ones (|w| < p) and the sparse ones (|w| >= p) each get their own
  mean and scale per row, w ≈ mu + a·b.

While searching, the non-salient weights are binarized in two passes (as the reference
does for the column count), then split at the break point. A sign b is +1 where
w - mu >= 0. Empty sets get mean and scale 0.

Codes (uint8 in memory): concentrated 0 + b, sparse 2 + b, salient 4 + 2·b1 + b2 (b as
0/1). Storage, exactly counted: two bits per weight (the sign and the group flag, or the
two salient signs), one bit per input column for the salient mask, the break point per
block in float16, and eight float16 numbers (mu, a for the four parts) per row and block:
2 + 128/128 = 3 bits per weight on a 128-wide block, where the paper's 1.08 counts only
the signs (1 per weight, 2 per salient weight). ``scale_dtype="int8"`` stores the eight
numbers as int8 against one float16 scale per row and block (0.5 + 0.125 bits per weight
instead of 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import LowbitError
from .base import Encoded, GroupLayout, WeightFormat, check_shape, pack_check, register
from .integer import torch_dtype
from .packing import pack, unpack

PERCENTILES = torch.linspace(0.10, 0.90, 81)


def binarize(w: torch.Tensor, m: torch.Tensor, passes: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual binarization of the entries of w [..., R, W] where m [..., R or 1, W] is
    true (leading dimensions broadcast: candidates side by side): (approximation [..., R, W]
    (0 outside m), means [..., R, passes], scales [..., R, passes])."""
    w, m = torch.broadcast_tensors(w, m.float())
    n = m.sum(-1).clamp(min=1)
    approx = torch.zeros_like(w)
    mus, alphas = [], []
    for _ in range(passes):
        r = (w - approx) * m
        mu = r.sum(-1) / n
        d = (r - mu.unsqueeze(-1)) * m
        a = d.abs().sum(-1) / n
        b = torch.where(d >= 0, 1.0, -1.0)
        approx = approx + (mu.unsqueeze(-1) + a.unsqueeze(-1) * b) * m
        mus.append(mu)
        alphas.append(a)
    return approx, torch.stack(mus, -1), torch.stack(alphas, -1)


def break_candidates(values: torch.Tensor) -> torch.Tensor:
    """The break points tried: the 10th..90th percentiles of |w|, rounded to the float16
    that stores the chosen one (so the search and the stored rule split alike)."""
    return torch.quantile(values.double(), PERCENTILES.double()).to(torch.float16).float().unique()


@register
@dataclass(frozen=True)
class BiLLMFormat(WeightFormat):
    kind = "billm"
    shares_rows: ClassVar[bool] = True  # the salient columns are one choice for all rows of a matrix
    column_params: ClassVar[bool] = True  # encode needs each column's place in its block (GPTQ's loop does not give it)
    method: ClassVar[str] = "billm"

    group_size: int | None = 128
    scale_dtype: str = "float16"  # or "int8": the eight numbers per row and block as int8 codes
    max_salient: int = 50  # salient column counts tried: 1 .. max_salient - 1 (the reference's up_lim)

    def __post_init__(self) -> None:
        if self.group_size is None or self.group_size < 2:
            raise LowbitError(f"BiLLM binarizes blocks of at least 2 columns (128 by default), got group size {self.group_size!r}")
        if self.scale_dtype != "int8":
            torch_dtype(self.scale_dtype)
        if not isinstance(self.max_salient, int) or self.max_salient < 1:
            raise LowbitError(f"BiLLM's max_salient must be a positive integer, got {self.max_salient!r}")

    def describe(self) -> str:
        return f"billm g{self.group_size}" + (" int8 scales" if self.scale_dtype == "int8" else "")

    # --- fit -------------------------------------------------------------------------------

    def fit(self, wg, mask=None, importance=None):
        rows, groups, width = wg.shape
        salient = torch.zeros(1, groups, width, dtype=torch.bool)
        brk = torch.zeros(1, groups, 1)
        mu = torch.zeros(rows, groups, 4)
        alpha = torch.zeros(rows, groups, 4)
        for g in range(groups):
            real = torch.ones(width, dtype=torch.bool) if mask is None else mask[g] > 0
            imp = torch.ones(width) if importance is None else importance[g].float()
            s, p, m4, a4 = self.fit_block(wg[:, g].float(), real, imp)
            salient[0, g], brk[0, g, 0], mu[:, g], alpha[:, g] = s, p, m4, a4
        return self.store_params(salient, brk, mu, alpha)

    def fit_block(self, w: torch.Tensor, real: torch.Tensor, imp: torch.Tensor):
        """One block w [R, W] (real: which columns exist): the salient columns, the break
        point, and per row the means and scales of (concentrated, sparse, salient 1, 2)."""
        rows, width = w.shape
        imp = torch.where(real, imp.clamp(min=0), 0.0).unsqueeze(0)
        w = w * real
        cols = int(real.sum())
        score = torch.where(real, (w.pow(2) * imp).sum(0), -1.0)
        order = torch.argsort(score, descending=True, stable=True)
        counts = list(range(1, max(min(self.max_salient, cols), 2)))
        ranks = torch.empty(width, dtype=torch.long)
        ranks[order] = torch.arange(width)
        chunk = max(1, 2**22 // max(rows * width, 1))  # candidates evaluated side by side

        def errors(q: torch.Tensor) -> torch.Tensor:  # [K, R, W] -> [K]
            return ((w - q).pow(2) * imp).sum((-1, -2))

        errs = []
        for c0 in range(0, len(counts), chunk):
            ks = torch.tensor([min(k, cols - 1) for k in counts[c0 : c0 + chunk]])
            s = (ranks.unsqueeze(0) < ks.unsqueeze(1)).unsqueeze(1)  # [K, 1, W]
            errs.append(errors(binarize(w, s, 2)[0] + binarize(w, real & ~s, 2)[0]))
        best_k = min(counts[int(torch.argmin(torch.cat(errs)))], cols - 1)
        sal = ranks < best_k
        q_sal, mu_s, a_s = binarize(w, sal.unsqueeze(0), 2)
        rest = (real & ~sal).unsqueeze(0).expand(rows, -1)
        vals = w.abs()[rest]
        brk_best, parts = 0.0, None
        if vals.numel():
            cands = break_candidates(vals)
            errs = []
            for c0 in range(0, len(cands), chunk):
                lo = rest & (w.abs() < cands[c0 : c0 + chunk].reshape(-1, 1, 1))  # [K, R, W]
                errs.append(errors(binarize(w, lo, 1)[0] + binarize(w, rest & ~lo, 1)[0] + q_sal))
            brk_best = float(cands[int(torch.argmin(torch.cat(errs)))])
            lo, hi = rest & (w.abs() < brk_best), rest & (w.abs() >= brk_best)
            _, mu_lo, a_lo = binarize(w, lo, 1)
            _, mu_hi, a_hi = binarize(w, hi, 1)
            parts = (mu_lo, a_lo, mu_hi, a_hi)
        if parts is None:
            z = torch.zeros(rows, 1)
            parts = (z, z, z, z)
        mu_lo, a_lo, mu_hi, a_hi = parts
        mu4 = torch.cat([mu_lo, mu_hi, mu_s], -1)
        a4 = torch.cat([a_lo, a_hi, a_s], -1)
        return sal, brk_best, mu4, a4

    def store_params(self, salient, brk, mu, alpha) -> dict[str, torch.Tensor]:
        """The parameters as stored (rounded to float16, or to int8 codes with a scale)."""
        brk = brk.to(torch.float16)
        if self.scale_dtype != "int8":
            dt = torch_dtype(self.scale_dtype)
            return {"salient": salient, "brk": brk, "mu": mu.to(dt), "alpha": alpha.to(dt)}
        both = torch.cat([mu, alpha], -1)  # [R, G, 8]
        step = (both.abs().amax(-1, keepdim=True) / 127).to(torch.float16)
        safe = torch.where(step.float() > 0, step.float(), 1.0)
        q = torch.round(both / safe).clamp(-127, 127).to(torch.int8)
        return {"salient": salient, "brk": brk, "q8": q, "step": step}

    def values(self, params) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, alpha) [R, G, 4] in float32, as decoding uses them."""
        if "q8" in params:
            both = params["q8"].float() * params["step"].float()
            return both[..., :4], both[..., 4:]
        return params["mu"].float(), params["alpha"].float()

    # --- rounding ----------------------------------------------------------------------------

    def encode(self, wg, params):
        """The code of each weight by BiLLM's rule: its column's class, then the signs."""
        mu, a = self.values(params)
        w = wg.float()
        sal = params["salient"].expand_as(w)
        hi = w.abs() >= params["brk"].float()
        m_ns = torch.where(hi, mu[..., 1:2], mu[..., 0:1])
        ns = (2 * hi + (w >= m_ns)).to(torch.uint8)
        b1 = w >= mu[..., 2:3]
        r = w - (mu[..., 2:3] + a[..., 2:3] * torch.where(b1, 1.0, -1.0))
        b2 = r >= mu[..., 3:4]
        s = (4 + 2 * b1 + b2).to(torch.uint8)
        return torch.where(sal, s, ns)

    def levels(self, params):
        mu, a = self.values(params)
        lo, hi = mu - a, mu + a  # [R, G, 4]: value of b = -1 / +1 per part
        sal = torch.stack([lo[..., 2] + lo[..., 3], lo[..., 2] + hi[..., 3], hi[..., 2] + lo[..., 3], hi[..., 2] + hi[..., 3]], -1)
        return torch.cat([lo[..., 0:1], hi[..., 0:1], lo[..., 1:2], hi[..., 1:2], sal], -1)

    # --- storage ------------------------------------------------------------------------------

    def pack(self, enc: Encoded) -> dict[str, torch.Tensor]:
        out = {
            "qweight": pack(enc.codes & 3, 2),
            "salient": pack(enc.params["salient"].reshape(1, -1).to(torch.uint8), 1),
            "brk": enc.params["brk"].reshape(-1).contiguous(),
        }
        keys = ("q8", "step") if self.scale_dtype == "int8" else ("mu", "alpha")
        out.update({k: enc.params[k].contiguous() for k in keys})
        return out

    def unpack(self, tensors, rows, cols, g_idx):
        keys = ("q8", "step") if self.scale_dtype == "int8" else ("mu", "alpha")
        pack_check(tensors, ["qweight", "salient", "brk", *keys], f"format {self.describe()}")
        n_groups = int(g_idx.max()) + 1 if g_idx.numel() else 1
        layout = GroupLayout(g_idx, n_groups)
        width = layout.width
        sal = unpack(tensors["salient"], 1, n_groups * width).reshape(1, n_groups, width).bool()
        brk = check_shape(tensors["brk"], (n_groups,), "brk").reshape(1, n_groups, 1)
        params = {"salient": sal, "brk": brk}
        if self.scale_dtype == "int8":
            params["q8"] = check_shape(tensors["q8"], (rows, n_groups, 8), "q8")
            params["step"] = check_shape(tensors["step"], (rows, n_groups, 1), "step")
        else:
            params["mu"] = check_shape(tensors["mu"], (rows, n_groups, 4), "mu")
            params["alpha"] = check_shape(tensors["alpha"], (rows, n_groups, 4), "alpha")
        for k, v in params.items():
            if v.is_floating_point() and not torch.isfinite(v.float()).all():
                raise LowbitError(f"format {self.describe()}: non-finite {k}")
        low = unpack(tensors["qweight"], 2, cols)
        sal_cols = layout.scatter(sal.expand(1, -1, -1).to(torch.uint8))[0].bool()
        codes = torch.where(sal_cols.unsqueeze(0), low + 4, low).to(torch.uint8)
        return Encoded(self, codes, params, g_idx.to(torch.int32))

    def signs_only_bits(self, enc: Encoded) -> float:
        """The paper's accounting: one bit per weight, two per salient weight, nothing else."""
        n = enc.codes.numel()
        return (n + int((enc.codes >= 4).sum())) / max(n, 1)
