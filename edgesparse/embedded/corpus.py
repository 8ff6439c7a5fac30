"""The training text of the embedded ``tiny`` model: English that reads like English.

The first ``tiny`` learnt the tokenised WikiText copy and reproduced its ``<unk>`` and its
`` 's`` / `` , `` spacing, so its demo looked broken.  This corpus keeps only text a reader
would accept (``edgesparse.embedded.train`` builds it; nothing here runs at load time):

* WikiText-2 *validation*, tokenised copy, detokenised; every sentence holding ``<unk>`` and
  every heading dropped.  (The test set, raw or tokenised, is evaluation-only and never read.)
* tiny-shakespeare, as it is.
* the first part of the Python 3.11 docs (reStructuredText; technical English).
* where a Debian text dir is given (``apt-get download fortunes fortunes-min debian-handbook``
  and ``dpkg -x`` each into it): the English Debian Administrator's Handbook, tags stripped,
  and the English fortune files (no ASCII art).
Penn Treebank is left out: lower case, ``<unk>`` and ``N`` for numbers throughout."""
from __future__ import annotations

import html.parser
import re
from pathlib import Path

_WIKI_JOINS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" 's", "'s"), (" n't", "n't"), (" 're", "'re"),
               (" 've", "'ve"), (" 'll", "'ll"), (" 'd", "'d"), (" 'm", "'m"), ("( ", "("), (" )", ")"))
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


def detok_wikitext(text: str, drop_unk: bool = True) -> str:
    """WikiText's tokenised spacing undone, headings dropped, and (``drop_unk``) every
    sentence that holds ``<unk>`` left out; paragraphs stay one per line."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("= "):
            continue
        for a, b in _WIKI_JOINS:
            line = line.replace(a, b)
        line = re.sub(r" ([,.;:!?%])", r"\1", line)
        line = re.sub(r'" ([^"]*?) "', r'"\1"', line)
        line = re.sub(r"\$ (\d)", r"$\1", line)
        keep = [s for s in _SENTENCE_END.split(line) if not (drop_unk and "<unk>" in s)]
        if keep:
            out.append(" ".join(keep))
    return "\n".join(out) + "\n"


class _Paragraphs(html.parser.HTMLParser):
    """The text of a DocBook page's paragraphs (``<div class="para">``), one per line; code
    listings (``<pre>``) are left out."""

    def __init__(self):
        super().__init__()
        self.stack, self.buf, self.paras = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag in ("div", "pre"):
            self.stack.append("para" if tag == "div" and ("class", "para") in attrs else tag)

    def handle_endtag(self, tag):
        if tag in ("div", "pre") and self.stack and self.stack.pop() == "para":
            text = " ".join("".join(self.buf).split())
            if len(text) > 40:
                self.paras.append(text)
            self.buf = []

    def handle_data(self, data):
        if "para" in self.stack and "pre" not in self.stack:
            self.buf.append(data)


def debian_handbook(root: Path) -> str:
    pages = sorted((root / "usr/share/doc/debian-handbook/html/en-US").glob("*.html"))
    paras = []
    for page in pages:
        p = _Paragraphs()
        p.feed(page.read_text(encoding="utf-8", errors="replace"))
        paras += p.paras
    return "\n".join(paras) + "\n"


_FORTUNE_SKIP = {"art", "ascii-art", "linuxcookie", "debian", "computers"}   # pictures, shell jokes


def fortunes(root: Path) -> str:
    d = root / "usr/share/games/fortunes"
    entries = []
    for f in sorted(d.iterdir()):
        if f.suffix or f.name in _FORTUNE_SKIP or not f.is_file():
            continue
        for e in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            e = " ".join(e.split())
            if 20 < len(e) < 600:
                entries.append(e)
    return "\n".join(entries) + "\n"


def load_corpus(data_dir: Path, python_docs_chars: int, debian_dir: Path | None = None) -> dict[str, str]:
    """``{name: text}`` of the training corpus (see the module docstring)."""
    docs = {
        "wikitext-2-valid (detokenised, no <unk>)": detok_wikitext(
            (data_dir / "wikitext-2-tok-valid.txt").read_text(encoding="utf-8")),
        "tinyshakespeare": (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8"),
        "python-3.11-docs": (data_dir / "python-3.11-docs.rst.txt").read_text(encoding="utf-8")[:python_docs_chars],
    }
    if debian_dir is not None:
        docs["debian-handbook (en-US)"] = debian_handbook(debian_dir)
        docs["fortunes"] = fortunes(debian_dir)
    return docs
