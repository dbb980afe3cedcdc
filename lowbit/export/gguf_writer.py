"""Write a model as a GGUF file that llama.cpp (and transformers) load.

    from lowbit.export.gguf_writer import export_gguf
    result = export_gguf(model, tokenizer, "out.gguf", "Q4_K_M", imatrix=imatrix, source=info["source"])

What goes in, following llama.cpp's convert_hf_to_gguf.py for the facts:

- architecture metadata from the Hugging Face config (``<arch>.context_length``,
  ``embedding_length``, ``block_count``, ``feed_forward_length``, head counts, rope base
  and scaling, RMS epsilon, ...), for llama, qwen2 and gemma3 (text) models;
- tensor names through gguf-py's TensorNameMap; the tied LM head is not written
  (llama.cpp then uses token_embd for the output, as the converter leaves it);
- Llama's q/k rows permuted from Hugging Face's rotate-half RoPE layout back to the
  interleaved layout llama.cpp's graph expects (``_permute_qk``); Gemma3's norm weights
  stored as 1 + w, because llama.cpp's RMSNorm multiplies by the weight itself;
- the tokenizer: copied key by key from the source GGUF when the model came from one
  (lowbit's ``info["source"]``), otherwise built from a byte-level BPE Hugging Face
  tokenizer as the converter's ``_set_vocab_gpt2`` does;
- each tensor quantized by lowbit's GGML codecs with the type the preset picks
  (``gguf_presets``), weighted by the imatrix where one is given.

Output is deterministic (no timestamps, fixed order) and appears only when complete: it is
written under a temporary name and renamed (``lowbit.cache.atomic_path``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache import atomic_path
from ..errors import LowbitError
from ..formats.gguf import quantize_tensor
from .gguf_presets import ModelShape, choose_types, preset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # Llama: undo HF's q/k row order (see _permute_qk)
    norm_shift: float = 0.0  # Gemma3: llama.cpp's norm weight is HF's 1 + w


# Hugging Face model_type -> how llama.cpp's converter writes it.
ARCHS = {
    "llama": ArchSpec("LLAMA", permute_qk=True),
    "qwen2": ArchSpec("QWEN2"),
    "gemma3_text": ArchSpec("GEMMA3", norm_shift=1.0),
}


@dataclass
class GGUFExport:
    """What export_gguf wrote."""

    path: Path
    preset: str
    types: dict[str, str]  # GGUF tensor name -> GGML type name
    file_bytes: int
    tensor_bytes: int  # bytes of tensor data (without header and padding)
    n_elements: int  # elements of all tensors
    seconds: float  # quantization (all tensors), not counting the file write
    imatrix: bool = False
    type_counts: dict[str, int] = field(default_factory=dict)
    search: str = "weighted"

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / self.n_elements


def _arch(config) -> ArchSpec:
    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise LowbitError(f"GGUF export does not support architecture {mt!r} (supported: {', '.join(ARCHS)})")
    return ARCHS[mt]


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's Llama checkpoints rotate pairs (i, i + d/2) of each head; llama.cpp
    (like Meta's original weights) rotates neighbours (2i, 2i + 1). Reorder each head's
    rows from [first halves | second halves] to interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of _permute_qk (what a GGUF reader does to get Hugging Face's layout back)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_sources(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]:
    """{Hugging Face parameter name: (shape, function giving it as float32)}. lowbit
    QuantLinear layers (a checkpoint) give their dequantized weights, made only when
    asked for, so a checkpoint is expanded one tensor at a time. The tied LM head is left
    out (llama.cpp reads the output projection from token_embd then)."""
    from ..nn.qlinear import QuantLinear

    def plain(p):
        return lambda: p.detach().to(torch.float32)

    out = {}
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, QuantLinear):
            out[f"{prefix}weight"] = ((mod.out_features, mod.in_features), lambda m=mod: m.dequantized_weight().detach().float())
            if mod.bias is not None:
                out[f"{prefix}bias"] = (tuple(mod.bias.shape), plain(mod.bias))
            continue
        for pname, p in mod.named_parameters(recurse=False):
            out[f"{prefix}{pname}"] = (tuple(p.shape), plain(p))
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out


def hf_to_gguf_names(model: torch.nn.Module) -> dict[str, str]:
    """{Hugging Face parameter name: GGUF tensor name} for the tensors export_gguf writes."""
    import gguf

    spec = _arch(model.config)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.gguf_arch], model.config.num_hidden_layers)
    names = {}
    for hf in _tensor_sources(model):
        g = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise LowbitError(f"GGUF export: no GGUF name for tensor {hf} of {spec.gguf_arch.lower()} model")
        names[hf] = g
    return names


def _rope(config) -> dict:
    """Rope parameters of the full-attention layers (transformers 5 keeps them in
    ``rope_parameters``, per layer type for Gemma3; older configs in rope_theta/rope_scaling)."""
    rp = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in rp:
        rp = rp["full_attention"]
    rp = dict(rp)
    if "rope_theta" not in rp and getattr(config, "rope_theta", None) is not None:
        rp["rope_theta"] = config.rope_theta
    scaling = getattr(config, "rope_scaling", None)
    if scaling and "rope_type" not in rp:
        rp.update(scaling)
    return rp


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _llama3_rope_factors(config, rp: dict) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling as the per-frequency divisors llama.cpp
    reads from a ``rope_freqs.weight`` tensor (the converter computes the same)."""
    dim = _head_dim(config)
    freqs = 1.0 / (rp["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, lo, hi = rp["factor"], rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    lo_wave, hi_wave = old_ctx / lo, old_ctx / hi
    out = []
    for f in freqs:
        wave = 2 * math.pi / f
        if wave < hi_wave:
            out.append(1.0)
        elif wave > lo_wave:
            out.append(factor)
        else:
            smooth = (old_ctx / wave - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _write_arch_metadata(w, config, spec: ArchSpec, extra_tensors: dict) -> None:
    n_head = config.num_attention_heads
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or n_head))
    rp = _rope(config)
    w.add_rope_freq_base(float(rp.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    head_dim = _head_dim(config)
    # The converter writes vocab_size for llama only; llama.cpp reads it (optionally) for
    # every architecture, and transformers' GGUF loader needs it for qwen2, whose
    # tokenizer conversion may add tokens and so miscount the vocabulary.
    w.add_vocab_size(int(config.vocab_size))
    if spec.gguf_arch == "LLAMA":
        w.add_rope_dimension_count(int(head_dim))
    if spec.gguf_arch == "GEMMA3" or head_dim != config.hidden_size // n_head:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    rope_type = rp.get("rope_type", "default")
    if rope_type == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif rope_type == "yarn":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
    elif rope_type == "llama3" and spec.gguf_arch == "LLAMA":
        extra_tensors["rope_freqs.weight"] = _llama3_rope_factors(config, rp)
    elif rope_type != "default":
        raise LowbitError(f"GGUF export: rope scaling {rope_type!r} of this {config.model_type} model is not supported")
    if spec.gguf_arch == "GEMMA3":
        swa = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {})
        if "rope_theta" in swa:
            w.add_rope_freq_base_swa(float(swa["rope_theta"]))
        if getattr(config, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(config.final_logit_softcapping))
        if getattr(config, "sliding_window", None):
            w.add_sliding_window(int(config.sliding_window))


# --- tokenizer --------------------------------------------------------------------------

_SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


def _copy_source_metadata(w, gguf_path: str, vocab_size: int) -> bool:
    """Copy general.* and tokenizer.* from the GGUF the model was loaded from; False (and
    nothing copied) if the file is gone or its vocabulary does not fit the model."""
    import gguf

    path = Path(gguf_path)
    if not path.is_file():
        return False
    from ..models.gguf_read import open_gguf

    try:
        reader = open_gguf(path)
    except LowbitError:  # a file that changed since loading: fall back to the HF tokenizer
        return False
    fields = reader.fields
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        return False
    for key, f in fields.items():
        if key.startswith(_SKIP_KEYS) or not key.startswith(("general.", "tokenizer.")):
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(key, f.contents(), vtype)
    return True


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise LowbitError("GGUF export needs a fast (tokenizer.json) tokenizer when the model did not come from a GGUF")
    return json.loads(backend.to_str())


def _is_byte_level(spec: dict) -> bool:
    def has(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(p) for p in node.get("pretokenizers", []) or node.get("decoders", []) or [])

    return has(spec.get("pre_tokenizer")) or has(spec.get("decoder"))


# tokenizer.ggml.pre tells llama.cpp which pre-tokenizer regexes to use. The converter
# finds it by hashing the tokenizer's output on a test text; lacking that table, the
# architecture's usual one is used, else llama.cpp's "default" (GPT-2's regex).
_PRE_BY_ARCH = {"QWEN2": "qwen2"}


def _write_hf_tokenizer(w, tokenizer, vocab_size: int, spec: ArchSpec) -> None:
    """A byte-level BPE tokenizer as tokenizer.ggml.* (what _set_vocab_gpt2 writes)."""
    import gguf

    tj = _backend_json(tokenizer)
    model = tj.get("model", {})
    if model.get("type") != "BPE" or not _is_byte_level(tj):
        kind = model.get("type", "?") + ("" if _is_byte_level(tj) else ", not byte-level")
        raise LowbitError(
            f"GGUF export: tokenizer ({kind}) is not supported; only byte-level BPE tokenizers, or models loaded from a GGUF"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        vocab.setdefault(content, t["id"])
    by_id = {i: tok for tok, i in vocab.items()}
    n = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    TT = gguf.TokenType
    for i in range(n):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TT.USER_DEFINED)
        elif tok in added:
            tokens.append(tok)
            types.append(TT.CONTROL if added[tok].get("special") else TT.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(TT.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_PRE_BY_ARCH.get(spec.gguf_arch, "default"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            getattr(w, f"add_{kind}_token_id")(int(tid))
    from ..calibration.data import tokenizer_adds_bos

    w.add_add_bos_token(tokenizer_adds_bos(tokenizer))  # what it does: the attribute can read False
    w.add_add_eos_token(bool(getattr(tokenizer, "add_eos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        w.add_chat_template(template)


# --- tensors ------------------------------------------------------------------------------


def _encode(arr: np.ndarray, ggml_type, importance, name: str):
    """(numpy array, raw_dtype for GGUFWriter) of one tensor in its GGML type."""
    import gguf

    T = gguf.GGMLQuantizationType
    if ggml_type == T.F32:
        return np.ascontiguousarray(arr, dtype=np.float32), None
    if ggml_type == T.F16:
        # checked in float32: numpy's float16 arithmetic is emulated and slow. 65520 and up
        # round to inf in float16.
        if arr.size and float(np.abs(arr).max()) >= 65520.0:
            raise LowbitError(f"GGUF export: tensor {name} has values beyond float16's range (max 65504); use BF16 or F32")
        return arr.astype(np.float16), None
    if ggml_type == T.BF16:
        b = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.bfloat16).view(torch.int16).numpy()
        return b.view(np.uint8).reshape(*arr.shape[:-1], arr.shape[-1] * 2), T.BF16
    try:
        return quantize_tensor(arr, ggml_type, importance), ggml_type
    except LowbitError as e:
        raise LowbitError(f"GGUF export: tensor {name}: {e}") from None


SEARCHES = ("weighted", "llama.cpp")


def _importance(imatrix: dict | None, hf_name: str, cols: int):
    if imatrix is None or not hf_name.endswith(".weight"):
        return None
    imp = imatrix.get(hf_name[: -len(".weight")])
    if imp is None:
        return None
    imp = imp.detach().cpu().float().numpy() if hasattr(imp, "detach") else np.asarray(imp, dtype=np.float32)
    if imp.shape != (cols,):
        raise LowbitError(f"GGUF export: imatrix for {hf_name} has shape {imp.shape}, expected ({cols},)")
    return imp


def plan_types(model: torch.nn.Module, type: str, imatrix: bool = False) -> dict:
    """{HF tensor name: GGML type} that preset ``type`` gives each tensor export_gguf
    writes (llama.cpp's per-tensor rules, gguf_presets.choose_types)."""
    config = model.config
    names = hf_to_gguf_names(model)
    n_head = config.num_attention_heads
    hp = ModelShape(n_layer=config.num_hidden_layers, n_head=n_head,
                    n_head_kv=getattr(config, "num_key_value_heads", None) or n_head)
    shapes = {hf: shape for hf, (shape, _) in _tensor_sources(model).items()}
    chosen = choose_types(type, [(names[hf], shape) for hf, shape in shapes.items()], hp, imatrix=imatrix)
    return {hf: chosen[names[hf]] for hf in shapes}


def export_gguf(
    model: torch.nn.Module,
    tokenizer,
    out: str | Path,
    type: str = "Q4_K_M",
    imatrix: dict | None = None,
    source: dict | None = None,
    progress=None,
    prequantized: dict | None = None,
    search: str = "weighted",
    plan_imatrix: bool | None = None,
    own_types: bool = False,
) -> GGUFExport:
    """Write ``model`` to ``out`` as a GGUF file of preset ``type`` (Q4_K_M, Q8_0, F16, ...).

    imatrix: {Linear name: per-column mean of x^2} from collect_imatrix, or None.
    search: how tensors without importance data (no imatrix, or one without an entry for
    the tensor, like the embedding) choose their scales. "weighted" (default): the
    importance-weighted search llama.cpp runs with an imatrix, with every column equally
    important: less squared weight error than llama.cpp's plain rounding in every type
    that has a search, data-free, at the same size (benchmarks/gguf_search.py).
    "llama.cpp": llama.cpp's reference quantizers for those tensors, so a model exported
    from the same float16 weights is byte-identical to llama-quantize's file.
    source: lowbit's info["source"]; a model that came from a GGUF gets that file's
    general.* and tokenizer.* metadata. A lowbit checkpoint exports its dequantized weights.
    prequantized: {HF weight name: (GGML type, uint8 bytes [rows, row_bytes])} written as
    they are instead of quantizing that tensor (codes lowbit.quantize chose, see gguf_quantize); the type
    must be the one the preset picks (``plan_types``), and rows are in Hugging Face order.
    plan_imatrix: whether the plan follows llama.cpp's rules for importance-weighted
    quantization (two rules differ); default: when an imatrix or prequantized tensors are given.
    own_types: prequantized tensors keep their own GGML type (a per-layer mixture lowbit
    chose, e.g. by a bit budget) and the preset only types the other tensors (embeddings,
    output, norms); the file's general.file_type is still the preset's.
    """
    import gguf

    if search not in SEARCHES:
        raise LowbitError(f"GGUF export: unknown search {search!r} (choose from {', '.join(SEARCHES)})")
    p = preset(type)
    config = model.config
    spec = _arch(config)
    if spec.permute_qk and getattr(config, "num_attention_heads", 0) <= 0:
        raise LowbitError("GGUF export: config has no num_attention_heads")
    names = hf_to_gguf_names(model)
    sources = _tensor_sources(model)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    prequantized = prequantized or {}
    for hf in prequantized:
        if hf not in sources:
            raise LowbitError(f"GGUF export: prequantized tensor {hf} is not a tensor of this model")

    def prepared(hf: str) -> np.ndarray:
        """The tensor as the GGUF file holds it, float32."""
        g, t = names[hf], sources[hf][1]()
        if not torch.isfinite(t).all():
            raise LowbitError(f"GGUF export: tensor {hf} has NaN/inf values")
        t = permute_rows(g, t)
        if spec.norm_shift and g.endswith("norm.weight"):
            t = t + spec.norm_shift
        return t.contiguous().numpy()

    if plan_imatrix is None:
        plan_imatrix = imatrix is not None or bool(prequantized)
    by_hf = plan_types(model, p.name, imatrix=plan_imatrix)
    types = {names[hf]: t for hf, t in by_hf.items()}
    if own_types:
        types.update({names[hf]: t for hf, (t, _) in prequantized.items()})

    def permute_rows(g: str, t: torch.Tensor) -> torch.Tensor:
        if spec.permute_qk and g.endswith(("attn_q.weight", "attn_q.bias")):
            return _permute_qk(t, n_head)
        if spec.permute_qk and g.endswith(("attn_k.weight", "attn_k.bias")):
            return _permute_qk(t, n_kv)
        return t

    def encoded(g: str, hf: str, arr):
        if hf in prequantized:
            t, raw = prequantized[hf]
            if t != types[g]:
                raise LowbitError(f"GGUF export: prequantized {hf} is {t.name} but preset {p.name} gives it {types[g].name}")
            # GGML blocks run along rows, so permuting whole rows commutes with quantizing
            return np.ascontiguousarray(permute_rows(g, torch.from_numpy(np.asarray(raw))).numpy()), t, sources[hf][0]
        arr = prepared(hf) if arr is None else arr
        importance = _importance(imatrix, hf, arr.shape[-1])
        if importance is None and search == "weighted" and arr.ndim == 2:
            importance = np.ones(arr.shape[-1], dtype=np.float32)
        data, raw_type = _encode(arr, types[g], importance, hf or g)
        return data, raw_type, arr.shape

    out = Path(out)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[spec.gguf_arch]])
        extra: dict[str, np.ndarray] = {}
        _write_arch_metadata(w, config, spec, extra)
        w.add_file_type(int(p.file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        copied = bool(source) and source.get("kind") in ("embedded", "gguf") and _copy_source_metadata(
            w, source.get("path", ""), int(config.vocab_size)
        )
        if not copied:
            w.add_name(Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model")
            _write_hf_tokenizer(w, tokenizer, int(config.vocab_size), spec)

        start = time.perf_counter()
        tensor_bytes = n_elements = 0
        items = [(names[hf], hf, None) for hf in sources]
        for g, arr in extra.items():
            items.append((g, "", arr))
            types[g] = gguf.GGMLQuantizationType.F32
        iterator = progress(items) if progress else items
        for g, hf, arr in iterator:
            data, raw, shape = encoded(g, hf, arr)
            w.add_tensor(g, data, raw_dtype=raw)
            tensor_bytes += data.nbytes
            n_elements += int(np.prod(shape))
        seconds = time.perf_counter() - start
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    names_out = {g: t.name for g, t in types.items()}
    counts: dict[str, int] = {}
    for t in names_out.values():
        counts[t] = counts.get(t, 0) + 1
    return GGUFExport(
        path=out,
        preset=p.name,
        types=names_out,
        file_bytes=out.stat().st_size,
        tensor_bytes=tensor_bytes,
        n_elements=n_elements,
        seconds=seconds,
        imatrix=imatrix is not None,
        type_counts=counts,
        search=search,
    )
