"""Models whose decoder blocks stay on disk until the work reaches them.

``load_streamed(folder)`` builds the model from its config with every parameter of the
decoder blocks on torch's meta device (shapes, no memory) and loads the rest (embeddings,
the final norm, the LM head) from the folder's safetensors. A ``WeightStream`` attached to
the model knows which file holds each tensor; ``stream.loaded(block, prefix)`` reads one
block's tensors (as float32) for the duration, ``stream.load(...)`` keeps them.

The runner loads each block when it reaches it and keeps it (quantized); ``lowbit eval``
runs the model block by block over all windows (``streamed_hidden``), so a forward never
needs more than one block's float weights besides the embeddings, also after quantization
(each quantized block is dequantized only while it runs). Buffers (rotary frequencies, Gemma's embedding
scale) are computed at construction as usual: only parameters wait on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import LowbitError

log = logging.getLogger(__name__)

STREAM_ATTR = "_lowbit_stream"


def stream_of(model: nn.Module) -> WeightStream | None:
    """The model's WeightStream, or None for an ordinary (fully loaded) model."""
    return getattr(model, STREAM_ATTR, None)


BLOCKWISE_ATTR = "_lowbit_blockwise"


def evaluate_blockwise(model: nn.Module) -> None:
    """Evaluate this (fully loaded) model a block at a time too, as a streamed one: each
    quantized block is dequantized only while it runs (a lowbit checkpoint)."""
    setattr(model, BLOCKWISE_ATTR, True)


def blockwise(model: nn.Module) -> bool:
    """Whether evaluation runs the model a block at a time over all windows."""
    return stream_of(model) is not None or bool(getattr(model, BLOCKWISE_ATTR, False))


def is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, where the data starts) of a
    safetensors file, every offset checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise LowbitError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise LowbitError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    for name, entry in header.items():
        a, b = entry.get("data_offsets", (0, -1))
        if entry.get("dtype") not in _DTYPES or not 0 <= a <= b or 8 + n + b > size:
            raise LowbitError(f"{path}: corrupt safetensors entry for tensor {name}")
    return header, 8 + n


def read_tensor(path: Path, header: dict, start: int, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, read into memory of its own. safetensors' own
    reader maps the whole file, and every page a read touches then counts in the
    process's resident memory as long as the map lives (1.7 GB to scan Gemma-3-270M's
    float32 file); a plain read leaves those pages to the page cache."""
    entry = header[name]
    a, b = entry["data_offsets"]
    buf = torch.empty(b - a, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(start + a)
        if f.readinto(buf.numpy()) != b - a:
            raise LowbitError(f"{path} is truncated (tensor {name})")
    return buf.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index where there is one."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise LowbitError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        return {k: folder / v for k, v in weight_map.items()}
    files: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        files.update({k: f for k in safetensors_header(f)[0]})
    if not files:
        raise LowbitError(f"model folder {folder} has no *.safetensors weights")
    return files


class WeightStream:
    """Reads a model's parameters from safetensors files, a module at a time."""

    def __init__(self, folder: str | Path, what: str):
        self.folder = Path(folder)
        self.what = what
        self.files = _tensor_files(self.folder)
        self._headers: dict[Path, tuple[dict, int]] = {}
        self.loads = 0  # tensors read so far (tests check that blocks are read when reached)

    @staticmethod
    def _holders(module: nn.Module, prefix: str, skip=frozenset()) -> dict[int, list[tuple[nn.Module, str, str]]]:
        """Parameters of ``module`` on the meta device (but those whose id is in skip), by
        identity (a tied weight once), each with every (owner, attribute, full name) that
        holds it."""
        held: dict[int, list] = {}
        for sub_name, sub in module.named_modules(remove_duplicate=False):
            for k, p in sub._parameters.items():
                if p is not None and is_meta(p) and id(p) not in skip:
                    full = ".".join(x for x in (prefix, sub_name, k) if x)
                    held.setdefault(id(p), []).append((sub, k, full))
        return held

    def read(self, key: str) -> torch.Tensor:
        path = self.files[key]
        if path not in self._headers:
            if not path.is_file():
                raise LowbitError(f"{self.what}: {path} (named in the index for tensor {key}) does not exist")
            self._headers[path] = safetensors_header(path)
        header, start = self._headers[path]
        if key not in header:
            raise LowbitError(f"{self.what}: tensor {key} is not in {path} (the index says it is)")
        return read_tensor(path, header, start, key)

    def check_finite(self) -> None:
        """Refuse NaN/inf anywhere in the files, naming the first such tensor: read once,
        a tensor at a time, at load, so a bad block fails before any work starts."""
        from .loader import nonfinite_count

        for key in self.files:
            t = self.read(key)
            bad = nonfinite_count(t) if t.is_floating_point() else 0
            del t  # before the next read: two embeddings at once would be the load's peak
            if bad:
                raise LowbitError(f"model {self.what}: tensor {key} has {bad} NaN/inf values")

    def load(self, module: nn.Module, prefix: str = "", skip=frozenset()) -> int:
        """Read every parameter of ``module`` (dotted name ``prefix`` in the model) that
        is still on the meta device (but those whose id is in skip), as float32; returns
        the bytes read."""
        held = self._holders(module, prefix, skip)
        total = 0
        for owners in held.values():
            names = [full for _, _, full in owners]
            key = next((n for n in names if n in self.files), None)
            if key is None:
                raise LowbitError(f"{self.what}: tensor {names[0]} is not in {self.folder}'s safetensors files")
            t = self.read(key)
            meta = owners[0][0]._parameters[owners[0][1]]
            if tuple(t.shape) != tuple(meta.shape):
                raise LowbitError(f"{self.what}: tensor {key} in {self.files[key].name} has shape {tuple(t.shape)}, the model expects {tuple(meta.shape)}")
            param = nn.Parameter(t.to(torch.float32), requires_grad=meta.requires_grad)
            for sub, k, _ in owners:
                sub._parameters[k] = param
            total += t.numel() * 4
            self.loads += 1
        return total

    @staticmethod
    def unload(module: nn.Module) -> None:
        """Put the module's parameters back on the meta device (their memory is freed
        once nothing else holds them)."""
        for sub in module.modules():
            for k, p in sub._parameters.items():
                if p is not None and not is_meta(p):
                    sub._parameters[k] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)

    @contextlib.contextmanager
    def loaded(self, module: nn.Module, prefix: str) -> Iterator[None]:
        """The module's parameters for the duration; back on disk afterwards."""
        fresh = bool(self._holders(module, prefix))
        self.load(module, prefix)
        try:
            yield
        finally:
            if fresh:
                self.unload(module)
                from .loader import release_free_memory

                release_free_memory()  # else glibc keeps the block's freed pages and activations: 20 MB more per block on Gemma-3-270M

    def load_rest(self, model: nn.Module, head: bool = True) -> None:
        """Read what is on disk outside the decoder blocks (what ``before_blocks`` and
        ``drop_input_embedding`` dropped); head=False leaves an untied LM head on disk."""
        from .arch import decoder_layers

        _, layers = decoder_layers(model)
        skip = {id(p) for p in layers.parameters()}
        if not head and _untied_head(model) is not None:
            skip.add(id(_untied_head(model).weight))
        self.load(model, "", skip=skip)

    def before_blocks(self, model: nn.Module) -> None:
        """What making the first block's inputs needs, and no more: everything outside
        the blocks but an untied LM head (Qwen2.5-1.5B's is 0.9 GB), which waits on disk."""
        head = _untied_head(model)
        if head is not None:
            self.unload(head)
        self.load_rest(model, head=False)

    def drop_input_embedding(self, model: nn.Module) -> None:
        """Put an untied input embedding back on disk once the first block's inputs are
        made (0.9 GB for Qwen2.5-1.5B)."""
        if _untied_head(model) is None:
            return
        self.unload(model.get_input_embeddings())
        from .loader import release_free_memory

        release_free_memory()

    def load_all(self, model: nn.Module) -> None:
        """Read everything still on disk: the model becomes an ordinary one."""
        self.load(model, "")
        if hasattr(model, STREAM_ATTR):
            delattr(model, STREAM_ATTR)


def _untied_head(model: nn.Module) -> nn.Module | None:
    """The LM head when it does not share the input embedding's weight, else None."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return None if head is None or head.weight is emb.weight else head


def load_streamed(folder: str | Path, what: str) -> nn.Module:
    """A float32 causal LM from a Hugging Face folder, its decoder blocks left on disk."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise LowbitError(f"could not read the config of {what} {folder}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if hasattr(config, "quantization_config"):
        raise LowbitError(f"{what} {folder} is a quantized model ({config.quantization_config.get('quant_method', '?') if isinstance(config.quantization_config, dict) else '?'}); lowbit streams float models only")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # built empty, a tied head is its own meta tensor until tied again
    stream = WeightStream(folder, what)
    stream.check_finite()
    stream.before_blocks(model)  # everything but the blocks and an untied head, now
    setattr(model, STREAM_ATTR, stream)
    model.eval()
    return model


def streamed_hidden(model: nn.Module, windows: torch.Tensor, batch: int = 1, progress: Callable | None = None) -> torch.Tensor:
    """The body's final hidden states (after the final norm) for all windows [n, len, d],
    computed one block at a time: block i is read (unless it is in memory already), run on
    every window, ``batch`` windows per call (1: each window alone, as a whole-model
    evaluation runs them; dynamic per-tensor activation scales depend on it), and dropped.
    A quantized block keeps its dequantized weights only while it runs."""
    from ..nn.qlinear import dequant_cache
    from ..runner import _first, _rows, capture_layer_inputs
    from .arch import decoder_layers

    stream = stream_of(model)
    prefix, layers = decoder_layers(model)
    with torch.no_grad():
        if stream is not None:
            stream.before_blocks(model)
        hidden, kwargs = capture_layer_inputs(model, layers, windows)
        if stream is not None:
            stream.drop_input_embedding(model)
        n = hidden.shape[0]
        steps = range(len(layers))
        for i in progress(steps) if progress else steps:
            cm = stream.loaded(layers[i], f"{prefix}.{i}") if stream is not None else contextlib.nullcontext()
            with cm, dequant_cache(layers[i]):
                hidden = torch.cat([_first(layers[i](hidden[a : a + batch], **_rows(kwargs[i], n, a, a + batch)))
                                    for a in range(0, n, batch)])
        if stream is not None:
            stream.load_rest(model)  # the head, now that the input embedding is off again
        return model.model.norm(hidden)
