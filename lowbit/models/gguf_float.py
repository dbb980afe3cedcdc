"""A GGUF file as a float32 Hugging Face folder, written one tensor at a time.

transformers' own GGUF loading (``from_pretrained(..., gguf_file=...)``) dequantizes every
tensor into one state dict and then builds the model: two float32 copies of the model at
once (12 GB for Qwen2.5-1.5B, 560 GB for a 70B model). Here the same pieces of transformers
do the same conversion a tensor at a time: its config and tokenizer readers, its GGUF to
Hugging Face name map (``get_gguf_hf_weights_map``) and its per-architecture tensor
processors (Llama's reverse permutation of q/k, Gemma's norm offset), gguf-py's
``dequantize``. Each tensor's bytes are read with plain reads (a memory map would leave
every page read counted in the process's resident memory) and written to safetensors
shards of at most SHARD_BYTES with an index, as transformers writes large models, so the
peak is one shard plus one tensor, whatever the model's size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import LowbitError

log = logging.getLogger(__name__)

SHARD_BYTES = 500_000_000


def _shard_plan(tensors) -> list[list]:
    """GGUF tensors grouped into shards of at most SHARD_BYTES of float32 (a larger tensor
    alone), in file order."""
    shards, size = [[]], 0
    for t in tensors:
        nbytes = int(t.n_elements) * 4
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def _read(path: Path, t) -> np.ndarray:
    """A tensor's raw data as gguf-py's reader shapes it, read with a plain read."""
    shape = t.data.shape  # metadata of the reader's map; its pages are not touched
    with open(path, "rb") as f:
        f.seek(int(t.data_offset))
        raw = np.fromfile(f, dtype=np.uint8, count=int(t.n_bytes))
    if raw.size != int(t.n_bytes):
        raise LowbitError(f"{path} is truncated (tensor {t.name})")
    return raw.view(t.data.dtype).reshape(shape)


ROWS_BYTES = 32_000_000  # float32 bytes dequantized at once: gguf-py's numpy temporaries are several times the output


def _dequantize_rows(raw: np.ndarray, ttype, dequantize) -> np.ndarray:
    """gguf-py's dequantize, a slice of rows at a time into one float32 array."""
    if raw.ndim < 2:
        return dequantize(raw, ttype).astype(np.float32, copy=False)
    first = dequantize(raw[:1], ttype)
    row_bytes = 4 * first[0].size
    step = max(1, ROWS_BYTES // row_bytes)
    out = np.empty((raw.shape[0], *first.shape[1:]), dtype=np.float32)
    for a in range(0, raw.shape[0], step):
        out[a : a + step] = dequantize(raw[a : a + step], ttype)
    return out


def gguf_to_float32(gguf_path: Path, out: Path) -> None:
    """Write the float32 Hugging Face folder (config, tokenizer, sharded safetensors and
    index) of ``gguf_path`` into the folder ``out`` (which must exist and be empty)."""
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint

    from .loader import _apply_add_bos, gguf_add_bos

    where, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
    except Exception as e:  # transformers raises many kinds for unsupported or broken GGUFs
        raise LowbitError(f"transformers could not read GGUF {gguf_path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    _apply_add_bos(tokenizer, gguf_add_bos(gguf_path), str(gguf_path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    reader = GGUFReader(str(gguf_path))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed.get("config", {}))
    names = get_gguf_hf_weights_map(model, processor)
    shards = _shard_plan(reader.tensors)
    weight_map, total = {}, 0
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))] if len(shards) > 1 else ["model.safetensors"]
    for file, shard in zip(files, shards):
        tensors = {}
        for t in shard:
            weights = _dequantize_rows(_read(gguf_path, t), t.tensor_type, dequantize)
            res = processor.process(weights=weights, name=t.name, tensor_key_mapping=names, parsed_parameters=parsed)
            if res.name not in names:
                continue
            hf = names[res.name]
            tensors[hf] = torch.from_numpy(np.ascontiguousarray(res.weights, dtype=np.float32))
            weight_map[hf] = file
            total += tensors[hf].numel() * 4
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
    params = dict(model.named_parameters(remove_duplicate=False))
    stored = {id(params[k]) for k in weight_map if k in params}
    missing = [k for k, p in params.items() if k not in weight_map and id(p) not in stored]  # a tied head is stored once
    if missing:
        raise LowbitError(f"GGUF {gguf_path} has no tensor for {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)

