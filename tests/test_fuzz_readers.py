"""Seeded fuzzing of the readers: damaged GGUF files and lowbit checkpoints end in success
or one LowbitError line, never another exception or a hang."""

from __future__ import annotations

import json
import random
import shutil
import signal
import struct
from contextlib import contextmanager

import numpy as np
import pytest

import lowbit
from lowbit.config import QuantConfig, WeightSpec
from lowbit.errors import LowbitError
from lowbit.export.checkpoint import load_checkpoint, read_meta
from lowbit.export.inspect import inspect_checkpoint
from lowbit.models.gguf_read import open_gguf

SECONDS_PER_CASE = 5


@contextmanager
def time_bound(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"case ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def outcome(fn) -> str:
    """'ok' or 'error'; any exception other than a one-line LowbitError fails the test."""
    with time_bound(SECONDS_PER_CASE):
        try:
            fn()
        except LowbitError as e:
            assert "\n" not in str(e) and str(e), repr(str(e))
            return "error"
    return "ok"


# ---- GGUF ----


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    import gguf

    path = tmp_path_factory.mktemp("fuzz-gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_string("general.name", "fuzz")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_array("tokenizer.ggml.tokens", ["a", "bc", "def"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0])
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((3, 8)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((8, 8)).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _read_gguf(path):
    reader = open_gguf(path)
    for t in reader.tensors:
        np.asarray(t.data).sum()
    for f in reader.fields.values():
        f.contents()


def _key_length_offsets(data: bytes) -> list[int]:
    """Offsets of every uint64 length field in the kv section (keys and string values)."""
    offs, pos = [], 24
    (n_kv,) = struct.unpack_from("<Q", data, 16)
    for _ in range(n_kv):
        offs.append(pos)
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vtype == 8:
            offs.append(pos)
            (n,) = struct.unpack_from("<Q", data, pos)
            pos += 8 + n
        elif vtype == 9:
            (itype, count) = struct.unpack_from("<IQ", data, pos)
            offs.append(pos + 4)  # the array's item count
            pos += 12
            for _ in range(count):
                if itype == 8:
                    (n,) = struct.unpack_from("<Q", data, pos)
                    pos += 8 + n
                else:
                    pos += 4
        else:
            pos += {4: 4, 6: 4}[vtype]
    return offs


def test_fuzz_gguf_reader(gguf_bytes, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf_bytes)
    assert outcome(lambda: _read_gguf(path)) == "ok"
    rng = random.Random(1234)
    lengths = _key_length_offsets(gguf_bytes) + [8, 16]  # + tensor count, kv count
    header_end = max(lengths) + 200
    seen = {"ok": 0, "error": 0}
    for case in range(300):
        data = bytearray(gguf_bytes)
        kind = case % 4
        if kind == 0:  # byte flips in the header
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(min(header_end, len(data)))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncation at a random point
            data = data[: rng.randrange(len(data))]
        elif kind == 2:  # a huge length field
            huge = rng.choice([2**60, 2**63, 2**64 - 1, len(data) * 2])
            struct.pack_into("<Q", data, rng.choice(lengths), huge)
        else:  # flips anywhere, data included
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        seen[outcome(lambda: _read_gguf(path))] += 1
    assert seen["error"] > 100 and seen["ok"] > 10, seen


# ---- lowbit checkpoints ----


@pytest.fixture(scope="module")
def ckpt(tiny_dir, tmp_path_factory):
    model, tok, _ = lowbit.load(str(tiny_dir))
    report = lowbit.quantize(model, QuantConfig(weight=WeightSpec(bits=4, group_size=32)), progress=False)
    return lowbit.save(model, tok, tmp_path_factory.mktemp("fuzz-ckpt") / "ckpt", report)


def _read_ckpt(folder, load: bool):
    read_meta(folder)
    inspect_checkpoint(folder)
    if load:
        load_checkpoint(folder)


def _garbage(rng: random.Random):
    return rng.choice([None, -1, 0, 2**62, 1.5, "x", True, [], {}, [1, 2], {"bits": 4}])


def _edit_json(node, rng: random.Random):
    """One random edit somewhere in a JSON tree: drop a key, replace a value, or add junk."""
    while True:
        if isinstance(node, dict) and node:
            key = rng.choice(sorted(node))
            action = rng.random()
            if action < 0.25:
                del node[key]
                return
            if action < 0.5 or not isinstance(node[key], (dict, list)) or not node[key]:
                node[key] = _garbage(rng)
                return
            node = node[key]
        elif isinstance(node, list) and node:
            i = rng.randrange(len(node))
            if rng.random() < 0.5 or not isinstance(node[i], (dict, list)):
                node[i] = _garbage(rng)
                return
            node = node[i]
        else:
            return


def test_fuzz_checkpoint_reader(ckpt, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    weights, cfg = folder / "model.safetensors", folder / "lowbit_config.json"
    good_w, good_cfg = weights.read_bytes(), cfg.read_text()
    (n,) = struct.unpack("<Q", good_w[:8])
    assert outcome(lambda: _read_ckpt(folder, load=True)) == "ok"
    rng = random.Random(99)
    seen = {"ok": 0, "error": 0}
    for case in range(240):
        data, text = bytearray(good_w), good_cfg
        kind = case % 4
        if kind == 0:  # flips in the safetensors header (length field included)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(8 + n)] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncation, or a huge header length
            if rng.random() < 0.7:
                data = data[: rng.randrange(len(data))]
            else:
                struct.pack_into("<Q", data, 0, rng.choice([2**62, 2**64 - 1, n + 1, n - 1]))
        elif kind == 2:  # a random edit of lowbit_config.json
            meta = json.loads(good_cfg)
            for _ in range(rng.randint(1, 3)):
                _edit_json(meta, rng)
            text = json.dumps(meta)
        else:  # garbage text in lowbit_config.json
            pos = rng.randrange(len(good_cfg))
            text = good_cfg[:pos] + rng.choice(["}", "\x00", "[", '"', "9" * 400, "\ud800"]) + good_cfg[pos + 1 :]
        weights.write_bytes(bytes(data))
        cfg.write_text(text, errors="surrogateescape" if "\ud800" not in text else "surrogatepass")
        # the full load (transformers model build) is the slow part: do it for one case in four
        seen[outcome(lambda: _read_ckpt(folder, load=case % 8 < 2))] += 1
    assert seen["error"] > 100, seen
