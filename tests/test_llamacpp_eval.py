"""llama.cpp's activation rounding (lowbit.evaluation.llamacpp) against plain references."""

from __future__ import annotations

import numpy as np
import torch

import lowbit
from lowbit.evaluation.llamacpp import llamacpp_activations, round_q8_0, round_q8_k
from lowbit.export.gguf_writer import export_gguf
from lowbit.formats.gguf import dequantize_tensor, quantize_tensor
from tests.test_gguf_export import kdir  # noqa: F401  (fixture)


def _x(n, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g) * torch.rand(n, 1, generator=g) * 5
    x[0, :256] = 0  # all-zero blocks decode to zeros
    return x


def test_q8_0_rounding_is_ggml_q8_0():
    x = _x(8, 512)
    ours = round_q8_0(x)
    ref = torch.from_numpy(dequantize_tensor(quantize_tensor(x.numpy(), "Q8_0"), "Q8_0", x.shape))
    # ggml's reference rounds with 1/d and ties away from zero, its AVX2 path with 127/amax
    # and ties to even: they may differ by one step on a rare tie
    assert float((ours != ref).float().mean()) < 1e-3
    assert torch.equal(ours[0, :256], torch.zeros(256))


def q8_k_reference(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_K_ref then decode, one block at a time."""
    out = np.zeros_like(x, dtype=np.float32)
    for r, row in enumerate(x.astype(np.float32)):
        for b0 in range(0, len(row), 256):
            blk = row[b0 : b0 + 256]
            m = blk[np.argmax(np.abs(blk))]
            if m == 0:
                continue
            iscale = np.float32(-128) / m
            q = np.minimum(np.rint(iscale * blk), 127)
            out[r, b0 : b0 + 256] = q * (np.float32(1) / iscale)
    return out


def test_q8_k_rounding_matches_the_reference():
    x = _x(8, 768)
    np.testing.assert_array_equal(round_q8_k(x).numpy(), q8_k_reference(x.numpy()))


def test_hooks_follow_the_file_types(kdir, tmp_path, cache):  # noqa: F811
    model, tok, info = lowbit.load(str(kdir))
    path = export_gguf(model, tok, tmp_path / "m.gguf", "Q4_K_M", source=info["source"]).path
    back, _, _ = lowbit.load(str(path))
    ids = torch.tensor([tok("The history of the city began")["input_ids"]])
    with torch.no_grad():
        plain = back(ids).logits
        seen = {}
        down = back.model.layers[0].mlp.down_proj  # Q4_K: Q8_K activations
        h0 = down.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].clone()))
        handles = llamacpp_activations(back, path)
        rounded = back(ids).logits
        for h in handles + [h0]:
            h.remove()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in back.modules())
    assert len(handles) == n_linear  # every Linear, lm_head (tied: token_embd, Q6_K) included
    x = seen["in"]  # recorded before the rounding hook ran
    np.testing.assert_array_equal(round_q8_k(x).numpy(), q8_k_reference(x.reshape(-1, x.shape[-1]).numpy()).reshape(x.shape))
    assert not torch.equal(plain, rounded)
    torch.testing.assert_close(plain, rounded, rtol=0, atol=0.1)  # a small perturbation


def test_ternary_types_take_q8_k_activations():
    """ggml multiplies TQ1_0/TQ2_0 weights by Q8_K activation blocks, as the k-quants."""
    from lowbit.evaluation.llamacpp import _rounder

    for t in ("TQ1_0", "TQ2_0", "Q4_K"):
        assert _rounder(t, 512) is round_q8_k
        assert _rounder(t, 576) is None  # no such tensor: 256-wide blocks
    assert _rounder("Q4_0", 576) is not round_q8_k
