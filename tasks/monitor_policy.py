"""The monitoring policy's verdict on a report: which rules fire (estimated and realized
performance, univariate and multivariate drift) and the event to emit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from driftloop.metrics import HIGHER_IS_BETTER
from driftloop.spec import GateSpec, MonitoringPolicy
from driftloop.tasks.monitor_report import MonitorReport

DRIFT_EVENT = "driftloop.model.drift-detected"
PERFORMANCE_EVENT = "driftloop.model.performance-degraded"


@dataclass
class PolicyDecision:
    fired: bool
    event: str | None
    reasons: list[str]
    drifting_features: list[str]
    window: list[int]



def decide_retraining(
    report: MonitorReport, policy: MonitoringPolicy, *, gate: GateSpec | None = None, gate_metric: str | None = None,
) -> PolicyDecision:
    """Apply the policy to the most recent chunks. Drift alone is reported; it triggers
    retraining only through the rules the policy enables.

    Performance rules (``policy.performance``): the estimated metric alerting, and, given
    ``gate_metric`` (default: ``gate.metric``), its realized value degrading in labelled
    chunks (see :func:`realized_reason`). Without a gate metric only estimated performance
    counts, as before."""
    indices = [c.index for c in report.chunks]
    reasons: list[str] = []
    event: str | None = None

    perf_rows = sorted(report.rows("estimated"), key=lambda r: r["chunk_index"])
    if policy.performance is not None and perf_rows:
        recent = perf_rows[-policy.performance.of_last:]
        alerts = sum(worse_than_threshold(r) for r in recent)
        if alerts >= policy.performance.alerts:
            event = PERFORMANCE_EVENT
            reasons.append(
                f"estimated {report.estimated_metric} alerted (worse than its threshold) in {alerts} of the last "
                f"{len(recent)} chunks (policy: {policy.performance.alerts} of {policy.performance.of_last})"
            )
    gate_metric = gate_metric or (gate.metric if gate else None)
    if policy.performance is not None and gate_metric:
        realized = realized_reason(report, policy, gate, gate_metric)
        if realized is not None:
            event = PERFORMANCE_EVENT
            reasons.append(realized)

    window = indices[-policy.window:]
    drifting = sorted({r["name"] for r in report.rows("univariate") if r["alert"] and r["chunk_index"] in window})
    multivariate_alerts = [r["chunk_index"] for r in report.rows("multivariate") if r["alert"] and r["chunk_index"] in window]
    if policy.multivariate_drift and multivariate_alerts:
        event = event or DRIFT_EVENT
        reasons.append(f"multivariate drift (data reconstruction) alerted in chunk(s) {multivariate_alerts}")
    if policy.min_drifting_features is not None and len(drifting) >= policy.min_drifting_features:
        event = event or DRIFT_EVENT
        reasons.append(f"{len(drifting)} features drift in the last {len(window)} chunks (policy: at least {policy.min_drifting_features})")
    if event is None:
        if drifting or multivariate_alerts:
            reasons.append("drift reported, but no retraining rule fired")
        else:
            reasons.append("no alerts in the policy window")
    return PolicyDecision(event is not None, event, reasons, drifting, window)


def labelled_enough(report: MonitorReport, chunk_index: int) -> bool:
    """Whether a chunk has at least half a full chunk of labelled rows: realized metrics on
    a handful of rows (a tiny last chunk, labels just starting to arrive) are noise. A
    report without counts (read back from the registry) counts every chunk."""
    if report.chunk_rows is None or chunk_index not in report.labelled_rows:
        return True
    return 2 * report.labelled_rows[chunk_index] >= report.chunk_rows


def worse_than_threshold(row: dict[str, Any]) -> bool:
    """A performance alert on the bad side: better than the reference is no reason to retrain."""
    if not row["alert"] or row["value"] is None:
        return False
    if HIGHER_IS_BETTER.get(row["name"], True):
        return row["lower_threshold"] is not None and row["value"] < row["lower_threshold"]
    return row["upper_threshold"] is not None and row["value"] > row["upper_threshold"]


def realized_reason(report: MonitorReport, policy: MonitoringPolicy, gate: GateSpec | None, metric: str) -> str | None:
    """Why realized ``metric`` warrants retraining, or None. Of the last
    ``policy.performance.of_last`` chunks with a realized value and enough labels, at least
    ``policy.performance.alerts`` must be degraded: NannyML's realized alert fired (relative
    to the reference) or the value is worse than the gate's absolute bar for ``metric``
    (``min`` when higher is better, ``max`` when lower is)."""
    assert policy.performance is not None
    rows = sorted(
        (r for r in report.rows("realized") if r["name"] == metric and r["value"] is not None
         and labelled_enough(report, r["chunk_index"])),
        key=lambda r: r["chunk_index"],
    )
    if not rows:
        return None
    recent = rows[-policy.performance.of_last:]
    higher = HIGHER_IS_BETTER.get(metric, True)
    bound = gate.thresholds.get(metric) if gate else None
    limit = (bound.min if higher else bound.max) if bound else None
    below = [r for r in recent if limit is not None and (r["value"] < limit if higher else r["value"] > limit)]
    alerted = [r for r in recent if worse_than_threshold(r)]
    degraded = {r["chunk_index"] for r in below + alerted}
    if len(degraded) < policy.performance.alerts:
        return None

    def values(chosen: list[dict[str, Any]]) -> str:
        return ", ".join(f"{r['chunk_key']}: {r['value']:.3f}" for r in chosen)

    of = f"of the last {len(recent)} labelled chunks"
    parts = []
    if below:
        side = "below the gate's min" if higher else "above the gate's max"
        parts.append(f"realized {metric} {side} {limit:g} in {len(below)} {of} ({values(below)})")
    if alerted:
        parts.append(f"realized {metric} alerted against the reference in {len(alerted)} {of} ({values(alerted)})")
    return "; ".join(parts) + (
        f" (policy: {policy.performance.alerts} of {policy.performance.of_last} degraded; {len(degraded)} are)"
    )
