"""Read what a lowbit checkpoint holds from its safetensors header, without loading it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..config import WeightSpec
from ..errors import LowbitError
from .checkpoint import WEIGHTS_FILE, read_meta, spec_from_stored


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(path: Path, name: str, v) -> tuple[int, int]:
    """(start, end) of one tensor entry, after checking dtype, shape and offsets agree."""
    if not isinstance(v, dict):
        raise LowbitError(f"{path}: corrupt safetensors entry for tensor {name} (not an object)")
    dtype, shape, off = v.get("dtype"), v.get("shape"), v.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        raise LowbitError(f"{path}: tensor {name} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise LowbitError(f"{path}: tensor {name} has a corrupt shape {shape!r}")
    if not isinstance(off, list) or len(off) != 2 or not all(_is_uint(o) for o in off) or off[0] > off[1]:
        raise LowbitError(f"{path}: tensor {name} has corrupt data_offsets {off!r}")
    count = 1
    for d in shape:
        count *= d
    if count * _DTYPE_BYTES[dtype] != off[1] - off[0]:
        raise LowbitError(f"{path}: tensor {name} of shape {shape} {dtype} does not match its {off[1] - off[0]} bytes")
    return off[0], off[1]


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's real size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LowbitError(f"{path} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise LowbitError(f"{path} is truncated (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LowbitError(f"{path} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise LowbitError(f"{path} has a corrupt safetensors header (not a JSON object)")
    spans = []
    for k, v in header.items():
        if k != "__metadata__":
            spans.append((*_check_entry(path, k, v), k))
    spans.sort()
    end = 0
    for lo, hi, k in spans:
        if lo < end:
            raise LowbitError(f"{path}: tensor {k} overlaps another tensor's bytes")
        end = hi
    if 8 + n + end > size:
        raise LowbitError(f"{path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}")
    return header


def inspect_checkpoint(folder: str | Path) -> dict:
    folder = Path(folder)
    meta = read_meta(folder)
    path = folder / WEIGHTS_FILE
    header = safetensors_header(path)
    nbytes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    rows = []
    qbytes = qweights = 0
    for name, e in meta["layers"].items():
        b = sum(v for k, v in nbytes.items() if k.startswith(name + "."))
        n = e["in_features"] * e["out_features"]
        w = e["weight"]
        fmt = spec_from_stored(WeightSpec, w, f"layer {name} weight").describe() if w else "float32 weights"
        if e["act"]:
            fmt += f" + A{e['act']['bits']} {'dynamic' if e['act']['dynamic'] else 'static'}"
        if w:
            qbytes += b - nbytes.get(name + ".bias", 0)
            qweights += n
        rows.append({"layer": name, "shape": [e["out_features"], e["in_features"]], "format": fmt, "bytes": b, "bits_per_weight": 8 * b / n})
    n_params = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        owner = k.rsplit(".", 1)[0]
        if owner in meta["layers"]:
            continue
        count = 1
        for d in v["shape"]:
            count *= d
        n_params += count
    n_params += sum(e["in_features"] * e["out_features"] for e in meta["layers"].values())
    file_bytes = path.stat().st_size
    q = meta.get("quantization", {})
    summary = {
        "n_quantized": len(rows),
        "quantized_bits_per_weight": 8 * qbytes / qweights if qweights else 0.0,
        "file_bytes": file_bytes,
        "n_params": n_params,
        "file_bits_per_param": 8 * file_bytes / max(n_params, 1),
        "config": q.get("method", "") + (" " + json.dumps(q.get("weight")) if q.get("weight") else ""),
    }
    return {"layers": rows, "summary": summary, "meta": meta}
