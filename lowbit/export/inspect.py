"""Read what a lowbit checkpoint holds from its safetensors header, without loading it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..config import WeightSpec
from ..errors import LowbitError
from .checkpoint import WEIGHTS_FILE, read_meta


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
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
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
        fmt = WeightSpec(**w).describe() if w else "float32 weights"
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
