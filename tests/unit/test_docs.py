"""The docs hold together: every relative link in README.md, docs/*.md and the folder
READMEs names a file that exists, and every ``#anchor`` names a heading of its target
(GitHub's slugs). The README stays a front door (at most 200 lines)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("flows", "tasks", "blocks", "deployments", "infra", "tests", "bench")

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`+[^`]*`+")
# [text](target) and ![alt](target); the target may carry a "title"
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, data:


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += [ROOT / folder / "README.md" for folder in FOLDERS if (ROOT / folder / "README.md").exists()]
    return files


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, punctuation other
    than ``-`` and ``_`` dropped, each space a ``-``."""
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # images: their alt text
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and `_`
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = _INLINE_CODE.sub("", line)
        found += [(number, target) for target in _LINK.findall(line)]
        ref = _REF_DEF.match(line)
        if ref:
            found.append((number, ref.group(1)))
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for number, target in links(path):
        if _EXTERNAL.match(target) or target.startswith("//"):
            continue
        file_part, _, anchor = target.partition("#")
        where = f"{path.relative_to(root)}:{number}: {target}"
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor:
            if resolved.suffix != ".md" or resolved.is_dir():
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif anchor not in anchors(resolved):
                problems.append(f"{where}: no heading with anchor #{anchor} in {resolved.name}")
    return problems


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_the_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail to docs/"


def test_the_docs_pages_by_task_exist_and_are_indexed() -> None:
    pages = ["quickstart", "concepts", "data-and-specs", "training-and-registry", "scoring-and-edge",
             "monitoring", "retraining-and-rollout", "running-on-prefect", "scaling-out", "operations",
             "benchmarks"]
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    for page in pages:
        assert (ROOT / "docs" / f"{page}.md").exists(), page
        assert f"({page}.md)" in index, f"docs/README.md does not link {page}.md"


def test_slugs_follow_github() -> None:
    assert slug("Speed and memory (`bench/scoring.py`)") == "speed-and-memory-benchscoringpy"
    assert slug("Retraining: feedback data and training windows") == (
        "retraining-feedback-data-and-training-windows")
    assert slug("Scoring, on servers and on the edge") == "scoring-on-servers-and-on-the-edge"
    assert slug("A year in the life of a model (`bench/loop.py`)") == (
        "a-year-in-the-life-of-a-model-benchlooppy")
    assert slug("snake_case and dash-es") == "snake_case-and-dash-es"


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Same\n\n## Same\n", encoding="utf-8")
    page.write_text(
        "# Page\n\n"
        "[ok](other.md) [ok](other.md#same-1) [ok](#page) [ok](https://example.com/x.md#y)\n"
        "[missing file](nope.md) [missing anchor](other.md#same-2) [in-page](#nowhere)\n"
        "`[in code](ignored.md)`\n\n```\n[in a fence](ignored.md)\n# not a heading\n```\n",
        encoding="utf-8")
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 3, problems
    assert any("nope.md" in p for p in problems)
    assert any("#same-2" in p for p in problems)
    assert any("#nowhere" in p for p in problems)
