"""Count a model's parameters without loading its weights."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LowbitError
from .loader import is_lowbit_checkpoint, resolve


def count_parameters(spec: str) -> tuple[int, str]:
    """(number of parameters, label) of a model spec or checkpoint, from headers only."""
    path = Path(spec)
    if is_lowbit_checkpoint(path) or (path.is_dir() and (path / "config.json").is_file()):
        return _count_from_config(path), f"{spec} (from config.json)"
    src = resolve(spec)
    if src.kind in ("embedded", "gguf"):
        from .gguf_read import open_gguf

        reader = open_gguf(Path(src.path))
        return int(sum(int(t.n_elements) for t in reader.tensors)), f"{spec} (from the GGUF tensor table)"
    raise LowbitError(f"cannot count the parameters of {spec} offline; give a local folder, a GGUF or a number")


def _count_from_config(folder: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot read {folder}/config.json ({str(e).splitlines()[0]})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # parameters() lists tied weights once
