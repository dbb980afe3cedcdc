"""The unquantized model's next-token distributions, recorded once, in a compact form.

KL(P || Q) at one position is  sum_i p_i log p_i  -  sum_i p_i log q_i.  A reference keeps,
per scored position, what is needed to compute it against any later model Q:

- the ``top_k`` most likely tokens of P with their log-probabilities (exact terms);
- ``samples`` token ids drawn from P restricted to the remaining tokens (its tail),
  with a fixed seed, and their log p: the mean of log p - log q over them, times the tail
  mass, estimates the tail's part of the KL without bias (and is exactly 0 when Q = P,
  so a model close to the reference gets a small error);
- the tail mass, and the argmax (top-1 agreement).

So the head of the distribution is exact and only the tail's part is estimated. With
128 + 128 tokens the file is 2 KB per position (21 MB for the protocol's 10,220 positions,
whatever the vocabulary), where the full float16 distributions were 1.0 GB for SmolLM2's
49,152 tokens and 5.4 GB for Gemma's 262,144. Measured on SmolLM2 against the full
computation (``benchmarks/reference_kl.py``, BENCHMARKS.md): RTN W4 0.35947 estimated as
0.35951, RTN W3 1.33725 as 1.33681, within 5e-4 nats. The estimate is a mean over
thousands of positions of independent unbiased terms, so its error shrinks with their
number.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from ..cache import atomic_path
from ..errors import LowbitError

FORMAT = "topk+tail-samples-v1"
TOP_K = 128
SAMPLES = 128
SEED = 0
POSITION_CHUNK = 128  # positions handled at once: bounds the [positions, vocab] temporaries


def compact_rows(logp: torch.Tensor, top_k: int, samples: int, generator: torch.Generator):
    """For log-probabilities [positions, vocab] (normalized): (ids [positions, top_k +
    samples] int32, their log-probabilities float32, tail mass [positions] float32,
    argmax int32)."""
    k = min(top_k, logp.shape[-1])
    head_lp, head_ids = logp.topk(k, dim=-1)
    tail_p = logp.exp().scatter_(-1, head_ids, 0.0)  # in place: one [positions, vocab] temporary, not four
    mass = tail_p.sum(-1)
    if samples and logp.shape[-1] > k:
        # positions whose tail is empty (all mass in the head) sample any token: weight 0
        empty = mass <= 0
        if bool(empty.any()):
            tail_p[empty] = 1.0
        drawn = torch.multinomial(tail_p, samples, replacement=True, generator=generator)
    else:
        drawn = head_ids[:, :0]
    ids = torch.cat([head_ids, drawn], dim=-1)
    return ids.to(torch.int32), logp.gather(-1, ids).float(), mass.float(), logp.argmax(-1).to(torch.int32)


def position_kl(ref_ids: torch.Tensor, ref_lp: torch.Tensor, tail_mass: torch.Tensor, logq: torch.Tensor, top_k: int) -> torch.Tensor:
    """KL(P || Q) per position from a compact reference row and the model's log q
    [positions, vocab]: exact over the head, the tail's part estimated from its samples."""
    diff = ref_lp - logq.gather(-1, ref_ids.long())
    head = (ref_lp[:, :top_k].exp() * diff[:, :top_k]).sum(-1)
    if diff.shape[-1] == top_k:
        return head
    return head + tail_mass * diff[:, top_k:].mean(-1)


class Reference:
    """A recorded reference (see module doc); arrays memory-mapped, read per window."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
            fmt = self.meta.get("reference_format", {})
            if fmt.get("name") != FORMAT:
                raise LowbitError(f"reference {self.folder} has format {fmt.get('name')!r}, expected {FORMAT}")
            self.top_k = int(fmt["top_k"])
            self.ids = np.load(self.folder / "ids.npy", mmap_mode="r", allow_pickle=False)
            self.logprobs = np.load(self.folder / "logprobs.npy", mmap_mode="r", allow_pickle=False)
            self.tail = np.load(self.folder / "tail.npy", mmap_mode="r", allow_pickle=False)
            self.argmax = np.load(self.folder / "argmax.npy", allow_pickle=False)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise LowbitError(f"reference {self.folder} is unreadable ({type(e).__name__}: {e}); delete it to record it again") from None

    @staticmethod
    def exists(folder: Path) -> bool:
        return (Path(folder) / "meta.json").is_file()

    def check(self, windows: torch.Tensor, vocab: int) -> None:
        n, length = windows.shape
        if self.argmax.shape != (n, length - 1) or int(self.ids.max(initial=0)) >= vocab:
            raise LowbitError(f"reference {self.folder} covers {self.argmax.shape} positions of a vocabulary it does not share with this model")

    def kl(self, i: int, logq: torch.Tensor, start: int = 0) -> torch.Tensor:
        """KL per position of window ``i`` against the model's log q [positions, vocab] of
        the positions from ``start`` on."""
        out = []
        for a in range(0, logq.shape[0], POSITION_CHUNK):
            b = min(a + POSITION_CHUNK, logq.shape[0])
            r = slice(start + a, start + b)
            out.append(position_kl(torch.from_numpy(np.array(self.ids[i, r])), torch.from_numpy(np.array(self.logprobs[i, r])),
                                   torch.from_numpy(np.array(self.tail[i, r])), logq[a:b], self.top_k))
        return torch.cat(out)


class Recorder:
    """Writes a Reference folder; it becomes visible only when complete."""

    def __init__(self, folder: Path, n: int, positions: int, vocab: int, meta: dict, top_k: int = TOP_K, samples: int = SAMPLES):
        # a vocabulary no larger than the head is kept whole: exact, nothing sampled
        self.top_k = min(top_k, vocab)
        self.samples = samples if vocab > self.top_k else 0
        width = self.top_k + self.samples
        self._ctx = atomic_path(folder, is_dir=True)
        self.tmp = self._ctx.__enter__()
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.ids = np.lib.format.open_memmap(self.tmp / "ids.npy", mode="w+", dtype=np.int32, shape=(n, positions, width))
        self.logprobs = np.lib.format.open_memmap(self.tmp / "logprobs.npy", mode="w+", dtype=np.float32, shape=(n, positions, width))
        self.tail = np.zeros((n, positions), dtype=np.float32)
        self.argmax = np.zeros((n, positions), dtype=np.int32)
        self.meta = {**meta, "reference_format": {"name": FORMAT, "top_k": self.top_k, "samples": self.samples, "seed": SEED}}
        self._draws: dict[int, torch.Generator] = {}  # the sampler of each window begun and not yet complete

    def write(self, i: int, logp: torch.Tensor, start: int = 0) -> None:
        """Record window ``i``'s normalized log-probabilities [positions, vocab] of the
        positions from ``start`` on; a window may come in pieces, in order, each a multiple of
        POSITION_CHUNK long but the last (the draws are then those of one whole call)."""
        draws = self._draws
        if start == 0:
            draws[i] = torch.Generator().manual_seed(SEED * 1_000_003 + i)  # the same draws on every run
        elif i not in draws:
            raise ValueError(f"window {i} continued at position {start} before it was started")
        g = draws[i]
        for a in range(0, logp.shape[0], POSITION_CHUNK):
            ids, lp, tail, top = compact_rows(logp[a : a + POSITION_CHUNK], self.top_k, self.samples, g)
            r = slice(start + a, start + a + ids.shape[0])
            self.ids[i, r], self.logprobs[i, r] = ids.numpy(), lp.numpy()
            self.tail[i, r], self.argmax[i, r] = tail.numpy(), top.numpy()
        if start + logp.shape[0] >= self.tail.shape[1]:
            del draws[i]  # the window is complete

    def close(self, ok: bool, result: dict | None = None) -> None:
        self.ids.flush()
        self.logprobs.flush()
        del self.ids, self.logprobs
        if ok:
            np.save(self.tmp / "tail.npy", self.tail, allow_pickle=False)
            np.save(self.tmp / "argmax.npy", self.argmax, allow_pickle=False)
            (self.tmp / "meta.json").write_text(json.dumps({**self.meta, "result": result}, indent=1))
            self._ctx.__exit__(None, None, None)
        else:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def prune(root: Path, max_bytes: int, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used reference folders under ``root`` until the rest
    fit in ``max_bytes`` (``keep`` is never removed). Returns what was removed."""
    folders = [f for f in root.iterdir() if f.is_dir() and not f.name.startswith(".")]
    folders.sort(key=lambda f: f.stat().st_mtime)
    sizes = {f: folder_bytes(f) for f in folders}
    total = sum(sizes.values())
    removed = []
    for f in folders:
        if total <= max_bytes:
            break
        if keep is not None and f.resolve() == Path(keep).resolve():
            continue
        shutil.rmtree(f, ignore_errors=True)
        total -= sizes[f]
        removed.append(f)
    return removed
