"""Content hashes of a checkpoint's safetensors file (safetensors itself has no checksum).

Stored in lowbit_config.json under "hashes":
    {"model.safetensors": {"algorithm": "sha256", "file": HEX, "header": HEX, "tensors": {name: HEX}}}
Loading checks the whole-file hash (one streamed pass); only on a mismatch are the header
and each tensor's byte range hashed, to say which part is damaged. The hashes depend on the
file's bytes only, so the same model gives the same lowbit_config.json.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from pathlib import Path

from ..errors import LowbitError

log = logging.getLogger(__name__)

ALGORITHM = "sha256"
CHUNK = 1 << 22  # 4 MiB


def _hash_range(f, start: int, end: int) -> str:
    h = hashlib.new(ALGORITHM)
    f.seek(start)
    left = end - start
    while left > 0:
        block = f.read(min(CHUNK, left))
        if not block:
            break  # short file: the digest differs, which is what the caller checks
        h.update(block)
        left -= len(block)
    return h.hexdigest()


def file_hash(path: Path) -> str:
    with open(path, "rb") as f:
        return _hash_range(f, 0, path.stat().st_size)


def _regions(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(end of the header, {tensor: (start, end) in the file}) from a checked header."""
    from .inspect import safetensors_header

    header = safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n, {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"}


def safetensors_hashes(path: Path) -> dict:
    """The hash record of one safetensors file, as stored in lowbit_config.json."""
    header_end, regions = _regions(path)
    with open(path, "rb") as f:
        tensors = {k: _hash_range(f, a, b) for k, (a, b) in sorted(regions.items())}
        header = _hash_range(f, 0, header_end)
    return {"algorithm": ALGORITHM, "file": file_hash(path), "header": header, "tensors": tensors}


def verify_file(path: Path, record) -> None:
    """Raise one LowbitError line naming the damaged part of ``path`` if it differs from ``record``."""
    if not isinstance(record, dict) or record.get("algorithm") != ALGORITHM or not isinstance(record.get("file"), str):
        raise LowbitError(f"{path}: its content hash record in lowbit_config.json is malformed")
    t0 = time.perf_counter()
    if file_hash(path) == record["file"]:
        log.debug("verified %s in %.2f s", path, time.perf_counter() - t0)
        return
    header = record.get("header")
    tensors = record.get("tensors")
    if not isinstance(tensors, dict):
        raise LowbitError(f"{path} is damaged: its content hash does not match the one recorded when it was written")
    header_end, regions = _regions(path)  # an unreadable header raises its own error (truncated, corrupt entry)
    with open(path, "rb") as f:
        if header is not None and _hash_range(f, 0, header_end) != header:
            raise LowbitError(f"{path} is damaged: its safetensors header differs from the one written")
        bad = sorted(k for k, (a, b) in regions.items() if tensors.get(k) != _hash_range(f, a, b))
    if set(regions) != set(tensors):
        bad = bad or sorted(set(regions) ^ set(tensors))
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise LowbitError(f"{path} is damaged: tensor data of {', '.join(bad[:3])}{more} differs from what was written")
    raise LowbitError(f"{path} is damaged: bytes outside any tensor (padding or trailing data) differ from what was written")
