"""The monitoring artifact's charts: small PNGs, one per kind, inline as data URIs, placed
after the verdict and before the per-chunk table."""

from __future__ import annotations

import base64
import io
import re
import struct
from typing import Any

import pytest

from driftloop.tasks.monitor_charts import (
    artifact_markdown,
    charts_markdown,
    drift_map_chart,
    multivariate_chart,
    performance_chart,
    render_charts,
    with_charts,
)
from driftloop.tasks.monitor_policy import PolicyDecision
from driftloop.tasks.monitor_report import Chunk, MonitorReport
from driftloop.tasks.monitor_summary import render_summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FEATURES = ["car_value", "salary_range", "debt_to_income_ratio", "loan_length", "driver_tenure"]
CHUNKS = 24
DRIFT_FROM = 16
DATA_URI = re.compile(r"!\[([^\]]+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def _row(chunk: Chunk, kind: str, name: str, method: str, value: float | None, lower: float | None,
         upper: float | None, alert: bool) -> dict[str, Any]:
    return {"chunk_index": chunk.index, "chunk_key": chunk.key, "chunk_start": chunk.start, "chunk_end": chunk.end,
            "kind": kind, "name": name, "method": method, "value": value, "lower_threshold": lower,
            "upper_threshold": upper, "alert": alert}


def make_report(*, labels: bool = True) -> MonitorReport:
    """24 chunks; from chunk 16 on two features drift, the reconstruction error rises and
    roc_auc falls. Realized roc_auc where labels arrived (not in the last four chunks)."""
    chunks = [Chunk(i, f"[{i * 500}:{i * 500 + 499}]", f"2019-{1 + i // 3:02d}-{1 + 9 * (i % 3):02d} 00:00:00",
                    f"2019-{1 + i // 3:02d}-{9 + 9 * (i % 3):02d} 23:59:59") for i in range(CHUNKS)]
    rows = []
    for chunk in chunks:
        drift = chunk.index >= DRIFT_FROM
        for j, feature in enumerate(FEATURES):
            value = 0.02 + 0.004 * ((chunk.index + j) % 5) + (0.09 if drift and j < 2 else 0.0)
            rows.append(_row(chunk, "univariate", feature, "jensen_shannon", value, None, 0.07, value > 0.07))
        if chunk.index % 7 == 0:  # a categorical method without thresholds, alert only
            rows.append(_row(chunk, "univariate", FEATURES[-1], "chi2", 5.0, None, None, drift))
        error = 1.1 + 0.01 * (chunk.index % 4) + (0.2 if drift else 0.0)
        rows.append(_row(chunk, "multivariate", "reconstruction_error", "multivariate", error, 1.05, 1.17, error > 1.17))
        auc = 0.97 - 0.002 * (chunk.index % 3) - (0.05 if drift else 0.0)
        rows.append(_row(chunk, "estimated", "roc_auc", "estimated", auc, 0.955, None, auc < 0.955))
        if labels and chunk.index < CHUNKS - 4:
            rows.append(_row(chunk, "realized", "roc_auc", "realized", auc + 0.003, 0.955, None, auc + 0.003 < 0.955))
        elif labels:
            rows.append(_row(chunk, "realized", "roc_auc", "realized", None, 0.955, None, False))  # no labels yet
    return MonitorReport(chunks, rows, "roc_auc", labels, gate_metric="roc_auc")


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, checked against PIL where it is installed."""
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL comes with matplotlib
        return width, height
    with Image.open(io.BytesIO(png)) as image:
        image.load()  # decodes the whole image: a truncated PNG fails here
        assert image.size == (width, height)
    return width, height


@pytest.fixture(scope="module")
def report() -> MonitorReport:
    return make_report()


@pytest.mark.parametrize("draw", [performance_chart, drift_map_chart, multivariate_chart])
def test_each_chart_is_a_small_png(report: MonitorReport, draw) -> None:
    png = draw(report)
    assert png is not None
    width, height = png_size(png)
    assert 400 <= width <= 900 and 120 <= height <= 600
    assert len(png) < 100_000


def test_drift_map_grows_with_the_features(report: MonitorReport) -> None:
    many = make_report()
    extra = [f"feature_{i}" for i in range(15)]
    many.results += [{**r, "name": name} for r in many.rows("univariate") if r["name"] == FEATURES[0] for name in extra]
    _, few_height = png_size(drift_map_chart(report))
    _, many_height = png_size(drift_map_chart(many))
    assert many_height > few_height


def test_nothing_to_draw_gives_no_chart() -> None:
    empty = MonitorReport([], [], None, False)
    assert (performance_chart(empty), drift_map_chart(empty), multivariate_chart(empty)) == (None, None, None)
    assert render_charts(empty) == [] and charts_markdown(empty) == ""
    drift_only = make_report(labels=False)
    drift_only.results = [r for r in drift_only.results if r["kind"] != "estimated"]
    drift_only.estimated_metric = None
    assert performance_chart(drift_only) is None
    assert [c.name for c in render_charts(drift_only)] == ["drift-map", "multivariate"]


def test_estimates_without_labels_still_draw(report: MonitorReport) -> None:
    unlabelled = make_report(labels=False)
    png = performance_chart(unlabelled)
    assert png is not None and png != performance_chart(report)


def test_markdown_leads_with_the_verdict_then_three_charts_then_the_table(report: MonitorReport) -> None:
    decision = PolicyDecision(fired=True, event="driftloop.model.drift-detected",
                              reasons=["drift in 8 of the last 8 chunks"], drifting_features=FEATURES[:2],
                              window=list(range(DRIFT_FROM, CHUNKS)))
    summary = render_summary("car_loan@v1", report, decision, None)
    charts = render_charts(report)
    markdown = artifact_markdown(summary, charts, ["/store/monitoring/car_loan/r/univariate_drift.html"])

    images = DATA_URI.findall(markdown)
    assert [alt for alt, _ in images] == [c.alt for c in charts] and len(images) == 3
    for _, encoded in images:
        png = base64.b64decode(encoded, validate=True)
        assert png.startswith(PNG_SIGNATURE) and len(png) < 100_000
        png_size(png)
    verdict = markdown.index("**Policy: FIRED")
    first_image = markdown.index("![")
    table = markdown.index("| chunk |")
    assert verdict < first_image < table
    assert markdown.rstrip().endswith("- `/store/monitoring/car_loan/r/univariate_drift.html`")
    assert "file://" not in markdown
    assert charts_markdown(report).count("data:image/png;base64,") == 3


def test_with_charts_without_a_table_appends() -> None:
    assert with_charts("# title\n\nno table", "![x](data:image/png;base64,AA==)").endswith("![x](data:image/png;base64,AA==)\n")
    assert with_charts("# title\n\n| a |\n|---|", "") == "# title\n\n| a |\n|---|"


def test_a_partial_chunk_is_shaded(report: MonitorReport) -> None:
    partial = make_report()
    partial.partial_chunks = {CHUNKS - 1: 120}  # reported without alerts by tasks.monitor
    for draw in (performance_chart, drift_map_chart, multivariate_chart):
        png = draw(partial)
        assert png is not None and png != draw(report) and len(png) < 100_000
        png_size(png)
