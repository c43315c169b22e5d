"""Every relative link and image in the project's Markdown resolves: the file exists, and an anchor names
a heading of the file it points into (GitHub's heading slugs), so moving a section cannot leave a reader
at a dead link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", ".git", "runs", "data", "node_modules", ".device", ".pytest_cache"}
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_REF = re.compile(r"<(?:img|a)\s[^>]*?(?:src|href)=\"([^\"]+)\"", re.IGNORECASE)
FENCE = re.compile(r"^\s*(```|~~~)")


def markdown_files() -> list[Path]:
    found = []
    for path in ROOT.rglob("*.md"):
        parts = path.relative_to(ROOT).parts
        if any(p in SKIP or p.startswith("worktree-") for p in parts[:-1]):
            continue
        found.append(path)
    return sorted(found)


def prose(text: str, keep_code: bool = False) -> list[str]:
    """The lines outside fenced code blocks, with inline code removed unless kept."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line if keep_code else re.sub(r"`[^`]*`", "", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose(path.read_text(encoding="utf-8"), keep_code=True) if path.suffix == ".md" else []:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    found = []
    for line in prose(path.read_text(encoding="utf-8")):
        found += LINK.findall(line) + HTML_REF.findall(line)
    return [t for t in found if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]  # http:, mailto: ...


def broken(path: Path) -> list[str]:
    problems = []
    for target in links(path):
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{target}: no such file")
        elif anchor and destination.is_file() and anchor not in anchors(destination):
            problems.append(f"{target}: no heading with anchor #{anchor} in {destination.relative_to(ROOT)}")
    return problems


def test_the_project_has_its_readmes():
    names = {str(p.relative_to(ROOT)) for p in markdown_files()}
    assert {"README.md", "exported/README.md"} <= names


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(path):
    assert broken(path) == []


def test_the_checker_sees_a_dead_file_and_a_dead_anchor(tmp_path):
    (tmp_path / "there.md").write_text("# A `code` heading, with punctuation!\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a-code-heading-with-punctuation) [ok](there.md#twice-1) ![img](there.md)\n"
                    "[gone](missing.md) [bad](there.md#nope) [web](https://example.com/x) `[code](nope.md)`\n"
                    "```\n[fenced](nope.md)\n```\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert broken(page) == ["missing.md: no such file", "there.md#nope: no heading with anchor #nope in there.md"]
    finally:
        ROOT = saved
