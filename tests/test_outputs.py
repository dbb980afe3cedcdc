"""Writing outputs: unwritable paths fail before the work, modes follow the umask, dead
runs' temporaries are cleaned, an interrupted or killed run leaves nothing at the output."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowbit.cache import atomic_path, cache_lock, check_writable
from lowbit.errors import LowbitError
from tests.conftest import EXCERPT
from tests.test_cli import SMALL, one_line_error, run


@pytest.fixture
def blocker(tmp_path) -> Path:
    """A regular file: any path under it cannot be created, even by root."""
    f = tmp_path / "afile"
    f.write_text("x")
    return f


# --- check_writable and atomic_path --------------------------------------------------------


def test_check_writable(tmp_path, blocker, monkeypatch):
    check_writable(tmp_path / "new" / "deeper" / "out")  # missing folders are fine: they are created
    with pytest.raises(LowbitError, match=r"afile/out.*afile is not a folder"):
        check_writable(blocker / "out")
    with pytest.raises(LowbitError, match="afile is not a folder"):
        check_writable(blocker / "a" / "b")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a read-only folder answers
    with pytest.raises(LowbitError, match=rf"cannot write output {tmp_path}/x/y: folder {tmp_path} is not writable"):
        check_writable(tmp_path / "x" / "y")


@pytest.mark.parametrize("is_dir", [False, True])
def test_atomic_path_turns_os_errors_into_one_line(blocker, is_dir):
    with pytest.raises(LowbitError, match=r"cannot write .*afile/out"):
        with atomic_path(blocker / "out", is_dir=is_dir) as tmp:
            (tmp / "f").write_text("never")


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_modes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "folder", is_dir=True) as tmp:
            tmp.mkdir(exist_ok=True)
            (tmp / "f.json").write_text("{}")
            save_file({"a": torch.zeros(2)}, str(tmp / "w.safetensors"))  # safetensors creates files 0600
        with atomic_path(tmp_path / "single.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "folder") == 0o777 & ~umask
    assert mode(tmp_path / "folder" / "f.json") == 0o666 & ~umask
    assert mode(tmp_path / "folder" / "w.safetensors") == 0o666 & ~umask
    assert mode(tmp_path / "single.json") == 0o666 & ~umask


def test_cache_lock_makes_a_second_maker_wait(tmp_path):
    """Two makers of one cache entry: the second enters only after the first has left
    (so it finds the entry made instead of replacing it under the first's reader)."""
    import threading

    order = []
    entered = threading.Event()

    def first():
        with cache_lock(tmp_path / "entry"):
            order.append("first in")
            entered.set()
            time.sleep(0.3)
            order.append("first out")

    t = threading.Thread(target=first)
    t.start()
    entered.wait(5)
    with cache_lock(tmp_path / "entry"):
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"]
    assert not (tmp_path / "entry").exists()  # the lock is a hidden sibling, not the entry


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("is_dir", [False, True])
def test_dead_runs_temporaries_are_removed_live_ones_kept(tmp_path, is_dir):
    dead = tmp_path / f".out.{_dead_pid()}-abc123.tmp"
    live = tmp_path / f".out.{os.getpid()}-def456.tmp"  # a concurrent run (alive): not ours to delete
    other = tmp_path / f".other.{_dead_pid()}-abc123.tmp"  # another output's: left to its own runs
    for d in (dead, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1000)
    with atomic_path(tmp_path / "out", is_dir=is_dir) as tmp:
        (tmp / "x").write_text("1") if is_dir else tmp.write_text("1")
    assert not dead.exists()
    assert live.is_dir() and other.is_dir()
    assert (tmp_path / "out").exists()


# --- every command checks its output before it loads anything ------------------------------


def test_unwritable_output_fails_first_in_one_line(tiny_dir, tmp_path, blocker, cache):
    fake_ckpt = tmp_path / "ckpt"  # export commands check the output before loading the checkpoint
    fake_ckpt.mkdir()
    (fake_ckpt / "lowbit_config.json").write_text("{}")
    bad = blocker / "out"
    commands = [
        ["quantize", tiny_dir, "-o", bad, *SMALL],
        ["eval", tiny_dir, "--data", EXCERPT, "--windows", "2", "--seq-len", "64", "-q", "--json", bad],
        ["activations", tiny_dir, "-o", bad, "--windows", "1", "--seq-len", "32", "--data", EXCERPT, "-q"],
        ["export", "gguf", tiny_dir, "--type", "Q8_0", "-o", bad],
        ["export", "gptq", fake_ckpt, "-o", bad],
        ["export", "awq", fake_ckpt, "-o", bad],
        ["export", "compressed-tensors", fake_ckpt, "-o", bad],
    ]
    for args in commands:
        r = run(*args)
        one_line_error(r, "cannot write", str(bad))
        assert not r.stdout.strip(), (args, r.stdout)  # stopped before the header, before loading


# --- window lengths against the model's positions ------------------------------------------


def test_lengths_beyond_max_positions(tiny_dir, tmp_path, cache):
    # the tiny Llama has max_position_embeddings 256
    r = run("eval", tiny_dir, "--windows", "1", "--seq-len", "100000", "--data", EXCERPT, "-q")
    one_line_error(r, "--seq-len 100000", "256 positions")
    args = ["quantize", tiny_dir, "-o", tmp_path / "q", "--data", EXCERPT, "--windows", "1", "--seq-len", "64", "-q"]
    one_line_error(run(*args, "--n-calib", "1", "--calib-len", "300"), "--calib-len 300", "256 positions")
    one_line_error(run(*args, "--n-calib", "1", "--calib-len", "32", "--seq-len", "257"), "--seq-len 257", "256 positions")
    assert not (tmp_path / "q").exists()


# --- a quantization stopped mid-run ---------------------------------------------------------

CLI = [sys.executable, "-c", "from lowbit.cli.main import app; app()"]


def _start(tiny_dir, out: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "LOWBIT_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen(
        [*CLI, "quantize", str(tiny_dir), "-o", str(out), *map(str, SMALL)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_save(proc: subprocess.Popen, out: Path, timeout: float = 60) -> None:
    """Until the checkpoint's temporary folder beside ``out`` exists: the save phase."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir()):
            return
        if proc.poll() is not None:
            pytest.fail(f"finished before its save phase was seen: {proc.communicate()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no save phase seen")


def test_interrupted_and_killed_quantization_leave_nothing_and_rerun_cleans(tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    outdir = tmp_path / "runs"
    outdir.mkdir()
    out = outdir / "q"
    leftovers = lambda: [p.name for p in outdir.iterdir() if p.name.endswith(".tmp")]  # noqa: E731

    # the tiny model's save phase lasts milliseconds: on a loaded machine the signal can
    # arrive after the rename, so a run that completed first is removed and tried again
    for _ in range(5):
        proc = _start(tiny_dir, out, cache)
        _wait_for_save(proc, out)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        if proc.returncode != 0:
            break
        shutil.rmtree(out)
    assert proc.returncode == 130, (stdout, stderr)
    assert "interrupted; nothing was written" in stderr
    assert not out.exists() and not leftovers()

    for _ in range(5):
        proc = _start(tiny_dir, out, cache)
        _wait_for_save(proc, out)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        if proc.returncode != 0:
            break
        shutil.rmtree(out)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert leftovers()  # what a SIGKILL leaves; the rerun below must remove it

    old = os.umask(0o022)
    try:
        proc = _start(tiny_dir, out, cache)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        os.umask(old)
    assert proc.returncode == 0, (stdout, stderr)
    assert (out / "model.safetensors").is_file() and (out / "eval.json").is_file()
    assert not leftovers()
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
