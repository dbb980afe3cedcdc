"""The lowbit checkpoint: a folder that reloads to exactly the in-memory quantized model.

    OUT/
      model.safetensors    packed codes, scales, zero points, float tensors
      lowbit_config.json   format version, QuantConfig, per-layer formats, source model
      config.json, generation_config.json, tokenizer files (so the folder stands alone)

Per quantized Linear ``L`` the safetensors file holds
    L.qweight   uint8 [out, ceil(in*bits/8)]     codes, bit-packed per row (formats.packing)
    L.scales    [out, n_groups] float16/bfloat16/float32
    L.qzeros    uint8 [out, ceil(n_groups*bits/8)]  zero points, packed (asymmetric only)
    L.g_idx     int32 [in]  only when it is not the trivial column // group_size map
    L.bias      float32, L.act_scale / L.act_zero (static activation quantization)
or, for a layer in another format of the family (WeightSpec.format: nf4, bcq3, ternary,
codebook4, ...; format version 2), that format's own packed tensors ``L.<name>``
(``formats.base.WeightFormat.pack``: L.qweight plus its parameters) and L.g_idx when not
trivial; or L.weight (float32) when only its activations are quantized. Tied weights are stored
once. Everything is written into a temporary folder that is renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..cache import atomic_path
from ..config import ActSpec, QuantConfig, WeightSpec
from ..errors import LowbitError
from ..formats.packing import pack, unpack
from ..formats.weights import default_g_idx
from .hashes import safetensors_hashes, verify_file
from ..nn.qlinear import QuantLinear, set_submodule

log = logging.getLogger(__name__)

FORMAT_NAME = "lowbit"
FORMAT_VERSION = 2  # 2: layers in any format of the family (WeightSpec.format)
READABLE_VERSIONS = (1, 2)  # version 1 files are integer-grid layers only, read as such
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "lowbit_config.json"


def quant_layers(model: torch.nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _layer_entry(m: QuantLinear) -> dict:
    if m.holds_format:
        enc = m.encoded
        return {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
            "n_groups": int(enc.g_idx.max()) + 1,
            "g_idx": not torch.equal(enc.g_idx, default_g_idx(m.in_features, m.wspec.group_size)),
            "weight": dataclasses.asdict(m.wspec),
            "act": None if m.aspec is None else dataclasses.asdict(m.aspec),
            "format": m.fmt.describe(),
        }
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
        "n_groups": int(m.scales.shape[1]) if m.wspec is not None else 0,
        "g_idx": m.wspec is not None and not torch.equal(m.g_idx, default_g_idx(m.in_features, m.wspec.group_size)),
        "weight": None if m.wspec is None else dataclasses.asdict(m.wspec),
        "act": None if m.aspec is None else dataclasses.asdict(m.aspec),
    }


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Parameter names that share storage with an earlier one (stored once)."""
    seen, tied = {}, set()
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if t.numel() and key in seen:
            tied.add(name)
        else:
            seen[key] = name
    return tied


def checkpoint_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file (see module doc), in a deterministic order."""
    qlayers = quant_layers(model)
    tied = _tied_names(model)
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name in tied:
            continue
        owner, _, leaf = name.rpartition(".")
        m = qlayers.get(owner)
        if m is None or m.wspec is None:
            out[name] = t.detach().contiguous()
            continue
        bits = m.wspec.bits
        if leaf == "codes":
            out[f"{owner}.qweight"] = pack(t, bits).contiguous()
        elif leaf == "zeros":
            out[f"{owner}.qzeros"] = pack(t, bits).contiguous()
        elif leaf == "g_idx":
            if not torch.equal(t, default_g_idx(m.in_features, m.wspec.group_size)):
                out[name] = t.contiguous()
        else:
            out[name] = t.detach().contiguous()
    for owner, m in qlayers.items():
        if m.holds_format:
            out.update(format_tensors(owner, m))
    return out


def format_tensors(name: str, m: QuantLinear) -> dict[str, torch.Tensor]:
    """The stored tensors of a layer in a format of the family: its packed form, and its
    g_idx when not the trivial column // group_size map."""
    if m.encoded is None:
        raise LowbitError(f"layer {name} holds no {m.wspec.format} weights to save")
    # clones: layers solved as one stack hold views of one tensor, which safetensors refuses
    out = {f"{name}.{k}": v.contiguous().clone() for k, v in m.fmt.pack(m.encoded).items()}
    if not torch.equal(m.encoded.g_idx, default_g_idx(m.in_features, m.fmt.group_size)):
        out[f"{name}.g_idx"] = m.encoded.g_idx.clone()
    return out


def save_checkpoint(
    model,
    tokenizer,
    out_dir: str | Path,
    config: QuantConfig,
    source: dict | None = None,
    extra: dict | None = None,
    write_more: Callable[[Path], None] | None = None,
) -> Path:
    """Write the quantized ``model`` as a lowbit checkpoint folder. ``extra`` adds keys to
    lowbit_config.json; ``write_more(folder)`` may add files (reports, plots) before the
    folder is renamed into place, so they land together or not at all."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / CONFIG_FILE).is_file() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LowbitError(f"output {out_dir} exists and is not a lowbit checkpoint; refusing to overwrite it")
    qlayers = quant_layers(model)
    if not qlayers:
        raise LowbitError("the model has no quantized layers to save")
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "quantization": config.to_dict(),
        "layers": {n: _layer_entry(m) for n, m in qlayers.items()},
        "source": source or {},
        **(extra or {}),
    }
    with atomic_path(out_dir, is_dir=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        # One metadata key only: safetensors writes metadata from a hash map, so two keys
        # come out in a random order and the same checkpoint would differ byte-wise.
        # The format and its version live in the JSON config.
        save_file(checkpoint_tensors(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        meta["hashes"] = {WEIGHTS_FILE: safetensors_hashes(tmp / WEIGHTS_FILE)}
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        if write_more is not None:
            write_more(tmp)
    return out_dir


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.exists():
        raise LowbitError(f"checkpoint {folder} does not exist")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise LowbitError(f"{folder} is not a lowbit checkpoint (no {CONFIG_FILE})")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path} is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT_NAME or meta.get("format_version") not in READABLE_VERSIONS:
        raise LowbitError(f"{path}: unsupported checkpoint format {meta.get('format')!r} version {meta.get('format_version')!r}")
    if not (folder / WEIGHTS_FILE).is_file():
        raise LowbitError(f"checkpoint {folder} has no {WEIGHTS_FILE}")
    _check_meta(meta, path)
    return meta


_LAYER_KEYS = {"in_features": int, "out_features": int, "bias": bool, "n_groups": int, "g_idx": bool}


# Fields added after format version 1: checkpoints of that version lack them and mean
# these values (the affine grid, no outliers). Every other field must be stored.
_LATER_FIELDS = {WeightSpec: {"format": "int", "outliers": 0.0}}


def spec_from_stored(cls, d, what: str):
    """A WeightSpec/ActSpec from a stored dict that must name every field (no defaults,
    except what version 1 could not store: _LATER_FIELDS)."""
    if not isinstance(d, dict):
        raise LowbitError(f"{what} must be an object, got {type(d).__name__}")
    d = {**_LATER_FIELDS.get(cls, {}), **d}
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in d]
    if missing:
        raise LowbitError(f"{what} lacks {', '.join(repr(n) for n in missing)}")
    extra = [k for k in d if k not in names]
    if extra:
        raise LowbitError(f"{what} has unknown key(s) {', '.join(repr(str(k)) for k in extra)}")
    return cls(**d)


def _check_meta(meta, path: Path) -> None:
    """Every key the readers use is present and of the right type, or one LowbitError naming it."""
    if not isinstance(meta, dict):
        raise LowbitError(f"{path} must hold a JSON object")
    q = meta.get("quantization")
    if not isinstance(q, dict):
        raise LowbitError(f"{path} lacks the \"quantization\" object")
    if not isinstance(q.get("method"), str):
        raise LowbitError(f"{path}: \"quantization\" lacks \"method\"")
    if "hashes" in meta and not isinstance(meta["hashes"], dict):
        raise LowbitError(f"{path}: \"hashes\" must be an object")
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise LowbitError(f"{path} lacks the \"layers\" object (or it is empty)")
    for name, e in layers.items():
        if not isinstance(e, dict):
            raise LowbitError(f"{path}: layer {name} must be an object")
        for k, typ in _LAYER_KEYS.items():
            v = e.get(k)
            if not isinstance(v, typ) or (typ is int and (isinstance(v, bool) or v < 0)):
                raise LowbitError(f"{path}: layer {name} lacks {k!r} or it is not a {'non-negative integer' if typ is int else typ.__name__}")
        if e["in_features"] == 0 or e["out_features"] == 0:
            raise LowbitError(f"{path}: layer {name} has a zero dimension")
        for k in ("weight", "act"):
            if k not in e:
                raise LowbitError(f"{path}: layer {name} lacks {k!r}")
        if e["weight"] is None and e["act"] is None:
            raise LowbitError(f"{path}: layer {name} has neither weight nor act format")
        try:
            if e["weight"] is not None:
                spec_from_stored(WeightSpec, e["weight"], f"{path}: layer {name} weight")
            if e["act"] is not None:
                spec_from_stored(ActSpec, e["act"], f"{path}: layer {name} act")
        except TypeError as err:
            raise LowbitError(f"{path}: layer {name}: malformed format ({err})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise LowbitError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]})") from None


def _build_layer(name: str, entry: dict) -> QuantLinear:
    try:
        wspec = None if entry["weight"] is None else spec_from_stored(WeightSpec, entry["weight"], f"layer {name} weight")
        aspec = None if entry["act"] is None else spec_from_stored(ActSpec, entry["act"], f"layer {name} act")
        return QuantLinear(entry["in_features"], entry["out_features"], entry["bias"], wspec, aspec, max(entry["n_groups"], 1))
    except (KeyError, TypeError) as e:
        raise LowbitError(f"{CONFIG_FILE}: malformed entry for layer {name} ({e})") from None


def load_checkpoint(folder: str | Path, verify: bool = True):
    """(model, tokenizer, meta) from a lowbit checkpoint folder. ``verify`` checks
    model.safetensors against the content hash recorded when it was written (checkpoints
    written before hashes were recorded load unchecked)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    folder = Path(folder)
    meta = read_meta(folder)
    record = (meta.get("hashes") or {}).get(WEIGHTS_FILE) if isinstance(meta.get("hashes"), dict) else None
    if verify and record is not None:
        verify_file(folder / WEIGHTS_FILE, record)
    elif verify:
        log.info("%s has no recorded content hash (written by an older lowbit); loading it unverified", folder)
    tensors = _read_tensors(folder / WEIGHTS_FILE)
    try:
        hf_config = AutoConfig.from_pretrained(str(folder))
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise LowbitError(f"checkpoint {folder}: cannot read its config or tokenizer ({str(e).splitlines()[0]})") from None
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.tie_weights()  # from_config leaves tied embeddings untied until asked
    state: dict[str, torch.Tensor] = {}
    for name, entry in meta["layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise LowbitError(f"{CONFIG_FILE} names layer {name}, which the model does not have") from None
        layer = _build_layer(name, entry)
        set_submodule(model, name, layer)
        if layer.holds_format:
            layer.encoded = _unpack_format_layer(name, layer, tensors)
        elif layer.wspec is not None:
            state.update(_unpack_layer(name, layer, tensors))
    for k, t in tensors.items():
        state.setdefault(k, t)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise LowbitError(f"{folder / WEIGHTS_FILE} does not match the model ({str(e).splitlines()[-1].strip()})") from None
    tied = set(_tied_names(model))
    missing = [k for k in missing if k not in tied and not k.endswith(".g_idx")]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise LowbitError(f"{folder / WEIGHTS_FILE} does not match the model: {what}")
    model.tie_weights()
    model.eval()
    return model, tokenizer, meta


def _unpack_layer(name: str, layer: QuantLinear, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    spec = layer.wspec
    need = [f"{name}.qweight", f"{name}.scales"] + ([] if spec.symmetric else [f"{name}.qzeros"])
    for k in need:
        if k not in tensors:
            raise LowbitError(f"checkpoint has no tensor {k} for layer {name}")
    n_groups = layer.scales.shape[1]
    try:
        out = {
            f"{name}.codes": unpack(tensors.pop(f"{name}.qweight"), spec.bits, layer.in_features),
            f"{name}.scales": tensors.pop(f"{name}.scales"),
        }
        if not spec.symmetric:
            out[f"{name}.zeros"] = unpack(tensors.pop(f"{name}.qzeros"), spec.bits, n_groups)
    except LowbitError as e:
        raise LowbitError(f"layer {name}: {e}") from None
    g_idx = tensors.pop(f"{name}.g_idx", None)
    out[f"{name}.g_idx"] = g_idx if g_idx is not None else default_g_idx(layer.in_features, spec.group_size)
    scales = out[f"{name}.scales"]
    if tuple(scales.shape) != tuple(layer.scales.shape) or not torch.isfinite(scales.float()).all():
        raise LowbitError(f"layer {name}: scales have shape {tuple(scales.shape)} or non-finite values")
    if int(out[f"{name}.g_idx"].max()) >= n_groups:
        raise LowbitError(f"layer {name}: g_idx points past its {n_groups} groups")
    return out


_NOT_WEIGHT = ("bias", "act_scale", "act_zero")


def _unpack_format_layer(name: str, layer: QuantLinear, tensors: dict[str, torch.Tensor]):
    """The Encoded weight of a format layer, its tensors taken out of ``tensors``."""
    prefix = name + "."
    own = [k for k in tensors if k.startswith(prefix) and k[len(prefix):] not in _NOT_WEIGHT]  # a QuantLinear is a leaf
    parts = {k[len(prefix):]: tensors.pop(k) for k in own}
    g_idx = parts.pop("g_idx", None)
    if g_idx is None:
        g_idx = default_g_idx(layer.in_features, layer.fmt.group_size)
    if g_idx.shape != (layer.in_features,) or g_idx.numel() == 0 or int(g_idx.min()) < 0:
        raise LowbitError(f"layer {name}: g_idx has shape {tuple(g_idx.shape)} or negative entries")
    try:
        enc = layer.fmt.unpack(parts, layer.out_features, layer.in_features, g_idx.to(torch.int32))
    except LowbitError as e:
        raise LowbitError(f"layer {name}: {e}") from None
    if not torch.isfinite(enc.dequantize()).all():
        raise LowbitError(f"layer {name}: its {layer.wspec.format} weights decode to non-finite values")
    return enc
