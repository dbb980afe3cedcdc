"""The command line: the main job on a tiny model, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli import app
from tests.conftest import EXCERPT

runner = CliRunner()
FIT = ["--seq-len", "64", "--calib-len", "32"]  # the tiny model has 256 positions; the defaults (512) are refused
SMALL = ["--data", str(EXCERPT), "--windows", "2", "--seq-len", "64", "--n-calib", "2", "--calib-len", "32", "-q"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    # what a terminal shows: progress bars redraw with carriage returns and clear themselves
    lines = [ln.split("\r")[-1] for ln in result.stderr.split("\n")]
    lines = [ln for ln in lines if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("cmd", [[], ["quantize"], ["eval"], ["inspect"], ["memory"], ["methods"]])
def test_help(cmd):
    r = run(*cmd, "--help")
    assert r.exit_code == 0 and "Usage" in r.output


@pytest.fixture
def keep_threads():
    """Commands set torch's thread count for the process; the tests after these get theirs back."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_quantize_eval_inspect_on_a_tiny_model(tiny_dir, tmp_path, cache, keep_threads):
    out = tmp_path / "q"
    r = run("quantize", tiny_dir, "-b", "4", "-g", "32", "--asym", "-o", out, *SMALL, "--threads", "1")
    assert r.exit_code == 0, r.output
    for f in ("model.safetensors", "lowbit_config.json", "eval.json", "report.json", "layers.png", "tokenizer.json"):
        assert (out / f).is_file(), f
    ev = json.loads((out / "eval.json").read_text())
    assert ev["quantized"]["ppl"] > 0 and 0 <= ev["quantized"]["top1"] <= 1 and ev["quantized"]["kl"] > 0
    assert ev["original"]["protocol"]["n_windows"] == 2
    assert json.loads((out / "report.json").read_text())["threads"] == 1 and ev["quantized"]["threads"] == 1
    threads = 2 if keep_threads == 1 else keep_threads  # another count than the run's
    r = run("eval", out, "--data", EXCERPT, "--windows", "2", "--seq-len", "64", "-q", "--json", tmp_path / "e.json", "-j", threads)
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["result"]["threads"] == threads
    assert again["result"]["ppl"] == pytest.approx(ev["quantized"]["ppl"], rel=1e-9)  # reload is exact
    assert again["result"]["kl"] == pytest.approx(ev["quantized"]["kl"], rel=1e-9)
    r = run("inspect", out)
    assert r.exit_code == 0 and "W4 g32 asym" in r.output
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    name = "model.layers.0.mlp.up_proj.qweight"
    data[8 + n + json.loads(data[8 : 8 + n])[name]["data_offsets"][0]] ^= 1  # another valid code
    f.write_bytes(bytes(data))
    quick = ["--data", EXCERPT, "--windows", "1", "--seq-len", "32", "-q", "--no-reference"]
    one_line_error(run("eval", out, *quick), "model.safetensors is damaged", name)
    r = run("eval", out, *quick, "--no-verify")
    assert r.exit_code == 0, r.output


def test_w8a8_static_cli(tiny_dir, tmp_path, cache):
    out = tmp_path / "s"
    r = run("quantize", tiny_dir, "-b", "8", "-g", "channel", "--act-bits", "8", "--act", "static", "--act-observer", "kl", "--act-sym", "-o", out, *SMALL)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "lowbit_config.json").read_text())
    assert meta["quantization"]["act"]["dynamic"] is False and meta["quantization"]["act"]["observer"] == "kl"


def test_memory_command():
    r = run("memory", "70B")
    assert r.exit_code == 0 and "280.00 GB" in r.output and "140.00 GB" in r.output
    r = run("memory", "7e9", "-f", "int4-g64")
    assert "3.72 GB" in r.output


def test_methods_command():
    r = run("methods")
    assert r.exit_code == 0 and "rtn" in r.output


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["quantize", "no/such/model.gguf", "-o", "{out}"], ["model path no/such/model.gguf does not exist"]),
        (["quantize", "{tiny}", "-b", "9", "-o", "{out}"], ["weight bits must be an integer from 2 to 8, got 9"]),
        (["quantize", "{tiny}", "-g", "0x", "-o", "{out}"], ["--group-size"]),
        (["quantize", "{tiny}", "-g", "64", "--strict-groups", "--no-eval", "-o", "{out}", *FIT], ["does not divide the input width 96", "model.layers.0"]),
        (["quantize", "{tiny}", "-g", "256", "--no-eval", "-o", "{out}", *FIT], ["group size 256 is larger than the input width 96"]),
        (["quantize", "{tiny}", "-m", "magic", "-o", "{out}"], ["unknown method 'magic'"]),
        (["quantize", "{tiny}", "--threads", "0", "-o", "{out}"], ["threads must be a positive integer, got 0"]),
        (["quantize", "{tiny}", "--option", "x=1", "-o", "{out}"], ["method rtn has no option x"]),
        (["quantize", "{tiny}", "--data", "{empty}", "-o", "{out}", *FIT], ["is empty"]),
        (["quantize", "{tiny}", "--data", "{short}", "-o", "{out}", *FIT], ["short.txt is too short"]),
        (["quantize", "{badgguf}", "-o", "{out}"], ["broken.gguf is truncated"]),
        (["quantize", "{nan}", "-o", "{out}"], ["has 1 NaN/inf values"]),
        (["quantize", "{pickle}", "-o", "{out}"], ["does not load pickled"]),
        (["eval", "{out}"], ["does not exist"]),
        (["inspect", "{tiny}"], ["is not a lowbit checkpoint"]),
    ],
)
def test_bad_input_gets_a_one_line_error_and_no_output(args, fragments, tiny_dir, tmp_path, cache):
    from lowbit.models.loader import load_model

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    nan = tmp_path / "nan-model"
    model, tok, _ = load_model(str(tiny_dir))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    model.save_pretrained(nan)
    tok.save_pretrained(nan)
    pickle = tmp_path / "pickled"
    pickle.mkdir()
    (pickle / "config.json").write_text((tiny_dir / "config.json").read_text())
    (pickle / "pytorch_model.bin").write_bytes(b"not really")
    out = tmp_path / "out"
    subst = {"{out}": out, "{tiny}": tiny_dir, "{empty}": empty, "{short}": short, "{badgguf}": bad, "{nan}": nan, "{pickle}": pickle}
    r = run(*[subst.get(a, a) for a in args])
    one_line_error(r, *fragments)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "awq"])
def test_export_of_a_missing_checkpoint_says_it_does_not_exist(fmt, tmp_path):
    missing = tmp_path / "nonexistent"
    one_line_error(run("export", fmt, missing, "-o", tmp_path / "x"), str(missing), "does not exist")
