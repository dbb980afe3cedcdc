"""Token windows for evaluation and calibration, cut from one text under a fixed protocol.

The text is tokenized once (cached by tokenizer and text). Evaluation windows are taken
from the start of the token stream, calibration windows from its end, and the two never
overlap: a text too short for both is an error, not a silent overlap.

BOS: when the tokenizer adds a BOS token to its inputs (Gemma does, SmolLM2 does not), each
window is BOS followed by seq_len - 1 text tokens; otherwise a window is seq_len text
tokens. Windows are consecutive and non-overlapping.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..cache import atomic_path, cache_dir, text_hash
from ..errors import LowbitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    """The fixed evaluation and calibration protocol (see README, 'Evaluation protocol')."""

    seq_len: int = 512
    n_windows: int = 20
    n_calib: int = 32
    calib_len: int = 512
    bos: str = "auto"  # auto: as the tokenizer does; always; never

    def __post_init__(self) -> None:
        for name in ("seq_len", "n_windows", "n_calib", "calib_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (2 if name in ("seq_len", "calib_len") else 1):
                raise LowbitError(f"{name.replace('_', '-')} must be a positive integer (seq lengths at least 2), got {v!r}")
        if self.bos not in ("auto", "always", "never"):
            raise LowbitError(f"bos must be auto, always or never, got {self.bos!r}")

    def to_dict(self) -> dict:
        return {"name": "lowbit-ppl-v1", **asdict(self)}


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS before its inputs, judged by what it does
    (``tokenizer("a")`` with its default special tokens), or by ``add_bos_token``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception:  # an unusual tokenizer: fall back to what it declares
        ids = []
    if len(ids) > 0 and int(ids[0]) == int(bos):
        return True
    return bool(getattr(tokenizer, "add_bos_token", False))


def bos_id_for(tokenizer, protocol: Protocol) -> int | None:
    """The BOS id to put at the start of each window, or None."""
    if protocol.bos == "never":
        return None
    if protocol.bos == "auto" and not tokenizer_adds_bos(tokenizer):
        return None
    if tokenizer.bos_token_id is None:
        if protocol.bos == "always":
            raise LowbitError("bos=always but the tokenizer has no BOS token")
        return None
    return int(tokenizer.bos_token_id)


def bos_note(tokenizer, protocol: Protocol) -> str:
    """One line for a run's header: whether windows start with BOS, and why."""
    adds = bos_id_for(tokenizer, protocol) is not None
    if protocol.bos == "auto":
        why = "tokenizer adds it" if adds else "tokenizer does not add it"
    else:
        why = f"--bos {protocol.bos}"
    return f"BOS: {'added to each window' if adds else 'none'} ({why})"


def check_lengths(model, **lengths: int | None) -> None:
    """Refuse window lengths beyond the model's positions (``seq_len=..., calib_len=...``,
    named as their options), before a forward pass grows memory until the process dies."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    for name, value in lengths.items():
        if value is not None and value > limit:
            raise LowbitError(
                f"--{name.replace('_', '-')} {value} is longer than the model's {limit} positions (max_position_embeddings)"
            )


def _tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return text_hash(backend.to_str())
    return text_hash(type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text (no special tokens), cached on disk."""
    path = cache_dir("tokens") / f"{_tokenizer_key(tokenizer)}-{text_hash(text)}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
    tlog = logging.getLogger("transformers.tokenization_utils_base")
    level = tlog.level
    tlog.setLevel(logging.ERROR)  # the whole text is longer than the model's context: fine
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        tlog.setLevel(level)
    arr = np.asarray(ids, dtype=np.int32)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    return torch.from_numpy(arr.astype(np.int64))


def _windows(ids: torch.Tensor, n: int, length: int, bos_id: int | None, from_end: bool) -> torch.Tensor:
    body = length - (bos_id is not None)
    need = n * body
    chunk = ids[-need:] if from_end else ids[:need]
    w = chunk.reshape(n, body)
    if bos_id is not None:
        w = torch.cat([torch.full((n, 1), bos_id, dtype=w.dtype), w], dim=1)
    return w


def split_windows(
    ids: torch.Tensor, protocol: Protocol, bos_id: int | None, what: str = "text"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eval windows [n_windows, seq_len], calib windows [n_calib, calib_len]) from one
    token stream: evaluation from the start, calibration from the end, disjoint."""
    need_eval = protocol.n_windows * (protocol.seq_len - (bos_id is not None))
    need_cal = protocol.n_calib * (protocol.calib_len - (bos_id is not None))
    if need_eval + need_cal > ids.numel():
        raise LowbitError(
            f"{what} is too short: {ids.numel()} tokens, but {protocol.n_windows} evaluation windows need "
            f"{need_eval} and {protocol.n_calib} calibration windows need {need_cal} more (no overlap allowed)"
        )
    return (
        _windows(ids, protocol.n_windows, protocol.seq_len, bos_id, from_end=False),
        _windows(ids, protocol.n_calib, protocol.calib_len, bos_id, from_end=True),
    )


def eval_windows(ids: torch.Tensor, protocol: Protocol, bos_id: int | None, what: str = "text") -> torch.Tensor:
    need = protocol.n_windows * (protocol.seq_len - (bos_id is not None))
    if need > ids.numel():
        raise LowbitError(f"{what} is too short: {ids.numel()} tokens, {protocol.n_windows} windows of {protocol.seq_len} need {need}")
    return _windows(ids, protocol.n_windows, protocol.seq_len, bos_id, from_end=False)


def calib_windows(ids: torch.Tensor, protocol: Protocol, bos_id: int | None, what: str = "text") -> torch.Tensor:
    need = protocol.n_calib * (protocol.calib_len - (bos_id is not None))
    if need > ids.numel():
        raise LowbitError(f"{what} is too short: {ids.numel()} tokens, {protocol.n_calib} calibration windows of {protocol.calib_len} need {need}")
    return _windows(ids, protocol.n_calib, protocol.calib_len, bos_id, from_end=True)
