"""Every relative link in the repository's markdown outside the site resolves: README.md, DESIGN.md and
bench/RESULTS.md point at files that exist and, for a ``#anchor`` into a markdown file, at one of its
headings. The site's own pages (docs/) are checked by ``mkdocs build --strict`` (``make docs``)."""

from __future__ import annotations

import re
from pathlib import Path

from markdown.extensions.toc import slugify

REPO = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "DESIGN.md", "bench/RESULTS.md")

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def headings(page: Path) -> set[str]:
    """The anchors of ``page``'s headings, as MkDocs makes them (``markdown``'s toc slugify)."""
    text = _FENCE.sub("", page.read_text())
    return {slugify(line.lstrip("#").strip(), "-") for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def broken_links(page: Path) -> list[str]:
    """The relative link targets in ``page`` (code blocks and spans left out) whose file is missing, or
    whose ``#anchor`` names no heading of the markdown file it points into."""
    text = _CODE.sub("", _FENCE.sub("", page.read_text()))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or (anchor and resolved.suffix == ".md" and anchor not in headings(resolved)):
            broken.append(target)
    return broken


def test_every_relative_link_resolves():
    broken = {page: links for page in PAGES if (links := broken_links(REPO / page))}
    assert not broken, f"links to missing files or headings: {broken}"


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section: here\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#a-section-here) [gone](missing.md) [no](other.md#nowhere)\n"
        "![pic](pic.png) `[code](missing.md)`\n\n```\n[fenced](missing.md)\n```\n[web](https://example.org)\n"
    )
    assert broken_links(page) == ["missing.md", "other.md#nowhere", "pic.png"]
