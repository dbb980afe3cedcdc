"""The block-wise runner and the algorithm interface, on a tiny seeded Llama."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lowbit
from lowbit.algorithms.base import REGISTRY, Algorithm
from lowbit.config import ActSpec, QuantConfig, WeightSpec
from lowbit.errors import LowbitError
from lowbit.export.checkpoint import quant_layers
from lowbit.formats.weights import quantize_weight
from lowbit.models.arch import decoder_layers
from lowbit.nn.qlinear import QuantLinear
from lowbit.runner import capture_first_block_inputs, run_blocks
from tests.test_weights import rtn_reference


def calib(vocab: int, n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_input_groups_follow_the_forward_order(tiny):
    model, tok = tiny
    captured = []

    def qb(ctx):
        captured.append(ctx.groups())

    run_blocks(model, qb, calib(len(tok)))
    assert captured[0] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_rtn_without_data_matches_the_slow_reference(tiny):
    model, tok = tiny
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    spec = WeightSpec(bits=3, group_size=64, symmetric=False)
    report = lowbit.quantize(model, QuantConfig(weight=spec), progress=False)
    layers = quant_layers(model)
    assert set(layers) == set(originals)  # every Linear in the blocks, nothing else
    assert isinstance(model.lm_head, torch.nn.Linear)
    for name, w in originals.items():
        assert torch.allclose(layers[name].dequantized_weight(), rtn_reference(w, spec), atol=1e-6), name
    assert len(report.layers) == len(originals)
    assert all(r["weight_rel_error"] > 0 for r in report.layers)


def test_one_pass_output_equals_the_installed_quantized_block(tiny):
    """The block output the runner passes on is exactly what the installed QuantLinears
    compute, and each layer was observed on the output of the quantized layers before it."""
    model, tok = tiny
    windows = calib(len(tok))
    _, blocks = decoder_layers(model)
    inputs = capture_first_block_inputs(model, blocks[0], windows)
    seen: dict[str, torch.Tensor] = {}

    class Spy(lowbit.algorithms.rtn.RTN):
        def new_stats(self, name, module):
            class Keep:
                def update(self, x):
                    seen[name] = x.clone()

            return Keep()

    cfg = QuantConfig(weight=WeightSpec(bits=4, group_size=32), act=ActSpec(bits=8, dynamic=False, granularity="tensor"))
    algo = Spy(cfg)
    outs = []

    def qb(ctx):
        out = algo.quantize_block(ctx)
        outs.append(out)
        return out

    run_blocks(model, qb, windows)
    # replay with the installed modules, recording the input each QuantLinear receives
    replay: dict[str, torch.Tensor] = {}
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            hooks.append(m.register_forward_pre_hook(lambda mod, a, n=n: replay.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).clone())))
    h = inputs.hidden
    with torch.no_grad():
        for i, block in enumerate(blocks):
            h = block(h, **inputs.kwargs)
            h = h[0] if isinstance(h, tuple) else h
            assert torch.equal(h, outs[i]), f"block {i}"
    for hk in hooks:
        hk.remove()
    for name, x in seen.items():  # group leaders: q_proj, o_proj, gate_proj, down_proj
        assert torch.equal(replay[name], x), name
    assert any(n.endswith("o_proj") for n in seen)


def test_static_activation_scales_come_from_calibration(tiny):
    model, tok = tiny
    cfg = QuantConfig(weight=None, act=ActSpec(bits=8, dynamic=False, granularity="tensor", observer="percentile"))
    report = lowbit.quantize(model, cfg, calib(len(tok)), progress=False)
    scales = [r["act_scale"] for r in report.layers]
    assert len(scales) == 14 and all(s > 0 for s in scales)
    assert len(set(scales)) > 4  # layers see different ranges
    with pytest.raises(LowbitError, match="needs calibration data"):
        m2, _ = tiny
        lowbit.quantize(m2, cfg, None, progress=False)


def test_ignore_and_overrides(tiny):
    model, tok = tiny
    cfg = QuantConfig(weight=WeightSpec(bits=4, group_size=32), ignore=("*.k_proj",), overrides={"*down_proj": {"bits": 8, "group_size": None}})
    lowbit.quantize(model, cfg, progress=False)
    layers = quant_layers(model)
    assert not any(n.endswith("k_proj") for n in layers)
    down = layers["model.layers.0.mlp.down_proj"]
    assert down.wspec.bits == 8 and down.scales.shape[1] == 1


def test_quantize_is_deterministic(tiny_dir, tmp_path):
    files = []
    for k in range(2):
        model, tok, _ = lowbit.load(str(tiny_dir))
        cfg = QuantConfig(weight=WeightSpec(bits=4, group_size=32, observer="mse"), act=ActSpec(dynamic=False, granularity="tensor", observer="mse"))
        report = lowbit.quantize(model, cfg, calib(len(tok)), progress=False)
        out = lowbit.save(model, tok, tmp_path / f"run{k}", report)
        files.append((out / "model.safetensors").read_bytes())
    assert files[0] == files[1]


def test_registry_and_options():
    lowbit.algorithms.load_all()
    assert "rtn" in REGISTRY
    with pytest.raises(LowbitError, match="unknown method"):
        lowbit.make_algorithm(QuantConfig(method="nope"))
    with pytest.raises(LowbitError, match="has no option"):
        lowbit.make_algorithm(QuantConfig(method="rtn", options={"damp": 0.1}))

    @dataclasses.dataclass(frozen=True)
    class Opts:
        alpha: float = 0.5

    class WithOptions(Algorithm):
        name = "test-with-options"
        Options = Opts

        def solve(self, name, module, spec, stats):
            return quantize_weight(module.weight, spec, name=name)

    algo = WithOptions(QuantConfig(method="test-with-options", options={"alpha": 0.7}))
    assert algo.options.alpha == 0.7


def tiny_gemma3(vocab: int, layers: int = 3):
    """A small random Gemma 3 whose blocks differ in their arguments: sliding-window layers
    (local rotary embedding, window 16) and a full-attention layer (global rotary base)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                           sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"][:layers],
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_each_block_gets_its_own_arguments():
    """The runner feeds block i what the model's own forward gives it: on Gemma 3 the
    full-attention block's rotary embedding and mask differ from the sliding blocks'."""
    model = tiny_gemma3(120)
    windows = calib(120, n=3, length=40)
    _, blocks = decoder_layers(model)
    seen = {}
    hooks = [b.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[0] if isinstance(out, tuple) else out))
             for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in hooks:
        h.remove()
    outs = []
    run_blocks(model, lambda ctx: outs.append(ctx.forward()) or outs[-1], windows)
    for i in range(len(blocks)):
        torch.testing.assert_close(outs[i], seen[i], rtol=0, atol=1e-5, msg=f"block {i}")
