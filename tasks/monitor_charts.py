"""Small static charts of a monitoring report, for the Prefect UI.

The UI renders a markdown artifact's images when they are PNG data URIs
(``![alt](data:image/png;base64,...)``); a ``file://`` link does not open from its pages.
Each chart is a plain function of a :class:`tasks.monitor_report.MonitorReport` that returns PNG
bytes (a few tens of KB), or None when the report has nothing for it to draw:

- :func:`performance_chart`: estimated and realized metric per chunk, thresholds, alerts;
- :func:`drift_map_chart`: features x chunks, each cell the feature's drift statistic
  relative to its alert threshold, alerted cells marked;
- :func:`multivariate_chart`: the data reconstruction error per chunk, threshold, alerts.

:func:`render_charts` draws them all and :func:`charts_markdown` puts them in one
markdown block; :func:`with_charts` places such a block in a summary after the verdict and
before the per-chunk table; :func:`artifact_markdown` is the monitoring artifact whole.
matplotlib is imported inside the functions (Agg canvas, no pyplot state), not at import.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from driftloop.tasks.monitor_report import MonitorReport

WIDTH_IN = 7.5  # inches at DPI: 600 px wide, readable in the artifact page's column
DPI = 80
ALERT = "#d62728"
ESTIMATED = "#1f77b4"
REALIZED = "#2ca02c"
THRESHOLD = "#7f7f7f"
MAX_TICKS = 12


def _figure(height_in: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, pil_kwargs={"optimize": True})
    return buffer.getvalue()


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) or math.isinf(number) else number


def _chunk_labels(report: MonitorReport) -> dict[int, str]:
    """chunk index -> a short label: the chunk's start date when it has one, else its key."""
    return {c.index: (c.start[:10] if c.start else c.key) for c in report.chunks}


def _chunk_axis(ax: Axes, report: MonitorReport, *, rotate: bool = True) -> None:
    labels = _chunk_labels(report)
    indices = sorted(labels)
    if not indices:
        return
    step = max(1, math.ceil(len(indices) / MAX_TICKS))
    ticks = indices[::step]
    ax.set_xticks(ticks)
    ax.set_xticklabels([labels[i] for i in ticks], rotation=30 if rotate else 0, ha="right" if rotate else "center",
                       fontsize=7)
    ax.set_xlim(indices[0] - 0.5, indices[-1] + 0.5)
    ax.set_xlabel("chunk (start)" if any(c.start for c in report.chunks) else "chunk", fontsize=8)


def _series(rows: list[dict[str, Any]]) -> tuple[list[int], list[float], list[bool]]:
    points = sorted((r["chunk_index"], _finite(r["value"]), bool(r["alert"])) for r in rows)
    kept = [(i, v, a) for i, v, a in points if v is not None]
    return [p[0] for p in kept], [p[1] for p in kept], [p[2] for p in kept]  # type: ignore[misc]


def _thresholds(ax: Axes, rows: list[dict[str, Any]]) -> None:
    """Lower and upper thresholds as dashed steps (NannyML's are one value per chunk)."""
    label: str | None = "threshold"
    for key in ("lower_threshold", "upper_threshold"):
        points = sorted((r["chunk_index"], _finite(r[key])) for r in rows)
        points = [(i, v) for i, v in points if v is not None]
        if not points:
            continue
        xs = [i for i, _ in points]
        ys = [v for _, v in points]
        ax.step(xs, ys, where="mid", color=THRESHOLD, linestyle="--", linewidth=1, label=label)
        label = None  # one legend entry for both


def _shade_partial(ax: Axes, report: MonitorReport) -> None:
    """Grey, hatched columns for chunks smaller than the chunk size: reported without
    alerts (tasks.monitor), so a high value there is not an alarm."""
    label: str | None = "partial chunk (no alerts)"
    for index in sorted(report.partial_chunks):
        ax.axvspan(index - 0.5, index + 0.5, facecolor="#d9d9d9", edgecolor="#969696", hatch="//", alpha=0.5,
                   linewidth=0, zorder=0.5, label=label)
        label = None


def _finish_line_chart(fig: Figure, ax: Axes, report: MonitorReport, title: str) -> bytes:
    """What every per-chunk line chart ends with: partial chunks shaded, title, grid,
    chunk axis, legend; then the PNG."""
    _shade_partial(ax, report)
    ax.set_title(title, fontsize=10, loc="left")
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(alpha=0.3, linewidth=0.5)
    _chunk_axis(ax, report)
    _legend(ax)
    return _png(fig)


def _legend(ax: Axes) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), framealpha=0.8)


def _mark_alerts(ax: Axes, xs: list[int], ys: list[float], alerts: list[bool], label: str) -> None:
    hits = [(x, y) for x, y, a in zip(xs, ys, alerts, strict=True) if a]
    if hits:
        ax.scatter([x for x, _ in hits], [y for _, y in hits], s=46, facecolors="none", edgecolors=ALERT,
                   linewidths=1.6, zorder=5, label=label)


def performance_chart(report: MonitorReport) -> bytes | None:
    """Estimated (CBPE/DLE) and realized metric per chunk, with the estimated metric's
    thresholds and alerted chunks circled. None without estimated or realized values."""
    estimated = [r for r in report.rows("estimated") if report.estimated_metric in (None, r["name"])]
    metric = report.estimated_metric or (estimated[0]["name"] if estimated else None)
    realized_all = report.rows("realized")
    realized = [r for r in realized_all if r["name"] == metric] if metric else []
    if not realized and realized_all:  # no realized value of the estimated metric: the gate metric's
        metric_realized = report.gate_metric or realized_all[0]["name"]
        realized = [r for r in realized_all if r["name"] == metric_realized]
    else:
        metric_realized = metric
    est = _series(estimated)
    real = _series(realized)
    if not est[0] and not real[0]:
        return None
    fig = _figure(2.8)
    ax = fig.subplots()
    if est[0]:
        ax.plot(est[0], est[1], marker="o", markersize=3, linewidth=1.4, color=ESTIMATED, label=f"estimated {metric}")
        _thresholds(ax, estimated)
        _mark_alerts(ax, *est, label="alert (estimated)")
    if real[0]:
        ax.plot(real[0], real[1], marker="s", markersize=3, linewidth=1.2, color=REALIZED, label=f"realized {metric_realized}")
        _mark_alerts(ax, *real, label="alert (realized)")
    return _finish_line_chart(fig, ax, report, f"Performance per chunk: {metric or metric_realized}")


def _drift_cells(report: MonitorReport) -> tuple[list[str], list[int], dict[tuple[str, int], tuple[float | None, bool]]]:
    """(feature, chunk index) -> (the largest statistic / upper threshold over the methods,
    whether any method alerted)."""
    rows = report.rows("univariate")
    features = list(dict.fromkeys(r["name"] for r in rows))
    chunks = sorted({r["chunk_index"] for r in rows})
    cells: dict[tuple[str, int], tuple[float | None, bool]] = {}
    for r in rows:
        key = (r["name"], r["chunk_index"])
        value, upper = _finite(r["value"]), _finite(r["upper_threshold"])
        ratio = value / upper if value is not None and upper not in (None, 0.0) else None
        old_ratio, old_alert = cells.get(key, (None, False))
        if old_ratio is not None and (ratio is None or old_ratio > ratio):
            ratio = old_ratio
        cells[key] = (ratio, old_alert or bool(r["alert"]))
    return features, chunks, cells


def drift_map_chart(report: MonitorReport) -> bytes | None:
    """Features x chunks: colour is the drift statistic over its alert threshold (1 = at
    the threshold; an alert-only method without a threshold counts as 1 when it alerts),
    alerted cells crossed. None without univariate results."""
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.patches import Rectangle

    features, chunks, cells = _drift_cells(report)
    if not features or not chunks:
        return None
    column = {c: j for j, c in enumerate(chunks)}
    grid = np.zeros((len(features), len(chunks)))
    for (feature, chunk), (ratio, alert) in cells.items():
        grid[features.index(feature), column[chunk]] = min(ratio if ratio is not None else (1.0 if alert else 0.0), 2.0)
    fig = _figure(min(1.4 + 0.24 * len(features), 7.0))
    ax = fig.subplots()
    cmap = LinearSegmentedColormap.from_list("drift", ["#f7fbff", "#fdd49e", ALERT])
    image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0.0, vmax=2.0, interpolation="nearest",
                      extent=(chunks[0] - 0.5, chunks[-1] + 0.5, len(features) - 0.5, -0.5))
    alerted = [(chunk, features.index(feature)) for (feature, chunk), (_, alert) in cells.items() if alert]
    if alerted:
        ax.scatter([c for c, _ in alerted], [f for _, f in alerted], marker="x", s=22, color="black", linewidths=1.1)
    for index in sorted(report.partial_chunks):  # reported without alerts: hatched over the colour
        ax.add_patch(Rectangle((index - 0.5, -0.5), 1.0, len(features), facecolor="none", edgecolor="#636363",
                               hatch="//", linewidth=0))
    ax.set_yticks(range(len(features)))
    ax.set_yticklabels(features, fontsize=7)
    _chunk_axis(ax, report)
    ax.set_xlim(chunks[0] - 0.5, chunks[-1] + 0.5)
    title = "Univariate drift: statistic / threshold per feature and chunk (x = alert)"
    if report.partial_chunks:
        title = "Univariate drift: statistic / threshold (x = alert; hatched: partial chunk, no alerts)"
    ax.set_title(title, fontsize=9, loc="left")
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.01, ticks=[0, 1, 2])
    bar.ax.set_yticklabels(["0", "1", "≥2"], fontsize=7)
    return _png(fig)


def multivariate_chart(report: MonitorReport) -> bytes | None:
    """The multivariate drift statistic (data reconstruction error) per chunk, its
    thresholds, alerted chunks circled. None without multivariate results."""
    rows = report.rows("multivariate")
    xs, ys, alerts = _series(rows)
    if not xs:
        return None
    fig = _figure(2.5)
    ax = fig.subplots()
    name = rows[0]["name"].replace("_", " ")
    ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.4, color=ESTIMATED, label=name)
    _thresholds(ax, rows)
    _mark_alerts(ax, xs, ys, alerts, label="alert")
    return _finish_line_chart(fig, ax, report, f"Multivariate drift: {name} per chunk")


def paired_chart(chunks: list[Any], *, metric: str, served: str, shadow: str) -> bytes | None:
    """Two models' realized metric per chunk on the same rows (a rollout in progress:
    :func:`driftloop.rollout.paired_chunks`). None without chunks."""
    if not chunks:
        return None
    fig = _figure(2.6)
    ax = fig.subplots()
    xs = list(range(len(chunks)))
    ax.plot(xs, [c.served for c in chunks], marker="o", markersize=3, linewidth=1.4, color=ESTIMATED, label=served)
    ax.plot(xs, [c.shadow for c in chunks], marker="s", markersize=3, linewidth=1.2, color=REALIZED, label=shadow)
    ax.set_title(f"Realized {metric} per chunk, both models on the same rows", fontsize=10, loc="left")
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(alpha=0.3, linewidth=0.5)
    ax.set_xticks(xs, [c.label for c in chunks], rotation=30, ha="right", fontsize=7)
    _legend(ax)
    return _png(fig)


@dataclass(frozen=True)
class ChartImage:
    name: str  # file stem: performance, drift-map, multivariate
    alt: str  # the image's alt text in the markdown
    png: bytes


CHARTS: tuple[tuple[str, str, Callable[[MonitorReport], bytes | None]], ...] = (
    ("performance", "Estimated and realized performance per chunk", performance_chart),
    ("drift-map", "Univariate drift per feature and chunk", drift_map_chart),
    ("multivariate", "Multivariate drift (data reconstruction error) per chunk", multivariate_chart),
)


def render_charts(report: MonitorReport) -> list[ChartImage]:
    """Every chart the report has data for, in reading order."""
    charts = []
    for name, alt, draw in CHARTS:
        png = draw(report)
        if png is not None:
            charts.append(ChartImage(name, alt, png))
    return charts


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def images_markdown(charts: list[ChartImage]) -> str:
    """Markdown images with PNG data URIs, one paragraph each."""
    return "\n\n".join(f"![{chart.alt}]({data_uri(chart.png)})" for chart in charts)


def charts_markdown(report: MonitorReport) -> str:
    """The report's charts as one markdown block; an empty string when there is nothing to
    draw."""
    return images_markdown(render_charts(report))


def with_charts(summary: str, charts: str) -> str:
    """``summary`` (tasks.monitor_summary.render_summary: title, verdict, reasons, then the
    per-chunk table) with ``charts`` placed before the table, or at the end without one."""
    if not charts:
        return summary
    lines = summary.split("\n")
    table = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if table is None:
        return f"{summary}\n\n{charts}\n"
    return "\n".join([*lines[:table], charts, "", *lines[table:]])


def artifact_markdown(summary: str, charts: list[ChartImage], stored: list[str]) -> str:
    """The monitoring artifact: the summary's title, verdict and reasons, the charts, the
    per-chunk table, then where the stored plots are (paths to copy, not links: the UI
    cannot open a file:// link)."""
    markdown = with_charts(summary, images_markdown(charts))
    if stored:
        markdown += "\n\nStored with the report (NannyML's interactive plots, these charts):\n\n"
        markdown += "\n".join(f"- `{uri}`" for uri in stored)
    return markdown
