"""The lowbit checkpoint: exact reload, byte accounting, corrupt files, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.config import ActSpec, QuantConfig, WeightSpec
from lowbit.errors import LowbitError
from lowbit.export.inspect import inspect_checkpoint
from lowbit.formats.memory import weight_storage
from tests.test_runner import calib

CONFIGS = {
    "w4g32-sym": QuantConfig(weight=WeightSpec(bits=4, group_size=32)),
    "w3g64-asym-ragged": QuantConfig(weight=WeightSpec(bits=3, group_size=64, symmetric=False)),
    "w2-channel": QuantConfig(weight=WeightSpec(bits=2, group_size=None, symmetric=False, scale_dtype="bfloat16")),
    "w8a8-dynamic": QuantConfig(weight=WeightSpec(bits=8, group_size=None), act=ActSpec(bits=8)),
    "w8a8-static": QuantConfig(weight=WeightSpec(bits=8, group_size=None), act=ActSpec(bits=8, dynamic=False, granularity="tensor")),
    "a8-only": QuantConfig(weight=None, act=ActSpec(bits=8, group_size=32)),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reload_gives_identical_logits(tiny_dir, tmp_path, name):
    model, tok, info = lowbit.load(str(tiny_dir))
    windows = calib(len(tok))
    report = lowbit.quantize(model, CONFIGS[name], windows, progress=False)
    out = lowbit.save(model, tok, tmp_path / "ckpt", report, source=info["source"])
    again, tok2, info2 = lowbit.load(str(out))
    saved, expected = dict(info2["checkpoint"]["quantization"]), CONFIGS[name].to_dict()
    assert saved.pop("calib_precision") in ("fp32", "bf16")  # "auto" is resolved and recorded
    expected.pop("calib_precision")
    assert saved == expected
    assert info2["source"] == info["source"]
    ids = windows[:2]
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = again(input_ids=ids).logits
    assert torch.equal(a, b)
    assert tok2("Anarchism").input_ids == tok("Anarchism").input_ids


def test_inspect_reads_exact_bytes(tiny_dir, tmp_path):
    model, tok, _ = lowbit.load(str(tiny_dir))
    spec = WeightSpec(bits=3, group_size=64, symmetric=False)
    report = lowbit.quantize(model, QuantConfig(weight=spec), progress=False)
    out = lowbit.save(model, tok, tmp_path / "ckpt", report)
    info = inspect_checkpoint(out)
    row = {r["layer"]: r for r in info["layers"]}["model.layers.0.mlp.down_proj"]
    assert row["bytes"] == weight_storage(96, 160, spec).total  # codes + scales + zeros, no bias
    assert info["summary"]["n_params"] == sum(p.numel() for p in lowbit.load(str(tiny_dir))[0].parameters())
    assert report.storage["bits_per_weight"] == pytest.approx(info["summary"]["quantized_bits_per_weight"])


def _quantized(tiny_dir, tmp_path):
    model, tok, _ = lowbit.load(str(tiny_dir))
    report = lowbit.quantize(model, QuantConfig(weight=WeightSpec(bits=4, group_size=32)), progress=False)
    return lowbit.save(model, tok, tmp_path / "ckpt", report)


def test_truncated_safetensors_is_a_clear_error(tiny_dir, tmp_path):
    out = _quantized(tiny_dir, tmp_path)
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(LowbitError, match="model.safetensors is (corrupt or )?truncated"):
        lowbit.load(str(out))
    with pytest.raises(LowbitError, match="truncated"):
        inspect_checkpoint(out)
    f.write_bytes(b"\x00" * 4)
    with pytest.raises(LowbitError, match="model.safetensors is (corrupt or )?truncated"):
        lowbit.load(str(out))


def test_malformed_config_is_a_clear_error(tiny_dir, tmp_path):
    out = _quantized(tiny_dir, tmp_path)
    cfg = out / "lowbit_config.json"
    meta = json.loads(cfg.read_text())
    meta["layers"]["model.layers.0.mlp.nope"] = meta["layers"].pop("model.layers.0.mlp.up_proj")
    cfg.write_text(json.dumps(meta))
    with pytest.raises(LowbitError, match="names layer model.layers.0.mlp.nope"):
        lowbit.load(str(out))
    cfg.write_text("{not json")
    with pytest.raises(LowbitError, match="not valid JSON"):
        lowbit.load(str(out))


def test_wrong_tensor_shapes_are_a_clear_error(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    out = _quantized(tiny_dir, tmp_path)
    f = out / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.1.mlp.up_proj.scales"] = tensors["model.layers.1.mlp.up_proj.scales"][:, :1].contiguous()
    save_file(tensors, str(f))
    with pytest.raises(LowbitError, match="damaged"):  # the content hash sees it first
        lowbit.load(str(out))
    with pytest.raises(LowbitError, match="up_proj"):  # and the shape check without it
        lowbit.load(str(out), verify=False)


def test_save_refuses_foreign_folders_and_leaves_nothing_half_written(tiny_dir, tmp_path):
    model, tok, _ = lowbit.load(str(tiny_dir))
    report = lowbit.quantize(model, QuantConfig(weight=WeightSpec(bits=4, group_size=32)), progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(LowbitError, match="not a lowbit checkpoint"):
        lowbit.save(model, tok, foreign, report)
    assert (foreign / "notes.txt").read_text() == "keep me"

    def boom(folder):
        raise RuntimeError("disk full")

    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        lowbit.save(model, tok, target, report, write_more=boom)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == [foreign]  # no temporary folder left behind
    lowbit.save(model, tok, target, report)  # and a good save replaces nothing foreign
    lowbit.save(model, tok, target, report)  # overwriting a lowbit checkpoint is fine
    assert (target / "model.safetensors").is_file()


def test_unquantized_model_cannot_be_saved(tiny_dir, tmp_path):
    model, tok, _ = lowbit.load(str(tiny_dir))
    with pytest.raises(LowbitError, match="not quantized"):
        lowbit.save(model, tok, tmp_path / "x", lowbit.QuantReport({}, [], 0.0))


def test_config_missing_keys_name_the_key(tiny_dir, tmp_path):
    out = _quantized(tiny_dir, tmp_path)
    cfg = out / "lowbit_config.json"
    good = json.loads(cfg.read_text())
    layer = "model.layers.0.mlp.up_proj"

    def damaged(edit, match):
        meta = json.loads(json.dumps(good))
        edit(meta)
        cfg.write_text(json.dumps(meta))
        for read in (lambda: inspect_checkpoint(out), lambda: lowbit.load(str(out))):
            with pytest.raises(LowbitError, match=match):
                read()

    damaged(lambda m: m.pop("layers"), '"layers"')
    damaged(lambda m: m["quantization"].pop("method"), '"method"')
    damaged(lambda m: m["layers"][layer]["weight"].pop("bits"), f"layer {layer} weight lacks 'bits'")
    damaged(lambda m: m["layers"][layer].pop("in_features"), f"layer {layer} lacks 'in_features'")


def test_corrupt_safetensors_entries_name_the_tensor(tiny_dir, tmp_path):
    import struct

    out = _quantized(tiny_dir, tmp_path)
    f = out / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")

    def damaged(edit, match):
        h = json.loads(json.dumps(header))
        edit(h[name])
        raw = json.dumps(h, separators=(",", ":")).encode().ljust(n)
        assert len(raw) == n
        f.write_bytes(data[:8] + raw + data[8 + n :])
        with pytest.raises(LowbitError, match=match):
            inspect_checkpoint(out)

    damaged(lambda e: e.pop("data_offsets"), f"tensor {name} has corrupt data_offsets")
    damaged(lambda e: e.update(data_offsets=[-1, 3]), f"tensor {name} has corrupt data_offsets")
    damaged(lambda e: e.update(dtype="Q9"), f"tensor {name} has unknown dtype")
    damaged(lambda e: e.update(shape=[1]), f"tensor {name} of shape")
    damaged(lambda e: e.update(shape="x"), f"tensor {name} has a corrupt shape")


def test_flipped_tensor_bytes_are_found_and_named(tiny_dir, tmp_path):
    import struct

    from lowbit.export.checkpoint import load_checkpoint

    out = _quantized(tiny_dir, tmp_path)
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = "model.layers.1.mlp.down_proj.qweight"
    start = 8 + n + header[name]["data_offsets"][0]
    data[start + 5] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(LowbitError, match=f"model.safetensors is damaged: tensor data of {name} differs"):
        lowbit.load(str(out))
    load_checkpoint(out, verify=False)  # the flip is a valid code: loads when asked not to check
    i = data.index(b'"pt"', 8, 8 + n)
    data[i + 2] = ord("u")  # metadata "pt" -> "pu": still a valid header, but not the one written
    f.write_bytes(bytes(data))
    with pytest.raises(LowbitError, match="model.safetensors is damaged: .*header"):
        lowbit.load(str(out))


def test_checkpoints_without_hashes_still_load(tiny_dir, tmp_path):
    out = _quantized(tiny_dir, tmp_path)
    cfg = out / "lowbit_config.json"
    meta = json.loads(cfg.read_text())
    assert set(meta["hashes"]["model.safetensors"]["tensors"]) >= {"model.layers.0.mlp.up_proj.qweight"}
    del meta["hashes"]
    cfg.write_text(json.dumps(meta))
    lowbit.load(str(out))
