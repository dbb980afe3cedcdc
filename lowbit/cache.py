"""Where lowbit keeps what it derives once (fp32 model copies, cleaned text, token ids,
reference logits), and how it writes files so that nothing is ever left half-written."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$LOWBIT_CACHE`` or ``~/.cache/lowbit``, joined with ``parts`` and created."""
    root = Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path to write to; rename it to ``final`` only if the block
    completes. On any error the temporary is removed and ``final`` is left untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp if is_dir else tmp / final.name
    try:
        yield target
        if is_dir:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        else:
            os.replace(target, final)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_fingerprint(path: str | os.PathLike, edge: int = 1 << 20) -> str:
    """A cheap identity for a large file: size plus a hash of its first and last MiB."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(edge))
        if size > edge:
            f.seek(max(size - edge, edge))
            h.update(f.read(edge))
    return h.hexdigest()[:16]


def text_hash(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
