"""lowbit generate / chat and lowbit.generation on the tiny model."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit.cli import app
from lowbit.config import ActSpec, QuantConfig, WeightSpec
from lowbit.errors import LowbitError
from lowbit.generation import chat_prompt, generate
from lowbit.nn.qlinear import kernel_counts

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def ckpt(tiny_dir, tmp_path_factory):
    """An RTN W4 g32 checkpoint of the tiny model, with a chat template."""
    model, tok, info = lowbit.load(str(tiny_dir))
    cfg = QuantConfig(method="rtn", weight=WeightSpec(bits=4, group_size=32, symmetric=False))
    report = lowbit.quantize(model, cfg, progress=False)
    tok.chat_template = TEMPLATE
    return lowbit.save(model, tok, tmp_path_factory.mktemp("gen") / "ckpt", report, source=info["source"])


def test_greedy_generation_streams_what_it_returns_and_is_deterministic(ckpt):
    model, tok, _ = lowbit.load(str(ckpt), kernel="auto")
    assert kernel_counts(model) == {"int4": 14}
    pieces: list[str] = []
    g = generate(model, tok, "The ", max_new_tokens=12, on_text=pieces.append)
    assert g.new_tokens == 12 and g.prompt_tokens == len(tok("The ")["input_ids"])
    assert "".join(pieces) == g.text  # the stream is the whole answer, word by word
    assert g.prefill_s > 0 and g.decode_s > 0 and g.decode_tokens_per_s > 0
    assert generate(model, tok, "The ", max_new_tokens=12).text == g.text
    # the packed model continues the prompt as the reference path does, token for token
    ref, _, _ = lowbit.load(str(ckpt))
    assert generate(ref, tok, "The ", max_new_tokens=12).text == g.text


def test_sampling_follows_the_seed(ckpt):
    model, tok, _ = lowbit.load(str(ckpt), kernel="auto")
    a = generate(model, tok, "a", max_new_tokens=20, temperature=1.5, seed=1).text
    assert generate(model, tok, "a", max_new_tokens=20, temperature=1.5, seed=1).text == a
    assert any(generate(model, tok, "a", max_new_tokens=20, temperature=1.5, seed=s).text != a for s in (2, 3, 4))


def test_bad_generation_options_are_one_line_errors(ckpt, tiny_dir):
    model, tok, _ = lowbit.load(str(ckpt), kernel="auto")
    with pytest.raises(LowbitError, match="--max-new-tokens must be at least 1"):
        generate(model, tok, "a", max_new_tokens=0)
    with pytest.raises(LowbitError, match="--top-p"):
        generate(model, tok, "a", temperature=1.0, top_p=0)
    with pytest.raises(LowbitError, match="exceeds the model's"):
        generate(model, tok, "a", max_new_tokens=10**6)
    with pytest.raises(LowbitError, match="not a lowbit checkpoint"):
        lowbit.load(str(tiny_dir), kernel="int4")
    _, plain_tok, _ = lowbit.load(str(tiny_dir))
    with pytest.raises(LowbitError, match="no chat template"):
        chat_prompt(plain_tok, [{"role": "user", "content": "hi"}])


def test_auto_kernel_puts_w8a8_layers_on_int8(tiny_dir, tmp_path):
    model, tok, info = lowbit.load(str(tiny_dir))
    cfg = QuantConfig(method="rtn", weight=WeightSpec(bits=8, group_size=None), act=ActSpec())
    out = lowbit.save(model, tok, tmp_path / "w8a8", lowbit.quantize(model, cfg, progress=False), source=info["source"])
    packed, _, _ = lowbit.load(str(out), kernel="auto")
    assert kernel_counts(packed) == {"int8": 14}
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(packed(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-3, rtol=1e-3)


def test_generate_and_chat_commands(ckpt):
    runner = CliRunner()
    r = runner.invoke(app, ["generate", str(ckpt), "The ", "-n", "8"])
    assert r.exit_code == 0, r.output
    assert "14 on int4" in r.output and "8 new tokens" in r.output and "tokens/s decode" in r.output
    r = runner.invoke(app, ["chat", str(ckpt), "-n", "6", "--system", "be brief"], input="hello\nand again\n\n")
    assert r.exit_code == 0, r.output
    assert r.output.count("6 new tokens") == 2
    r = runner.invoke(app, ["generate", str(ckpt), "x", "--kernel", "cuda"])
    assert r.exit_code == 2 and "unknown kernel 'cuda'" in r.output
