"""Evaluation under the fixed protocol: perplexity, and KL divergence and top-1 agreement of
the next-token distributions against the unquantized model.

Every window of seq_len tokens scores its seq_len - 1 next-token predictions (tokens 1 ..
seq_len - 1 given the ones before them); perplexity is exp of the mean negative
log-likelihood over all scored tokens of all windows.

The unquantized model's distributions are recorded once as a ``Reference``
(lowbit.evaluation.reference: per position its 128 most likely tokens exactly, 128 tokens
drawn from the rest, and the argmax); KL(P_ref || P_model) is averaged over the scored
positions, in nats, exact over each distribution's head and estimated without bias over
its tail.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import LowbitError
from ..nn.qlinear import dequant_cache
from .reference import POSITION_CHUNK, Recorder, Reference

log = logging.getLogger(__name__)


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
    threads: int = 0  # torch threads the evaluation ran with

    def to_dict(self) -> dict:
        return asdict(self)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


# architectures whose causal-LM forward is the body, then lm_head, then nothing but an
# optional final tanh soft-cap: their log-probabilities can be made a chunk of positions at
# a time, so a large vocabulary (Gemma 3's 262,144) never holds a whole window's logits
HEAD_ONLY_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def _head_split(model):
    if getattr(model.config, "model_type", None) not in HEAD_ONLY_TYPES:
        return None
    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if body is None or head is None:
        return None
    return body, head, getattr(model.config, "final_logit_softcapping", None)


def window_logprobs(model, ids: torch.Tensor, hidden: torch.Tensor | None = None):
    """Yield (start, log-probabilities [batch, chunk, vocab]) of the next token at positions
    0 .. len-2 of ``ids`` [batch, len], in chunks of POSITION_CHUNK positions where the
    architecture allows (see HEAD_ONLY_TYPES), else all at once. ``hidden``: the body's
    output for ``ids`` when already computed (a streamed model's, see models.stream)."""
    split = _head_split(model)
    if split is None:
        yield 0, F.log_softmax(_logits(model, ids)[:, :-1], dim=-1)
        return
    body, head, cap = split
    if hidden is None:
        hidden = body(input_ids=ids, use_cache=False)[0]
    for a in range(0, ids.shape[1] - 1, POSITION_CHUNK):
        logits = head(hidden[:, a : min(a + POSITION_CHUNK, ids.shape[1] - 1)]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        yield a, F.log_softmax(logits, dim=-1)


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
    from ..models.stream import blockwise

    from ..models.stream import stream_of

    model.eval()
    try:
        with contextlib.nullcontext() if blockwise(model) else dequant_cache(model):  # block-wise: a block's cache at a time
            return _evaluate(model, windows, reference, record_to, record_meta, protocol, progress, batch_size)
    finally:
        if stream_of(model) is not None:
            stream_of(model).load_rest(model)  # the input embedding, dropped after its use: the model stays complete


def _streamed_body(model, windows, progress):
    """For a streamed model, or one marked block-wise (see models.stream): the body's
    output for all windows, run one block at a time (None where the architecture's head
    cannot run on it alone, after reading the whole model)."""
    from ..models.stream import blockwise, stream_of, streamed_hidden

    if not blockwise(model):
        return None
    if _head_split(model) is None:
        log.info("%s: no separate LM head; evaluating the whole model at once", type(model).__name__)
        if stream_of(model) is not None:
            stream_of(model).load_all(model)
        return None
    return streamed_hidden(model, windows, progress=progress)


def _evaluate(model, windows, reference, record_to, record_meta, protocol, progress, batch_size) -> EvalResult:
    start = time.perf_counter()
    body = _streamed_body(model, windows, progress)
    n, length = windows.shape
    recorder = None
    nll_sum, kl_sum, agree, count = 0.0, 0.0, 0, 0
    window_nll = []
    ok = False
    try:
        starts = range(0, n, batch_size)
        for i in progress(starts) if progress else starts:
            ids = windows[i : i + batch_size]
            target = ids[:, 1:]
            tok_nll = torch.empty(target.shape, dtype=torch.float64)
            for a, logp in window_logprobs(model, ids, None if body is None else body[i : i + batch_size]):
                b = a + logp.shape[1]
                if not torch.isfinite(logp).all():
                    raise LowbitError("the model produced NaN/inf logits")
                tok_nll[:, a:b] = -logp.gather(-1, target[:, a:b].unsqueeze(-1)).squeeze(-1).double()
                if record_to is not None:
                    if recorder is None:
                        recorder = Recorder(record_to, n, length - 1, logp.shape[-1], record_meta or {})
                    for j in range(ids.shape[0]):
                        recorder.write(i + j, logp[j], start=a)
                if reference is not None:
                    for j in range(ids.shape[0]):
                        kl_sum += float(reference.kl(i + j, logp[j], start=a).double().sum())
                    ref_top = torch.from_numpy(reference.argmax[i : i + ids.shape[0], a:b]).long()
                    agree += int((logp.argmax(-1) == ref_top).sum())
            nll_sum += float(tok_nll.sum())
            window_nll.extend(tok_nll.mean(-1).tolist())
            count += target.numel()
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
            threads=torch.get_num_threads(),
        )
        ok = True
    finally:
        if recorder is not None:
            recorder.close(ok, result.to_dict() if ok else None)
    return result
