"""Predict the peak memory of a `lowbit quantize` run from a model's shapes alone.

The prediction adds up what is alive at the worst moment of the block loop, part by part,
from the config (no weights read):

- process: Python, torch and transformers once imported (measured: 0.25 GB);
- tokenizer: about 1.3 kB per vocabulary entry (measured: Gemma 3's 262,144 entries take
  0.34 GB);
- embeddings: one vocabulary x hidden matrix in float32: the LM head (an untied input
  embedding is dropped once the first block's inputs are made, and read again after);
- float blocks: one block's float32 weights when streamed (the block being quantized), all
  of them when the model is loaded whole;
- quantized blocks: the codes of the blocks already done, one byte per weight in memory
  (QuantLinear holds unpacked uint8 codes) plus scales and zero points;
- calibration: the hidden states entering and leaving the block, float32;
- block forward: the calibration set runs through a block at once, so its widest
  intermediates are alive together: gate, up and their product [n, len, intermediate], and
  the attention scores [n, heads, len, len];
- solver: GPTQ's Hessian of the widest input (down_proj's, intermediate²), float32, with
  the copies its Cholesky solve makes (3); AWQ's search keeps the block's float output and
  a quantized one per candidate scale (2 x [n, len, hidden]) plus the input it scales.

The evaluation that follows (``eval_peak``: the quantized blocks, one block dequantized,
the LM head's logits for 128 positions and their log-softmax, the reference's sampling
temporaries) can be the larger of the two when the vocabulary is large.

``lowbit memory MODEL --method gptq`` prints both; BENCHMARKS.md sets them beside measured
peaks and extrapolates to 7B and 70B Llama shapes (``LLAMA_SHAPES``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LowbitError

PROCESS_BYTES = 0.25e9
TOKENIZER_BYTES_PER_TOKEN = 1300

# published shapes of Llama 2 (Touvron et al., 2023, table 1 and the released configs)
LLAMA_SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
}

METHODS = ("rtn", "gptq", "awq")


@dataclass(frozen=True)
class Shapes:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, c) -> Shapes:
        get = c.get if isinstance(c, dict) else lambda k, d=None: getattr(c, k, d)
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        return cls(hidden=hidden, inter=int(get("intermediate_size")), layers=int(get("num_hidden_layers")), heads=heads,
                   kv_heads=int(get("num_key_value_heads") or heads), head_dim=int(get("head_dim") or hidden // heads),
                   vocab=int(get("vocab_size")), tied=bool(get("tie_word_embeddings", False)))

    @property
    def block_params(self) -> int:
        d, a, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return d * a + 2 * d * kv + a * d + 3 * d * self.inter

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.vocab * self.hidden * (1 if self.tied else 2)


def quantize_peak(shapes: Shapes, method: str, n_calib: int = 32, calib_len: int = 512, stream: bool = True,
                  group_size: int = 64) -> dict[str, float]:
    """Bytes per part at the block loop's worst moment (see module doc), and "total"."""
    if method not in METHODS:
        raise LowbitError(f"memory prediction knows the methods {', '.join(METHODS)}, not {method!r}")
    s = shapes
    tokens = n_calib * calib_len
    per_weight = 1 + 3 / group_size  # uint8 code, float16 scale and uint8 zero per group
    parts = {
        "process": PROCESS_BYTES,
        "tokenizer": TOKENIZER_BYTES_PER_TOKEN * s.vocab,
        "embeddings": 4 * s.vocab * s.hidden * (1 if s.tied or stream else 2),
        "float blocks": 4 * s.block_params * (1 if stream else s.layers),
        "quantized blocks": per_weight * s.block_params * (s.layers - 1),
        "calibration": 2 * 4 * tokens * s.hidden,
        "block forward": 4 * (3 * tokens * s.inter + n_calib * s.heads * calib_len * calib_len),
        "solver": {"rtn": 0.0, "gptq": 3 * 4 * s.inter * s.inter, "awq": 4 * (2 * tokens * s.hidden + tokens * s.inter)}[method],
    }
    parts["total"] = sum(parts.values())
    return parts


def eval_peak(shapes: Shapes, quantized: bool = True, group_size: int = 64) -> dict[str, float]:
    """Bytes per part while a streamed model is evaluated (after quantization when
    ``quantized``: the quantized blocks are all in memory), and "total"."""
    s = shapes
    per_weight = 1 + 3 / group_size
    parts = {
        "process": PROCESS_BYTES,
        "tokenizer": TOKENIZER_BYTES_PER_TOKEN * s.vocab,
        "embeddings": 4 * s.vocab * s.hidden,
        "quantized blocks": per_weight * s.block_params * s.layers if quantized else 0.0,
        "float blocks": 4 * s.block_params,
        "head": 4 * 3 * 128 * s.vocab,  # logits, log-probabilities, the reference's tail probabilities
    }
    parts["total"] = sum(parts.values())
    return parts
