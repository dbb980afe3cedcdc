"""Text sources and the token windows of the protocol."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.calibration.data import Protocol, bos_id_for, calib_windows, eval_windows, split_windows, tokenize
from lowbit.calibration.text import clean_wiki_xml, read_text
from lowbit.errors import LowbitError

XML = """<mediawiki>
<page><title>Alpha &amp; Omega</title><ns>0</ns><revision><text xml:space="preserve">'''Alpha''' is a [[Greek alphabet|letter]].&lt;ref&gt;A source.&lt;/ref&gt; It comes first.{{cite|x}}

== History ==
Used since [[antiquity]].&lt;ref name="b" /&gt;</text></revision></page>
<page><title>Alfa</title><ns>0</ns><revision><text>#REDIRECT [[Alpha]]</text></revision></page>
<page><title>Talk:Alpha</title><ns>1</ns><revision><text>chatter</text></revision></page>
</mediawiki>"""


def test_wiki_cleaning():
    arts = clean_wiki_xml(XML)
    assert [t for t, _ in arts] == ["Alpha & Omega"]  # redirects and other namespaces skipped
    body = arts[0][1]
    assert body.startswith("Alpha is a letter. It comes first.")
    assert "source" not in body and "cite" not in body and "[[" not in body
    assert "History" in body and "Used since antiquity." in body


def test_read_text_sources_and_errors(tmp_path, excerpt):
    f = tmp_path / "a.txt"
    f.write_text("hello world")
    assert read_text(str(f)) == "hello world"
    d = tmp_path / "folder"
    d.mkdir()
    (d / "2.txt").write_text("second")
    (d / "1.md").write_text("first")
    (d / "skip.bin").write_bytes(b"\x00")
    assert read_text(str(d)) == "first\n\nsecond"
    with pytest.raises(LowbitError, match="does not exist"):
        read_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(LowbitError, match="is empty"):
        read_text(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(LowbitError, match="not UTF-8"):
        read_text(str(tmp_path / "bad.txt"))
    (tmp_path / "none").mkdir()
    with pytest.raises(LowbitError, match="no .txt or .md"):
        read_text(str(tmp_path / "none"))


def test_windows_are_disjoint_and_follow_the_protocol():
    ids = torch.arange(1000)
    p = Protocol(seq_len=50, n_windows=4, n_calib=3, calib_len=40)
    ev, cal = split_windows(ids, p, bos_id=None)
    assert ev.shape == (4, 50) and cal.shape == (3, 40)
    assert torch.equal(ev.flatten(), torch.arange(200))  # from the start, consecutive
    assert torch.equal(cal.flatten(), torch.arange(880, 1000))  # from the end
    ev_b, cal_b = split_windows(ids, p, bos_id=7)
    assert torch.all(ev_b[:, 0] == 7) and torch.equal(ev_b[0, 1:], torch.arange(49))
    assert torch.equal(ev_b[1, 1:], torch.arange(49, 98))  # BOS + 49 text tokens per window
    with pytest.raises(LowbitError, match="too short"):
        split_windows(torch.arange(300), p, None)
    with pytest.raises(LowbitError, match="too short"):
        eval_windows(torch.arange(10), p, None)
    with pytest.raises(LowbitError, match="too short"):
        calib_windows(torch.arange(10), p, None)
    with pytest.raises(LowbitError, match="seq-len"):
        Protocol(seq_len=1)


def test_bos_policy(tiny):
    _, tok = tiny
    assert bos_id_for(tok, Protocol()) is None  # this tokenizer adds no BOS
    assert bos_id_for(tok, Protocol(bos="always")) == 1
    assert bos_id_for(tok, Protocol(bos="never")) is None


def test_tokenize_is_cached(tiny, cache, excerpt):
    _, tok = tiny
    a = tokenize(tok, excerpt)
    assert len(list((cache / "tokens").iterdir())) == 1
    b = tokenize(tok, excerpt)
    assert torch.equal(a, b) and a.dtype == torch.int64


def test_prepare_windows_from_user_files(tiny, cache, tmp_path, excerpt):
    _, tok = tiny
    data = tmp_path / "data.txt"
    data.write_text(excerpt)
    p = Protocol(seq_len=64, n_windows=3, n_calib=2, calib_len=32)
    ev, cal = lowbit.prepare_windows(tok, p, data=str(data))
    assert ev.shape == (3, 64) and cal.shape == (2, 32)
    other = tmp_path / "calib.txt"
    other.write_text(excerpt[::-1])
    ev2, cal2 = lowbit.prepare_windows(tok, p, data=str(data), calib=str(other))
    assert torch.equal(ev, ev2) and not torch.equal(cal, cal2)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(LowbitError, match="short.txt is too short"):
        lowbit.prepare_windows(tok, p, data=str(short))
