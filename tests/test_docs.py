"""The guide holds together: every relative link (markdown links and images) in README.md, docs/*.md and the
experiments' READMEs points at a file that exists, the README stays a short guide, and it links every docs page."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.DOTALL)
# [text](target "title") and ![alt](target); the target may be wrapped in <...>.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=[\"']([^\"']+)[\"']", re.IGNORECASE)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)


def documents() -> list[Path]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    docs += sorted((ROOT / "experiments").rglob("README.md"))
    return docs


def links(text: str) -> list[str]:
    """Every link target of a markdown text, outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    found = [m.group(1) for pattern in (INLINE_LINK, REFERENCE, HTML_SRC) for m in pattern.finditer(text)]
    return [target[1:-1] if target.startswith("<") else target for target in found]


def relative_targets(document: Path) -> list[str]:
    return [t for t in links(document.read_text(encoding="utf-8")) if not EXTERNAL.match(t) and not t.startswith("#")]


@pytest.mark.parametrize("document", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document: Path) -> None:
    missing = []
    for target in relative_targets(document):
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        resolved = (ROOT / path.lstrip("/")) if path.startswith("/") else (document.parent / path)
        if not resolved.exists():
            missing.append(target)
    assert not missing, f"{document.relative_to(ROOT)}: links to missing files: {missing}"


def test_readme_is_a_short_guide() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines; keep it under {README_MAX_LINES}"


def test_readme_links_every_docs_page() -> None:
    linked = {(ROOT / t.split("#", 1)[0]).resolve() for t in relative_targets(ROOT / "README.md")}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_the_checker_sees_links() -> None:
    """The patterns find what they must and skip code: a broken link cannot hide from the test above."""
    text = (
        'See [a](docs/a.md#part), ![img](pic.png "title"), [b](<with space.md>), [c](https://x.org/y.md),\n'
        '[ref]: docs/ref.md\n<img src="docs/html.png">\n`[not](code.md)`\n```\n[nor](fenced.md)\n```\n'
    )
    assert sorted(links(text)) == sorted(
        ["docs/a.md#part", "pic.png", "with space.md", "https://x.org/y.md", "docs/ref.md", "docs/html.png"]
    )
