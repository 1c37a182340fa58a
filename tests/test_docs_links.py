"""Every relative link and picture in README.md and docs/ (its subfolders too) points at a file (or a heading)
that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from comfy_bootstrap import PACK_ROOT

PAGES = [PACK_ROOT / "README.md", *sorted((PACK_ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PACK_ROOT)))
def test_links_resolve(page: Path):
    checked = 0
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{page.name}: no heading #{anchor} in {resolved.name}"
        checked += 1
    assert checked or page != PACK_ROOT / "README.md", "the README links nothing"
