"""The monitoring report in words: per-chunk summaries and the run's Markdown artifact."""

from __future__ import annotations

from typing import Any

from driftloop.metrics import HIGHER_IS_BETTER
from driftloop.tasks.monitor_policy import PolicyDecision
from driftloop.tasks.monitor_report import MonitorReport


def chunk_summaries(report: MonitorReport) -> list[dict[str, Any]]:
    """Per chunk: span, drifting features, estimated and realized metric (realized: the
    estimated metric's; ``realized_gate``: the gate metric's, None unless it differs)."""
    out = []
    for chunk in report.chunks:
        rows = [r for r in report.results if r["chunk_index"] == chunk.index]
        est_row = next((r for r in rows if r["kind"] == "estimated"), None)
        est = est_row["value"] if est_row else None
        realized = [r for r in rows if r["kind"] == "realized"]
        # The estimated metric's realized row first (a report read back from the registry
        # has no estimated_metric: the estimated row's name says it).
        name = report.estimated_metric or (est_row["name"] if est_row else None)
        real_row = next((r for r in realized if r["name"] == name), realized[0] if realized else None)
        real = real_row["value"] if real_row else None
        gate = report.gate_metric if report.gate_metric and report.gate_metric != name else None
        real_gate = next((r["value"] for r in realized if gate and r["name"] == gate), None)
        out.append({
            "start": chunk.start, "end": chunk.end, "key": chunk.key,
            "drifting_features": sorted({r["name"] for r in rows if r["kind"] == "univariate" and r["alert"]}),
            "multivariate_alert": any(r["alert"] for r in rows if r["kind"] == "multivariate"),
            "estimated": est, "realized": real, "realized_gate": real_gate,
            "labelled_rows": report.labelled_rows.get(chunk.index),
            "performance_alert": any(r["alert"] for r in rows if r["kind"] == "estimated"),
        })
    return out


def render_summary(model_ref: str, report: MonitorReport, decision: PolicyDecision, event: dict[str, Any] | None) -> str:
    metric = report.estimated_metric or "metric"
    better = "higher" if HIGHER_IS_BETTER.get(metric, True) else "lower"
    summaries = chunk_summaries(report)
    gate = report.gate_metric if any(c["realized_gate"] is not None for c in summaries) else None
    gate_header = f" realized {gate} |" if gate else ""
    lines = [
        f"# Monitoring {model_ref}",
        "",
        f"**Policy: {'FIRED - ' + str(decision.event) if decision.fired else 'no retraining'}**",
        "",
        *[f"- {r}" for r in decision.reasons],
        "",
        f"| chunk | start | end | drifting features | estimated {metric} | realized {metric} |{gate_header}",
        "|---|---|---|---|---:|---:|" + ("---:|" if gate else ""),
    ]
    for c in summaries:
        est = f"{c['estimated']:.4f}" + (" ⚠" if c["performance_alert"] else "") if c["estimated"] is not None else "-"
        real = f"{c['realized']:.4f}" if c["realized"] is not None else "-"
        real_gate = f" {c['realized_gate']:.4f} |" if c["realized_gate"] is not None else " - |"
        feats = ", ".join(c["drifting_features"]) + (" (+multivariate)" if c["multivariate_alert"] else "")
        lines.append(
            f"| {c['key']} | {c['start'] or ''} | {c['end'] or ''} | {feats or '-'} | {est} | {real} |{real_gate if gate else ''}"
        )
    lines += ["", f"({better} {metric} is better.)"]
    if gate:
        lines += [f"({'higher' if HIGHER_IS_BETTER.get(gate, True) else 'lower'} {gate} is better.)"]
    if report.calibration is not None:
        lines += ["", f"Drift alerts: {report.calibration.describe()}."]
    keys = {c.index: c.key for c in report.chunks}
    for index, rows in sorted(report.partial_chunks.items()):
        lines.append(f"Chunk {keys.get(index, index)} ({rows} rows, fewer than a full chunk) is reported without alerts.")
    if event:
        lines += ["", f"Event emitted: `{event['event']}` for `{event['resource']['prefect.resource.id']}`"]
    return "\n".join(lines)
