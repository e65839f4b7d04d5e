"""MkDocs hook: pages of the site that live elsewhere in the repository.

``DESIGN.md`` (repository root) becomes ``design.md`` and ``bench/RESULTS.md`` becomes
``results.md``, with their links rewritten from repository paths to the site's pages
(``docs/scaling.md`` -> ``scaling.md``, ``bench/RESULTS.md`` -> ``results.md``); the pictures
``bench/RESULTS.md`` shows come along under ``results/``. A link this rewriting does not map
stays as written, so ``mkdocs build --strict`` reports it as broken.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[1]

# site page -> (repository file, {link target in that file: link target in the site})
PAGES = {
    "design.md": ("DESIGN.md", {"docs/": "", "bench/RESULTS.md": "results.md"}),
    "results.md": ("bench/RESULTS.md", {}),
}
PICTURES = {"results/scale.png": "bench/results/scale.png", "results/feedback.png": "bench/results/feedback.png"}

_LINK = re.compile(r"(\]\()([^)\s#]*)")


def rewrite_links(text: str, prefixes: dict[str, str]) -> str:
    """``text`` with each markdown link target that starts with a key of ``prefixes`` rewritten:
    the key is replaced by its value (anchors and the rest of the target are kept)."""

    def one(match: re.Match) -> str:
        target = match.group(2)
        for old, new in prefixes.items():
            if target.startswith(old):
                return match.group(1) + new + target[len(old) :]
        return match.group(0)

    return _LINK.sub(one, text)


def on_files(files: Files, config) -> Files:
    for page, (source, prefixes) in PAGES.items():
        files.append(File.generated(config, page, content=rewrite_links((REPO / source).read_text(), prefixes)))
    for site_path, source in PICTURES.items():
        files.append(File.generated(config, site_path, abs_src_path=str(REPO / source)))
    return files
