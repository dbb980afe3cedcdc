"""Text sources: the embedded Wikipedia articles, or a user's own text files.

The embedded text is the shortened English Wikipedia dump that the ``gensim`` wheel ships
as test data (no dataset hub needed). It is cleaned once and cached as plain text:
main-namespace, non-redirect pages; ``<ref>`` citations removed; wiki markup stripped with
mwparserfromhell; each article as its title, a blank line, then its body; articles joined
by blank lines. This is the same kind of text as WikiText-2.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import logging
import re
from pathlib import Path

from ..cache import atomic_path, cache_dir
from ..errors import LowbitError

log = logging.getLogger(__name__)

EMBEDDED_TEXT = "wikipedia"
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_CLEANING_VERSION = 1
_TEXT_SUFFIXES = (".txt", ".md", ".text")


def _gensim_dump() -> Path:
    spec = importlib.util.find_spec("gensim")  # locate the package without importing it
    if spec is None or spec.origin is None:
        raise LowbitError(
            "the embedded Wikipedia text needs the PyPI package gensim "
            "(pip install --no-deps gensim==4.4.0), or pass your own text with --data/--calib"
        )
    path = Path(spec.origin).parent / "test" / "test_data" / _WIKI_FILE
    if not path.is_file():
        raise LowbitError(f"gensim is installed but its test data {path} is missing")
    return path


def clean_wiki_xml(xml: str) -> list[tuple[str, str]]:
    """(title, plain text) of every main-namespace, non-redirect page of a MediaWiki dump."""
    import mwparserfromhell

    articles = []
    for page in re.findall(r"<page>(.*?)</page>", xml, re.S):
        ns = re.search(r"<ns>(.*?)</ns>", page)
        body = re.search(r"<text[^>]*>(.*?)</text>", page, re.S)
        title = re.search(r"<title>(.*?)</title>", page, re.S)
        if not (ns and body and title) or ns.group(1) != "0":
            continue
        text = html.unescape(body.group(1))
        if text.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = re.sub(r"<ref[^>/]*/>", "", text)
        text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
        plain = mwparserfromhell.parse(text).strip_code()
        plain = re.sub(r"\n{3,}", "\n\n", plain).strip()
        if plain:
            articles.append((html.unescape(title.group(1)), plain))
    return articles


def embedded_text() -> str:
    """The cleaned Wikipedia text, extracted from the gensim wheel once and then cached."""
    cached = cache_dir("text") / f"enwiki-gensim-v{_CLEANING_VERSION}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    src = _gensim_dump()
    log.info("extracting Wikipedia articles from %s (once)", src.name)
    with bz2.open(src, "rt", encoding="utf-8") as f:
        articles = clean_wiki_xml(f.read())
    text = "\n\n".join(f"{title}\n\n{body}" for title, body in articles)
    with atomic_path(cached) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return text


def read_text(source: str | None) -> str:
    """The text of ``source``: None or 'wikipedia' for the embedded text, a text file, or a
    folder whose .txt/.md files are read in sorted order and joined by blank lines."""
    if source is None or source == EMBEDDED_TEXT:
        return embedded_text()
    path = Path(source)
    if not path.exists():
        raise LowbitError(f"text source {source} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
        if not files:
            raise LowbitError(f"folder {source} holds no .txt or .md files")
        parts = [_read_file(p) for p in files]
        text = "\n\n".join(p for p in parts if p.strip())
    else:
        text = _read_file(path)
    if not text.strip():
        raise LowbitError(f"text source {source} is empty")
    return text


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"text file {path} is not UTF-8 ({e.reason} at byte {e.start})") from None
