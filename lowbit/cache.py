"""Where lowbit keeps what it derives once (fp32 model copies, cleaned text, token ids,
reference logits), and how it writes files so that nothing is ever left half-written."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import LowbitError

log = logging.getLogger(__name__)


def cache_dir(*parts: str) -> Path:
    """``$LOWBIT_CACHE`` or ``~/.cache/lowbit``, joined with ``parts`` and created."""
    root = Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Fail now, in one line naming ``path``, if it could not be written later: a command
    calls this before its slow part, so a bad ``-o`` costs nothing. The nearest existing
    ancestor must be a folder this process may write to and enter."""
    given = path
    path = Path(path).expanduser().absolute()
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise LowbitError(f"cannot write {what} {given}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LowbitError(f"cannot write {what} {given}: folder {parent} is not writable")


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale(final: Path) -> None:
    """Remove temporaries ``.{name}.{pid}-XXXX.tmp`` left beside ``final`` by processes that
    died before renaming them (SIGKILL, power loss). A live process's are left alone."""
    prefix = f".{final.name}."
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return
    for p in siblings:
        name = p.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid, sep, _ = name[len(prefix) : -len(".tmp")].partition("-")
        if not sep or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        log.info("removing %s, left by process %s that did not finish", p, pid)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def _plain_modes(path: Path, umask: int) -> None:
    """Give ``path`` (and, for a folder, everything in it) the modes a plain ``mkdir`` or
    ``open`` would: some writers (safetensors) create their files 0600 whatever the umask."""
    paths = [path] if not path.is_dir() else [path, *path.rglob("*")]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path to write to; rename it to ``final`` only if the block
    completes. On any error the temporary is removed and ``final`` is left untouched.

    The temporary folder is ``.{name}.{pid}-XXXX.tmp``; leftovers of dead processes for the
    same name are removed first. What is written gets the modes a plain ``mkdir``/``open``
    would give (0777/0666 minus the umask), not mkdtemp's 0700 or safetensors' 0600. An OS
    error (read-only or full disk, a parent that is a file) becomes a LowbitError naming
    ``final``."""
    final = Path(final)
    tmp = None
    try:  # an interrupt from here on (even before the block starts) removes the temporary
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(final)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}-", suffix=".tmp", dir=final.parent))
            umask = _umask()
            os.chmod(tmp, 0o777 & ~umask)
        except OSError as e:
            raise LowbitError(f"cannot write {final}: {e.strerror or e}") from None
        target = tmp if is_dir else tmp / final.name
        try:
            yield target
            if target.exists():
                _plain_modes(target, umask)
            if is_dir:
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            else:
                os.replace(target, final)
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            where = str(e.filename or "")
            if where and not where.startswith((str(tmp), str(final))):
                raise  # not about the output (e.g. an input file the block reads)
            raise LowbitError(f"cannot write {final}: {e.strerror or e}") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def cache_lock(entry: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock (``.{name}.lock`` beside ``entry``) while this process makes a
    cache entry that another one might be making at the same moment: without it the second
    would replace the first's folder while the first already reads it. Callers check for
    the entry again once they hold the lock. No lock where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the platforms lowbit tests
        yield
        return
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
