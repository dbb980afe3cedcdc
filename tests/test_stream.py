"""Streamed models: decoder blocks read from disk when the runner or the evaluation reaches
them, with the same results as the model loaded whole."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.config import QuantConfig, WeightSpec
from lowbit.errors import LowbitError
from lowbit.evaluation.metrics import evaluate
from lowbit.export.checkpoint import quant_layers
from lowbit.models.arch import decoder_layers
from lowbit.models.stream import is_meta, load_streamed, stream_of
from tests.test_runner import calib, tiny_gemma3


def _block_params_on_meta(model) -> bool:
    _, layers = decoder_layers(model)
    return all(is_meta(p) for p in layers.parameters())


def test_blocks_wait_on_disk_and_evaluation_matches(tiny_dir):
    whole, tok, _ = lowbit.load(str(tiny_dir))
    streamed, _, _ = lowbit.load(str(tiny_dir), stream=True)
    assert _block_params_on_meta(streamed)
    assert not is_meta(streamed.model.embed_tokens.weight)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight  # tied, read once
    windows = calib(len(tok), n=5, length=48, seed=1)
    a = evaluate(whole, windows)
    b = evaluate(streamed, windows)
    assert b.ppl == pytest.approx(a.ppl, rel=1e-6)
    assert b.window_nll == pytest.approx(a.window_nll, rel=1e-5)
    assert _block_params_on_meta(streamed)  # read for the pass, dropped afterwards
    assert stream_of(streamed).loads == 2 + 2 * 9  # embedding and final norm at load, each block's 9 tensors once


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantizing_a_streamed_model_gives_the_same_codes(tiny_dir, method):
    """Same codes; and the quantized model, evaluated a block at a time, gives the whole
    model's figures (activations dynamic per tensor: each window runs alone)."""
    from lowbit.config import ActSpec

    whole, tok, _ = lowbit.load(str(tiny_dir))
    streamed, _, _ = lowbit.load(str(tiny_dir), stream=True)
    cfg = QuantConfig(method=method, weight=WeightSpec(bits=4, group_size=32, symmetric=False), calib_precision="fp32",
                      act=ActSpec(bits=6, dynamic=True, granularity="tensor"))
    windows = calib(len(tok), n=4, length=32)
    lowbit.quantize(whole, cfg, windows, progress=False)
    lowbit.quantize(streamed, cfg, windows, progress=False)
    assert not any(is_meta(t) for t in streamed.state_dict().values())  # every block read, and kept
    qa, qb = quant_layers(whole), quant_layers(streamed)
    assert qa.keys() == qb.keys() and qa
    for name in qa:
        assert torch.equal(qa[name].dequantized_weight(), qb[name].dequantized_weight()), name
    evals = calib(len(tok), n=3, length=40, seed=2)
    a, b = evaluate(whole, evals), evaluate(streamed, evals)
    assert b.window_nll == pytest.approx(a.window_nll, rel=1e-6)


def test_gemma3_streamed_evaluation_matches(tmp_path, tiny_dir):
    tok = lowbit.load(str(tiny_dir))[1]
    model = tiny_gemma3(len(tok))
    model.save_pretrained(tmp_path / "g", max_shard_size="100KB")  # several shards and an index
    assert (tmp_path / "g" / "model.safetensors.index.json").is_file()
    streamed = load_streamed(tmp_path / "g", "tiny gemma")
    windows = calib(len(tok), n=3, length=40)
    a, b = evaluate(model, windows), evaluate(streamed, windows)
    assert b.window_nll == pytest.approx(a.window_nll, rel=1e-5)


def _single_file(folder):
    files = list(folder.glob("*.safetensors"))
    assert len(files) == 1
    return files[0]


def test_a_missing_or_misshapen_tensor_is_named(tmp_path, tiny_dir, excerpt):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    f = _single_file(bad)
    tensors = load_file(f)
    name = "model.layers.1.mlp.up_proj.weight"
    del tensors[name]
    save_file(tensors, f, metadata={"format": "pt"})
    model = load_streamed(bad, "bad")  # blocks are read later
    with pytest.raises(LowbitError, match=name.replace(".", r"\.")):
        evaluate(model, calib(100, n=1, length=8))
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(LowbitError, match=r"up_proj\.weight .*shape \(3, 3\)"):
        evaluate(load_streamed(bad, "bad"), calib(100, n=1, length=8))
    tensors[name] = torch.full((160, 96), float("nan"))
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(LowbitError, match=r"up_proj\.weight has 15360 NaN"):
        load_streamed(bad, "bad")  # found at load, before any work


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_footprint_shapes_count_the_blocks_linears(arch):
    """The memory prediction's parameter counts equal those of the real modules."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.models.arch import block_linears
    from lowbit.models.footprint import Shapes, quantize_peak

    common = dict(vocab_size=500, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2)
    cfg = AutoConfig.for_model(arch, **common, **({"head_dim": 32} if arch == "gemma3_text" else {}))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    _, layers = decoder_layers(model)
    s = Shapes.from_config(cfg)
    assert s.block_params == sum(m.weight.numel() for m in block_linears(layers[0]).values())
    linears = sum(m.weight.numel() for b in layers for m in block_linears(b).values())
    embeds = sum(p.numel() for n, p in model.named_parameters() if "embed" in n or "lm_head" in n)
    assert s.params == linears + embeds
    whole, streamed = quantize_peak(s, "gptq", stream=False), quantize_peak(s, "gptq")
    assert whole["float blocks"] == 3 * streamed["float blocks"] and streamed["total"] < whole["total"]
    with pytest.raises(LowbitError, match="not 'qllm'"):
        quantize_peak(s, "qllm")


def test_memory_command_predicts_a_quantization(tiny_dir):
    from typer.testing import CliRunner

    from lowbit.cli.main import app

    r = CliRunner().invoke(app, ["memory", "llama-70b", "--method", "gptq"])
    assert r.exit_code == 0, r.output
    assert "quantized blocks" in r.output and "68.98B parameters" in r.output
    r = CliRunner().invoke(app, ["memory", str(tiny_dir), "--method", "awq", "--no-stream"])
    assert r.exit_code == 0 and "total" in r.output, r.output


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_gguf_to_float32_equals_transformers_loader(arch, tmp_path, monkeypatch, excerpt):
    """The tensor-at-a-time conversion gives exactly the tensors transformers' own GGUF
    loading gives (q/k permutation undone, Gemma's norms offset), in several shards."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.export.gguf_writer import export_gguf
    from lowbit.models import gguf_float
    from tests.test_gguf_export import _randomize, bpe_tokenizer

    tok = bpe_tokenizer(excerpt)
    common = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    extra = {"head_dim": 32, "sliding_window": 32} if arch == "gemma3_text" else {"tie_word_embeddings": arch == "llama"}
    torch.manual_seed(0)
    model = _randomize(AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **common, **extra)))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    src, _, info = lowbit.load(str(folder))
    gguf = export_gguf(src, tok, tmp_path / "m.gguf", "Q8_0", source=info["source"]).path
    monkeypatch.setattr(gguf_float, "SHARD_BYTES", 200_000)
    out = tmp_path / "fp32"
    out.mkdir()
    gguf_float.gguf_to_float32(gguf, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).state_dict()
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k


def test_a_checkpoint_evaluated_block_wise_matches(tiny_dir, tmp_path):
    model, tok, _ = lowbit.load(str(tiny_dir))
    cfg = QuantConfig(weight=WeightSpec(bits=3, group_size=32, symmetric=False))
    report = lowbit.quantize(model, cfg, progress=False)
    lowbit.save(model, tok, tmp_path / "ckpt", report)
    whole, _, _ = lowbit.load(str(tmp_path / "ckpt"))
    blocks, _, _ = lowbit.load(str(tmp_path / "ckpt"), stream=True)
    evals = calib(len(tok), n=3, length=40, seed=3)
    a, b = evaluate(whole, evals), evaluate(blocks, evals)
    assert b.window_nll == pytest.approx(a.window_nll, rel=1e-6)


def test_quantize_command_streamed_or_whole_writes_the_same(tiny_dir, tmp_path, cache):
    from tests.test_cli import SMALL, run

    for flag, out in (("--stream", tmp_path / "a"), ("--no-stream", tmp_path / "b")):
        r = run("quantize", tiny_dir, "--method", "gptq", "-o", out, flag, *SMALL)
        assert r.exit_code == 0, r.output
    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (tmp_path / "a", tmp_path / "b"))
    assert ea["quantized"]["ppl"] == pytest.approx(eb["quantized"]["ppl"], rel=1e-6)
    assert ea["original"]["ppl"] == pytest.approx(eb["original"]["ppl"], rel=1e-6)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_an_untied_input_embedding_waits_on_disk_between_uses(tmp_path, tiny_dir):
    """Qwen-style untied embedding: dropped after the first block's inputs are made, read
    again before the model is handed back (evaluation, quantization)."""
    from lowbit.runner import run_blocks

    tok = lowbit.load(str(tiny_dir))[1]
    from tests.conftest import tiny_llama

    model = tiny_llama(len(tok))
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
    model.save_pretrained(tmp_path / "m")
    whole = _hf_model(tmp_path / "m")
    streamed = load_streamed(tmp_path / "m", "untied")
    assert streamed.lm_head.weight is not streamed.model.embed_tokens.weight
    assert is_meta(streamed.lm_head.weight)  # an untied head waits on disk until the head runs
    seen = []
    run_blocks(streamed, lambda ctx: seen.append((is_meta(streamed.model.embed_tokens.weight), is_meta(streamed.lm_head.weight))),
               calib(len(tok)))
    assert seen == [(True, True), (True, True)]  # neither vocabulary matrix during the block loop
    evals = calib(len(tok), n=2, length=24, seed=4)
    a, b = evaluate(whole, evals), evaluate(streamed, evals)
    assert b.window_nll == pytest.approx(a.window_nll, rel=1e-6)
    assert not is_meta(streamed.model.embed_tokens.weight)  # complete again afterwards


def _hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
