"""Names from an untrusted file's header in markdown artifacts: rendered as text, never
as an image, a link, raw HTML, a heading or a table cell (checked with a CommonMark
renderer that lets raw HTML through, the worst case)."""

from __future__ import annotations

import html

import pytest
from markdown_it import MarkdownIt

from driftloop.markdown import md_code, md_text

HOSTILE = [
    "![x](https://tracker.example/p.png)",
    "<img src=x onerror=alert(1)>",
    "[help](javascript:alert(1))",
    "a\n# Owned\nb",
    "x` ![y](https://tracker.example/q.png) `z",
    "``` <script>alert(1)</script>",
    "<https://tracker.example/autolink>",
    "a | b | c",
]


def render(markdown: str) -> str:
    return MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)


def markup(rendered: str) -> list[str]:
    return [tag for tag in ("<img", "<a ", "<script", "<h1", "<h2", "<td", "<th", "<em", "<strong")
            if tag in rendered]


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("escape", [md_text, md_code])
def test_a_hostile_name_renders_as_its_own_text(name: str, escape) -> None:
    rendered = render(f"Ignored columns: {escape(name)}\n")
    assert markup(rendered) == []
    shown = html.unescape(rendered.replace("<p>", "").replace("</p>", "").replace("<code>", "").replace("</code>", ""))
    assert " ".join(name.split()) in " ".join(shown.split())  # all of it, as text (line breaks folded)


@pytest.mark.parametrize("name", HOSTILE)
def test_md_text_in_a_table_cell_stays_one_cell(name: str) -> None:
    rendered = render(f"| column | rows |\n|---|---:|\n| {md_text(name)} | 3 |\n")
    assert rendered.count("<td") == 2 and "<img" not in rendered and "<a " not in rendered


def test_the_ingestion_artifact_shows_hostile_column_names_and_source_as_text() -> None:
    from driftloop.flows.ingest import IngestResult, _summary_markdown

    summary = IngestResult(dataset_id="ds_1", name="loans", rows_in=3, rows_valid=3, rows_quarantined=0,
                           quarantine_uri=None, snapshot_uri="/a/rows.parquet", created=True, ignored_columns=HOSTILE)
    rendered = render(_summary_markdown(summary, "data/x` ![s](https://tracker.example/s.png) `.csv"))
    assert rendered.count("<h1") == 1 and rendered.count("<table") == 1 and rendered.count("<td") == 3
    assert [t for t in ("<img", "<a ", "<script", "<h2") if t in rendered] == []
