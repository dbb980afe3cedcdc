"""Option parsing, per-method defaults and what the CLI prints (issue 9's defects 2-4, 7, 8,
13, 14 and the defaults): each test failed before its fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import lowbit
from lowbit import LowbitError, QuantConfig, WeightSpec
from lowbit.algorithms import REGISTRY, describe_options, load_all, method_config
from lowbit.config import parse_field
from tests.test_cli import SMALL, one_line_error, run


# --- typed option values ------------------------------------------------------------------


@pytest.mark.parametrize("text,value", [("true", True), ("False", False), ("yes", True), ("no", False), ("1", True), ("0", False)])
def test_booleans_accept_exactly_the_six_words(text, value):
    assert parse_field(text, bool, "x") is value


@pytest.mark.parametrize("text", ["maybe", "yes!", "2", "", "on"])
def test_other_boolean_words_are_errors(text):
    with pytest.raises(LowbitError, match="must be true or false"):
        parse_field(text, bool, "x")


def test_numbers_and_optionals_follow_the_declared_type():
    assert parse_field("0.05", float, "x") == 0.05 and parse_field("3", float, "x") == 3.0
    assert parse_field("none", float | None, "x") is None and parse_field("6", float | None, "x") == 6.0
    for bad, kind in (("abc", float), ("nan", float), ("2.5", int), (True, int), ("x", int | None)):
        with pytest.raises(LowbitError):
            parse_field(bad, kind, "x")


def test_gptq_string_options_are_parsed_by_type():
    algo = lowbit.make_algorithm(method_config("gptq", options={"act_order": "no", "static_groups": "yes", "damp_percent": "0.05"}))
    assert algo.options.act_order is False and algo.options.static_groups is True and algo.options.damp_percent == 0.05
    assert algo.config.options == {"act_order": False, "static_groups": True, "damp_percent": 0.05}  # stored typed


@pytest.mark.parametrize(
    "option,fragment",
    [
        ("damp_percent=abc", "method gptq option damp_percent must be a finite number, got 'abc'"),
        ("act_order=maybe", "method gptq option act_order must be true or false"),
        ("static_groups=yes!", "method gptq option static_groups must be true or false"),
        ("block_size=1.5", "method gptq option block_size must be an integer, got '1.5'"),
    ],
)
def test_bad_option_values_are_one_line_errors(option, fragment, tiny_dir, tmp_path, cache):
    out = tmp_path / "out"
    one_line_error(run("quantize", tiny_dir, "-m", "gptq", "--option", option, "-o", out, *SMALL), fragment)
    assert not out.exists()


def test_act_order_no_turns_act_order_off(tiny_dir, tmp_path, cache):
    out = tmp_path / "q"
    r = run("quantize", tiny_dir, "-m", "gptq", "--option", "act_order=no", "--no-eval", "-o", out, *SMALL)
    assert r.exit_code == 0, r.output
    stored = json.loads((out / "lowbit_config.json").read_text())["quantization"]["options"]
    assert stored == {"act_order": False}


# --- patterns -------------------------------------------------------------------------------


def test_bad_regular_expressions_are_named():
    with pytest.raises(LowbitError, match=r"ignore pattern 're:\[' is not a valid regular expression"):
        QuantConfig(ignore=("re:[",))
    with pytest.raises(LowbitError, match="override pattern 're:\\(' is not a valid"):
        QuantConfig(overrides={"re:(": {"bits": 8}})


def test_ignore_with_a_bad_regex_on_the_command_line(tiny_dir, tmp_path, cache):
    one_line_error(run("quantize", tiny_dir, "--ignore", "re:[", "-o", tmp_path / "out", *SMALL), "re:[", "regular expression")


def test_override_takes_a_regular_expression(tiny_dir, tmp_path, cache):
    out = tmp_path / "q"
    r = run("quantize", tiny_dir, "--override", "re:.*q_proj:bits=8,group_size=channel", "--no-eval", "-o", out, *SMALL)
    assert r.exit_code == 0, r.output
    layers = json.loads((out / "lowbit_config.json").read_text())["layers"]
    for name, entry in layers.items():
        want = (8, None) if name.endswith("q_proj") else (4, 64)
        assert (entry["weight"]["bits"], entry["weight"]["group_size"]) == want, name


def test_override_values_are_typed():
    cfg = QuantConfig(overrides={"*.down_proj": {"bits": "8", "symmetric": "no"}})
    spec = cfg.weight_spec_for("model.layers.0.mlp.down_proj")
    assert spec.bits == 8 and spec.symmetric is False
    with pytest.raises(LowbitError, match="override '\\*.down_proj' symmetric must be true or false"):
        QuantConfig(overrides={"*.down_proj": {"symmetric": "maybe"}})


@pytest.mark.parametrize("size", ["0", "-1", "-5"])
def test_group_size_zero_or_negative_is_an_error(size, tiny_dir, tmp_path, cache):
    one_line_error(run("quantize", tiny_dir, "-g", size, "-o", tmp_path / "out", *SMALL), "--group-size must be a positive integer or 'channel'")


# --- defaults -------------------------------------------------------------------------------


def test_each_method_defaults_to_its_authors_formats():
    assert method_config("awq").weight == WeightSpec(bits=4, group_size=64, symmetric=False)
    assert method_config("gptq").weight.symmetric is False and method_config("rtn").weight.symmetric is False
    sq = method_config("smoothquant")
    assert (sq.weight.bits, sq.weight.group_size, sq.weight.symmetric) == (8, None, True)
    assert sq.act is not None and sq.act.bits == 8 and sq.act.dynamic
    li = lowbit.make_algorithm(method_config("llm-int8")).config
    assert (li.weight.bits, li.weight.group_size, li.weight.symmetric, li.act.outlier_threshold) == (8, None, True, 6.0)
    zq = method_config("zeroquant")
    assert zq.weight.symmetric and zq.act.bits == 8
    # what the caller says wins; act=False turns a default activation format off
    assert method_config("awq", {"symmetric": True}).weight.symmetric
    assert method_config("zeroquant", act=False).act is None
    static = method_config("smoothquant", act={"dynamic": False, "granularity": "tensor"})
    assert static.act.bits == 8 and not static.act.dynamic


def test_awq_without_asym_flag_is_asymmetric_on_the_command_line(tiny_dir, tmp_path, cache):
    out = tmp_path / "q"
    r = run("quantize", tiny_dir, "-m", "awq", "-b", "4", "-g", "32", "--no-eval", "-o", out, *SMALL)
    assert r.exit_code == 0, r.output
    w = json.loads((out / "lowbit_config.json").read_text())["quantization"]["weight"]
    assert w["symmetric"] is False
    r = run("quantize", tiny_dir, "-m", "awq", "-b", "4", "-g", "32", "--sym", "--no-eval", "-o", tmp_path / "s", *SMALL)
    assert json.loads((tmp_path / "s" / "lowbit_config.json").read_text())["quantization"]["weight"]["symmetric"] is True


def test_smoothquant_runs_with_its_defaults_alone(tiny_dir, tmp_path, cache):
    out = tmp_path / "q"
    r = run("quantize", tiny_dir, "-m", "smoothquant", "--no-eval", "-o", out, *SMALL)
    assert r.exit_code == 0, r.output
    q = json.loads((out / "lowbit_config.json").read_text())["quantization"]
    assert q["weight"]["bits"] == 8 and q["weight"]["group_size"] is None and q["act"]["bits"] == 8


def test_methods_lists_defaults_and_explains_every_option():
    load_all()
    r = run("methods")
    assert r.exit_code == 0
    for name, cls in REGISTRY.items():
        assert f"{name}:" in r.output
        for key, default, text in describe_options(cls.Options):
            assert text and len(text) > 15, (name, key)
            assert f"--option {key}=" in r.output and text[:30] in " ".join(r.output.split())
    assert "defaults: W4 g64 asym" in r.output
    one_line_error(run("methods", "nope"), "unknown method 'nope'")


# --- what a run prints ----------------------------------------------------------------------


def test_non_interactive_progress_is_one_line_per_stage(tiny_dir, tmp_path, cache):
    """Without a terminal (CliRunner's stderr is not a TTY), no carriage-return frames."""
    small = [a for a in SMALL if a != "-q"]
    r = run("quantize", tiny_dir, "-o", tmp_path / "q", *small)
    assert r.exit_code == 0, r.output
    assert "\r" not in r.stderr
    stages = [ln for ln in r.stderr.splitlines() if ln.startswith("lowbit: ")]
    assert any(ln.startswith("lowbit: quantize rtn: 2 steps in ") for ln in stages), r.stderr
    assert any(ln.startswith("lowbit: evaluate quantized: ") for ln in stages), r.stderr


def _cli(*args, cache):
    env = {**os.environ, "LOWBIT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    code = "import sys; from lowbit.cli import run; sys.argv = ['lowbit'] + sys.argv[1:]; run()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def test_gptq_per_layer_lines_only_with_verbose(tiny_dir, tmp_path, cache):
    args = ["quantize", tiny_dir, "-m", "gptq", "--no-eval", *SMALL]
    quiet = _cli(*args, "-o", tmp_path / "a", cache=cache)
    assert quiet.returncode == 0, quiet.stderr
    assert "output error" not in quiet.stderr
    loud = _cli("-v", *args, "-o", tmp_path / "b", cache=cache)
    assert loud.returncode == 0, loud.stderr
    assert loud.stderr.count("output error") == 14  # 2 blocks x 7 Linears


def test_compare_measures_a_baseline_on_the_same_formats(tiny_dir, tmp_path, cache):
    out = tmp_path / "q"
    r = run("quantize", tiny_dir, "-m", "gptq", "-b", "3", "--compare", "rtn", "-o", out, *SMALL)
    assert r.exit_code == 0, r.output
    ev = json.loads((out / "eval.json").read_text())
    (cmp,) = ev["compare"]
    assert cmp["method"] == "rtn" and cmp["config"]["weight"] == ev["config"]["weight"]
    assert cmp["result"]["ppl"] != ev["quantized"]["ppl"]  # two real runs, not one copied
    assert "rtn" in r.output and "of weights against the float32 original" in r.output
    one_line_error(run("quantize", tiny_dir, "--compare", "rtn", "--no-eval", "-o", tmp_path / "n", *SMALL), "--compare", "needs --eval")
    one_line_error(run("quantize", tiny_dir, "--compare", "magic", "-o", tmp_path / "n", *SMALL), "unknown method 'magic'")
