"""A rotation baseline for low-bit activations (QuaRot: Ashkboos et al., "QuaRot:
Outlier-Free 4-Bit Inference in Rotated LLMs", 2024): rotate the residual stream by an
orthogonal Q so that no channel holds an outlier, folded into the weights.

For a pre-norm Llama-style model (rows are tokens, h' = h Q):

1. every RMSNorm's weight is absorbed into the Linears reading it (W <- W diag(g), g <- 1;
   the final norm's into the LM head), so the norms compute h / rms(h), which commutes
   with Q because rms(h Q) = rms(h);
2. readers of the residual stream (q/k/v, gate/up, LM head): W <- W Q; writers (o_proj,
   down_proj): W <- Q^T W (and b <- b Q); the embedding: E <- E Q;
3. o_proj's input, per attention head: V' = V H (H: head_dim x head_dim, the same for every
   head) folded into v_proj's rows and o_proj's columns (attention mixes tokens, never
   channels, so this is exact, with grouped-query attention too).

The model stays an ordinary float model of the same architecture computing the same
function (float rounding apart). A tied embedding / LM head is untied: the head must
absorb the final norm's weight and the embedding must not, so they differ.

Q is a randomized Hadamard transform, diag(+-1) (H_{2^k} kron R_m) / sqrt(2^k), where
d = 2^k m and R_m is a seeded random orthogonal m x m (1 when d is a power of two): the
widths of small models (SmolLM2: 576 = 64 x 9) have no Sylvester Hadamard matrix.

Not done here: QuaRot's online Hadamard of down_proj's input (act(gate) * up is
elementwise, so no rotation folds into gate/up; it needs an operation at run time, which
lowbit's QuantLinear and checkpoint do not hold). down_proj's input, where SmolLM2's
largest activations are, is therefore quantized unrotated.

Why a method of its own (``--method rotate``, with ``solver`` rtn or gptq) rather than a
per-block transform: the rotation touches the embedding and the LM head, outside the
blocks the runner walks, so it runs once on the whole model (``prepare_model``) before the
block loop.
"""

from __future__ import annotations

import math
import logging

import torch
from torch import nn

from ..errors import LowbitError
from ..models.arch import decoder_layers
from .smoothing import norm_offset

log = logging.getLogger(__name__)


def sylvester_hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix (entries +-1), n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"{n} is not a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_orthogonal(m: int, generator: torch.Generator) -> torch.Tensor:
    """A seeded random orthogonal m x m matrix (QR of a Gaussian, signs fixed)."""
    a = torch.randn(m, m, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).contiguous()


def randomized_hadamard(d: int, seed: int = 0) -> torch.Tensor:
    """Orthogonal d x d: diag(random signs) @ (H_{2^k} kron R_m) / sqrt(2^k), d = 2^k m, m odd."""
    g = torch.Generator().manual_seed(seed)
    k = (d & -d)  # the largest power of two dividing d
    m = d // k
    block = sylvester_hadamard(k) / math.sqrt(k)
    core = torch.kron(block.contiguous(), random_orthogonal(m, g)) if m > 1 else block
    signs = torch.where(torch.rand(d, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return signs.unsqueeze(1) * core


def _llama_parts(model: nn.Module):
    """(embedding, final norm, lm_head, blocks) of a Llama-style model, or a LowbitError."""
    _, blocks = decoder_layers(model)
    inner = getattr(model, "model", None)
    emb = getattr(inner, "embed_tokens", None)
    norm = getattr(inner, "norm", None)
    head = getattr(model, "lm_head", None)
    need = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    if emb is None or norm is None or head is None:
        raise LowbitError(f"rotation: {type(model).__name__} is not a Llama-style model (embed_tokens, norm, lm_head)")
    for i, b in enumerate(blocks):
        names = dict(b.named_modules())
        missing = [n for n in need if n not in names]
        extra = [n for n in names if n.endswith("norm") and n not in need[:2] and "q_norm" not in n and "k_norm" not in n]
        if missing or extra:
            raise LowbitError(f"rotation: block {i} is not a pre-norm Llama block ({'missing ' + ', '.join(missing) if missing else 'extra norms ' + ', '.join(extra)})")
        if any(n.endswith(("q_norm", "k_norm")) for n in names):
            raise LowbitError(f"rotation: block {i} normalizes q/k per head, which the head rotation does not commute with")
    return emb, norm, head, blocks


@torch.no_grad()
def absorb_norm(norm: nn.Module, linears: list[nn.Linear], name: str) -> None:
    """W <- W diag(g + c) for every reader and g <- 1 - c: the norm becomes h / rms(h)."""
    if getattr(norm, "bias", None) is not None:
        raise LowbitError(f"rotation: {name} has a bias, which does not commute with a rotation")
    c = norm_offset(norm, name)
    g = norm.weight.detach().double() + c
    for lin in linears:
        lin.weight.copy_((lin.weight.detach().double() * g.unsqueeze(0)).to(lin.weight.dtype))
    norm.weight.fill_(1.0 - c)


def _rotate_in(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.copy_((lin.weight.detach().double() @ q).to(lin.weight.dtype))


def _rotate_out(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.copy_((q.t() @ lin.weight.detach().double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.detach().double() @ q).to(lin.bias.dtype))


@torch.no_grad()
def rotate_heads(v_proj: nn.Linear, o_proj: nn.Linear, head_dim: int, h: torch.Tensor) -> None:
    """V' = V H per head: v_proj's rows of each kv head <- H^T rows, o_proj's columns of
    each query head <- columns H."""
    n_kv = v_proj.out_features // head_dim
    w = v_proj.weight.detach().double().reshape(n_kv, head_dim, -1)
    v_proj.weight.copy_(torch.einsum("ji,kjc->kic", h, w).reshape(v_proj.weight.shape).to(v_proj.weight.dtype))
    if v_proj.bias is not None:
        b = v_proj.bias.detach().double().reshape(n_kv, head_dim)
        v_proj.bias.copy_((b @ h).reshape(-1).to(v_proj.bias.dtype))
    n_q = o_proj.in_features // head_dim
    wo = o_proj.weight.detach().double().reshape(o_proj.out_features, n_q, head_dim)
    o_proj.weight.copy_((wo @ h).reshape(o_proj.weight.shape).to(o_proj.weight.dtype))


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, heads: bool = True) -> dict:
    """Fold a randomized Hadamard rotation into a Llama-style float model, in place (see the
    module doc). Returns a summary for the report."""
    emb, norm, head, blocks = _llama_parts(model)
    d = emb.weight.shape[1]
    q = randomized_hadamard(d, seed)
    untied = head.weight is emb.weight
    if untied:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
        log.info("rotation: the tied embedding and LM head are untied (the head absorbs the final norm)")
    absorb_norm(norm, [head], "model.norm")
    head_dim = None
    for i, b in enumerate(blocks):
        at, mlp = b.self_attn, b.mlp
        absorb_norm(b.input_layernorm, [at.q_proj, at.k_proj, at.v_proj], f"block {i} input_layernorm")
        absorb_norm(b.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], f"block {i} post_attention_layernorm")
        for lin in (at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj):
            _rotate_in(lin, q)
        for lin in (at.o_proj, mlp.down_proj):
            _rotate_out(lin, q)
        if heads:
            head_dim = getattr(at, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
            rotate_heads(at.v_proj, at.o_proj, head_dim, randomized_hadamard(head_dim, seed + 1))
    emb.weight.copy_((emb.weight.detach().double() @ q).to(emb.weight.dtype))
    _rotate_in(head, q)
    return {"rotation": "randomized Hadamard", "hidden": d, "head_dim": head_dim, "untied_embedding": untied, "seed": seed}
