"""What every in-process benchmark on the embedded model starts with."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent


def code_version() -> str:
    """The short commit of the checkout the benchmark runs from."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_rows(path: Path, fresh: bool = False) -> dict:
    """A benchmark's saved rows ({"rows": {...}, ...}); empty when fresh or not yet written."""
    if path.exists() and not fresh:
        return json.loads(path.read_text())
    return {"rows": {}}


def save_rows(path: Path, result: dict, done: Callable[[dict], bool] | None = None) -> None:
    """Write the rows atomically. With ``done``, rows another run of the script saved
    meanwhile are kept, unless this run has a finished row (``done(row)``) for the key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if done is not None and path.exists():
        on_disk = json.loads(path.read_text()).get("rows", {})
        result["rows"] = {**on_disk, **{k: v for k, v in result["rows"].items() if done(v) or k not in on_disk}}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def smollm2_setup(threads: int) -> SimpleNamespace:
    """smollm2-135m in float32 with the protocol's windows and its cached float reference:
    model, tok, info, protocol, evals, calib, ref (Reference), base (the float EvalResult)."""
    torch.set_num_threads(threads)
    import lowbit
    from lowbit.calibration.data import Protocol

    protocol = Protocol()
    model, tok, info = lowbit.load("smollm2-135m")
    evals, calib = lowbit.prepare_windows(tok, protocol)
    ref, base = lowbit.reference_for(model, info["source"]["fingerprint"], evals, protocol, progress=False)
    return SimpleNamespace(model=model, tok=tok, info=info, protocol=protocol, evals=evals, calib=calib, ref=ref, base=base)
