"""Evaluation under the fixed protocol: perplexity, and KL divergence and top-1 agreement of
the next-token distributions against the unquantized model.

Every window of seq_len tokens scores its seq_len - 1 next-token predictions (tokens 1 ..
seq_len - 1 given the ones before them); perplexity is exp of the mean negative
log-likelihood over all scored tokens of all windows.

The unquantized model's distributions are recorded once as a ``Reference``: float16
log-probabilities per scored position (memory-mapped .npy) and the float32 argmax. KL(P_ref
|| P_model) is averaged over the same positions, in nats; the reference is renormalized in
float32 before use, so its float16 storage costs about 1e-4 nats at most.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cache import atomic_path
from ..errors import LowbitError
from ..nn.qlinear import dequant_cache


@dataclass
class EvalResult:
    ppl: float
    nll: float
    n_tokens: int
    kl: float | None = None
    top1: float | None = None
    seconds: float = 0.0
    protocol: dict = field(default_factory=dict)
    window_nll: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Reference:
    """Recorded next-token log-probabilities of the unquantized model (see module doc)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text())
        self.meta = meta
        self.logprobs = np.load(self.folder / "logprobs.npy", mmap_mode="r", allow_pickle=False)
        self.argmax = np.load(self.folder / "argmax.npy", allow_pickle=False)

    @staticmethod
    def exists(folder: Path) -> bool:
        return (Path(folder) / "meta.json").is_file()

    def check(self, windows: torch.Tensor, vocab: int) -> None:
        n, length = windows.shape
        if self.logprobs.shape != (n, length - 1, vocab):
            raise LowbitError(
                f"reference {self.folder} has shape {self.logprobs.shape}, expected {(n, length - 1, vocab)}"
            )


class _Recorder:
    """Writes a Reference folder; becomes visible only when complete."""

    def __init__(self, folder: Path, shape: tuple[int, int, int], meta: dict):
        self._ctx = atomic_path(folder, is_dir=True)
        self.tmp = self._ctx.__enter__()
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.logprobs = np.lib.format.open_memmap(self.tmp / "logprobs.npy", mode="w+", dtype=np.float16, shape=shape)
        self.argmax = np.zeros(shape[:2], dtype=np.int32)
        self.meta = meta

    def write(self, i: int, logp: torch.Tensor) -> None:
        self.logprobs[i : i + logp.shape[0]] = logp.to(torch.float16).numpy()
        self.argmax[i : i + logp.shape[0]] = logp.argmax(-1).numpy()

    def close(self, ok: bool, result: dict | None = None) -> None:
        if ok:
            self.logprobs.flush()
            del self.logprobs
            np.save(self.tmp / "argmax.npy", self.argmax, allow_pickle=False)
            (self.tmp / "meta.json").write_text(json.dumps({**self.meta, "result": result}, indent=1))
            self._ctx.__exit__(None, None, None)
        else:
            del self.logprobs
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


@torch.no_grad()
def evaluate(
    model,
    windows: torch.Tensor,
    reference: Reference | None = None,
    record_to: Path | None = None,
    record_meta: dict | None = None,
    protocol: dict | None = None,
    progress: Callable | None = None,
    batch_size: int = 1,
) -> EvalResult:
    """Perplexity of ``model`` on ``windows`` [n, seq_len]; KL and top-1 against
    ``reference`` when given; records this model as a reference to ``record_to`` if asked."""
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise LowbitError(f"evaluation needs windows of at least 2 tokens, got shape {tuple(windows.shape)}")
    model.eval()
    with dequant_cache(model):
        return _evaluate(model, windows, reference, record_to, record_meta, protocol, progress, batch_size)


def _evaluate(model, windows, reference, record_to, record_meta, protocol, progress, batch_size) -> EvalResult:
    start = time.perf_counter()
    n, length = windows.shape
    recorder = None
    nll_sum, kl_sum, agree, count = 0.0, 0.0, 0, 0
    window_nll = []
    ok = False
    try:
        starts = range(0, n, batch_size)
        for i in progress(starts) if progress else starts:
            ids = windows[i : i + batch_size]
            logp = F.log_softmax(_logits(model, ids)[:, :-1], dim=-1)
            if not torch.isfinite(logp).all():
                raise LowbitError("the model produced NaN/inf logits")
            target = ids[:, 1:]
            tok_nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).double()
            nll_sum += float(tok_nll.sum())
            window_nll.extend(tok_nll.mean(-1).tolist())
            count += target.numel()
            if record_to is not None:
                if recorder is None:
                    recorder = _Recorder(record_to, (n, length - 1, logp.shape[-1]), record_meta or {})
                recorder.write(i, logp)
            if reference is not None:
                ref = torch.from_numpy(np.array(reference.logprobs[i : i + ids.shape[0]])).float()
                # KL of the renormalized reference p/Z in one pass over exp:
                # sum p/Z (log p - log Z - log q) = sum p (log p - log q) / Z - log Z
                p = ref.exp()
                z = p.sum(-1)
                kl = (p * (ref - logp)).sum(-1) / z - z.log()
                kl_sum += float(kl.double().sum())
                ref_top = torch.from_numpy(reference.argmax[i : i + ids.shape[0]]).long()
                agree += int((logp.argmax(-1) == ref_top).sum())
        nll = nll_sum / count
        result = EvalResult(
            ppl=math.exp(nll),
            nll=nll,
            n_tokens=count,
            kl=kl_sum / count if reference is not None else None,
            top1=agree / count if reference is not None else None,
            seconds=time.perf_counter() - start,
            protocol=protocol or {},
            window_nll=window_nll,
        )
        ok = True
    finally:
        if recorder is not None:
            recorder.close(ok, result.to_dict() if ok else None)
    return result
