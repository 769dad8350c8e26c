"""Flow ``monitor``: served rows from the model's predictions table (+ labels from its
labels table where they arrived) vs the model's reference -> NannyML -> policy ->
results, report and charts (inline in the UI), NannyML's plots (artifact store) -> event
when the policy fires. The table snapshots read are stored with the run."""

from __future__ import annotations

import hashlib
import io
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.events import emit_event
from pydantic import BaseModel

from driftloop.errors import DriftloopError
from driftloop.feedback import (
    join_labels,
    latest_labels,
    scored_and_labelled,
    served_rows,
)
from driftloop.flows.config import run_settings
from driftloop.inputs import read_input
from driftloop.legacy_outputs import import_legacy_outputs
from driftloop.naming import artifact_key
from driftloop.onnx_model import load_model
from driftloop.redact import mask_uri
from driftloop.registry import ModelVersionRecord, RegistryStore, open_registry
from driftloop.rollout import rollout_pending
from driftloop.scoring_runs import reconcile_scoring_runs
from driftloop.spec import DatasetSpec, MonitoringPolicy, ReferencePeriod
from driftloop.storage import ArtifactStore, read_bytes
from driftloop.tables import Tables, open_tables
from driftloop.tasks.calibration import CalibrationStore
from driftloop.tasks.ingest import read_file
from driftloop.tasks.labels import validate_labels
from driftloop.tasks.monitor import decide_task, fit_monitoring_task, monitor_task
from driftloop.tasks.monitor_charts import artifact_markdown, render_charts
from driftloop.tasks.monitor_policy import PolicyDecision
from driftloop.tasks.monitor_report import MonitoringError, MonitorReport
from driftloop.tasks.monitor_summary import chunk_summaries, render_summary
from driftloop.tasks.rollout import RolloutOutcome, rollout_markdown_task
from driftloop.tasks.score import fetch_verified


class ChunkSummary(BaseModel):
    start: str | None
    end: str | None
    drifting_features: list[str]
    estimated: float | None
    realized: float | None


class PolicyVerdict(BaseModel):
    fired: bool
    reasons: list[str]


class EmittedEvent(BaseModel):
    event: str
    resource: dict[str, str]
    payload: dict[str, Any]


class LabelsUsed(BaseModel):
    """Where realized performance's labels came from, and what validation made of them."""

    source: str
    rows_in: int
    rows_valid: int
    rows_quarantined: int
    matched: int  # scored rows that got a label
    snapshot_id: int | None = None  # the labels table's snapshot read (None: a file)


class MonitorResult(BaseModel):
    run_id: str
    model: str
    version: int
    chunks: list[ChunkSummary]
    policy: PolicyVerdict
    event: EmittedEvent | None
    report_uri: str
    labels: LabelsUsed | None = None
    rollout: RolloutOutcome | None = None  # the rollout decision taken after monitoring, if one was in progress


@dataclass
class Analysis:
    """The rows monitored and where they came from (what the run records)."""

    rows: pl.DataFrame
    described: str  # e.g. predictions.car_loan@<snapshot> run <id>, for people and the event
    predictions_snapshot: int | None = None


@task(name="load-reference", cache_policy=NONE)
def load_reference_task(record: ModelVersionRecord) -> tuple[DatasetSpec, pl.DataFrame]:
    if not record.reference_uri or not record.reference_sha256:
        raise DriftloopError(f"{record.ref} has no monitoring reference (trained by an early build); train it again")
    spec = load_model(fetch_verified(record.onnx_uri, record.onnx_sha256)).spec()
    reference_bytes = read_bytes(record.reference_uri)
    if hashlib.sha256(reference_bytes).hexdigest() != record.reference_sha256:
        raise DriftloopError(f"monitoring reference {record.reference_uri} does not match its recorded sha256; refusing to use it")
    return spec, pl.read_parquet(io.BytesIO(reference_bytes))


@task(name="load-served-rows", cache_policy=NONE)
def load_analysis_task(registry: RegistryStore, tables: Tables, spec: DatasetSpec, record: ModelVersionRecord,
                       scoring_run: str | None, start: datetime | None, end: datetime | None,
                       input_uri: str | None) -> Analysis:
    """What is monitored: a file of scored rows (an export) when ``input_uri`` is given;
    else the rows this version served in [start, end) (by the spec's timestamp); else one
    scoring run's rows (default: the version's latest), read at the snapshot it committed."""
    if input_uri:
        return Analysis(read_input(input_uri).frame, mask_uri(input_uri))
    if start is None and end is None:
        reconcile_scoring_runs(registry, tables, record.model_name)  # a committed run the registry failed to record
        if scoring_run is None:
            runs = [r for r in registry.list_scoring_runs(record.model_name)
                    if r.model_version == record.version and r.snapshot_id is not None]
            if not runs:
                raise DriftloopError(f"no scoring runs of {record.ref} in its predictions table yet; score some data "
                                     "with it first (driftloop score), or pass a time range or input_uri")
            run = runs[0]
        else:
            found = registry.get_scoring_run(scoring_run)
            if found is None or found.model_name != record.model_name or found.snapshot_id is None:
                raise DriftloopError(f"scoring run {scoring_run} is not a run of {record.model_name} in its predictions "
                                     "table; list runs with driftloop models show --json")
            run = found
        rows, snapshot = served_rows(tables, spec, run.snapshot_id, scoring_run=run.id, bookkeeping=False)
        described = f"predictions.{spec.name}@{snapshot} run {run.id}"
    else:
        if not spec.timestamp:
            raise DriftloopError(f"spec '{spec.name}' has no timestamp: monitor a scoring run instead of a time range")
        rows, snapshot = served_rows(tables, spec, model_version=record.version, since=start, until=end,
                                     bookkeeping=False)
        described = f"predictions.{spec.name}@{snapshot} v{record.version} {start or '...'} .. {end or '...'}"
    if rows is None:
        raise DriftloopError(f"{record.ref} has no predictions table yet; score some data with it first")
    frame = rows.collect()
    if frame.height == 0:
        raise DriftloopError(f"{described}: no served rows to monitor")
    return Analysis(frame, described, snapshot)


@task(name="load-reference-period", cache_policy=NONE)
def reference_period_task(tables: Tables, spec: DatasetSpec, record: ModelVersionRecord,
                          period: ReferencePeriod) -> pl.DataFrame:
    """The policy's reference period instead of the holdout: what this version scored
    then, with the labels registered since."""
    reference = scored_and_labelled(tables, spec, model_version=record.version, start=period.start, end=period.end)
    if reference.height < 100:
        raise MonitoringError(
            f"monitoring {record.ref}: the reference period {period.start} .. {period.end} holds {reference.height} "
            f"labelled rows scored by v{record.version} (at least 100 needed); score that period with this version "
            "and register its labels (driftloop labels), or remove monitoring.reference_period"
        )
    return reference


@task(name="load-labels", cache_policy=NONE)
def load_labels_task(tables: Tables, spec: DatasetSpec, labels_uri: str | None,
                     analysis_ids: pl.Series | None = None) -> tuple[pl.DataFrame | None, LabelsUsed | None]:
    """Labels for realized performance: a file parsed and validated by the spec like
    ``driftloop labels`` (bad rows quarantined and counted), or by default the model's
    labels table (the latest registration of an id wins)."""
    if not spec.id:
        return None, None  # nothing to join labels on
    if labels_uri:
        batch = read_file(labels_uri)
        result = validate_labels(batch.frame, batch.malformed, spec, source=batch.source)
        if result.rows_quarantined:
            get_run_logger().warning("labels %s: %d of %d rows failed validation and are not used (register them "
                                     "with driftloop labels to keep a quarantine file)", batch.source,
                                     result.rows_quarantined, result.rows_in)
        return result.valid, LabelsUsed(source=batch.source, rows_in=result.rows_in, rows_valid=result.rows_valid,
                                        rows_quarantined=result.rows_quarantined, matched=0)
    # Only the monitored rows' labels: the work follows the analysis, not the labels' history.
    ids = analysis_ids.to_frame().lazy() if analysis_ids is not None else None
    lazy, snapshot = latest_labels(tables, spec, ids=ids)
    if lazy is None:
        return None, None
    labels = lazy.collect()
    return labels, LabelsUsed(source=f"labels.{spec.name}@{snapshot}", rows_in=labels.height,
                              rows_valid=labels.height, rows_quarantined=0, matched=0, snapshot_id=snapshot)


def model_resource(model_name: str, version: int) -> dict[str, str]:
    """The resource of a model's events: what the retrain trigger matches and reads."""
    return {
        "prefect.resource.id": f"driftloop.model.{model_name}",
        "driftloop.model.name": model_name,
        "driftloop.model.version": str(version),
    }


def build_event(record: ModelVersionRecord, decision: PolicyDecision, report: MonitorReport, analysed: str) -> EmittedEvent:
    """The event that starts a retrain. Its resource names the model; the payload is for
    people and the UI (what fired, where): a retrain never reads it."""
    window = [c for c in report.chunks if c.index in decision.window]
    estimates = [
        {"chunk": r["chunk_key"], "start": r["chunk_start"], "end": r["chunk_end"], "value": r["value"],
         "lower_threshold": r["lower_threshold"], "upper_threshold": r["upper_threshold"], "alert": r["alert"]}
        for r in report.rows("estimated") if r["chunk_index"] in decision.window
    ]
    return EmittedEvent(
        event=str(decision.event),
        resource=model_resource(record.model_name, record.version),
        payload={
            "model": record.model_name,
            "version": record.version,
            "reasons": decision.reasons,
            "drifting_features": decision.drifting_features,
            "metric": report.estimated_metric,
            "estimates": estimates,
            "chunk_span": {"start": window[0].start if window else None, "end": window[-1].end if window else None},
            "analysed": analysed,
        },
    )


@task(name="publish-monitoring", cache_policy=NONE)
def publish_task(registry: RegistryStore, store: ArtifactStore, record: ModelVersionRecord, report: MonitorReport,
                 decision: PolicyDecision, event: EmittedEvent | None, analysis: Analysis,
                 labels: LabelsUsed | None, rollout_chart: str = "") -> tuple[str, str]:
    run_id = str(uuid.uuid4())
    base = f"monitoring/{record.model_name}/{run_id}"
    summary = render_summary(record.ref, report, decision, event.model_dump() if event else None)
    report_uri = store.write_text(f"{base}/summary.md", summary)
    # For deep dives, kept in the artifact store: NannyML's interactive plots (standalone
    # HTML) and the charts as PNG files. The UI gets the charts inline (data URIs): it
    # cannot open a file:// link, so no link artifacts.
    plots = [store.write_text(f"{base}/{name}.html", figure.to_html(include_plotlyjs=True, full_html=True))
             for name, figure in report.figures.items()]
    charts = render_charts(report)
    plots += [store.write_bytes(f"{base}/charts/{chart.name}.png", chart.png) for chart in charts]
    registry.add_monitoring_run(
        {"id": run_id, "model_name": record.model_name, "model_version": record.version, "analysis_uri": analysis.described,
         "labels_uri": labels.source if labels else None,
         "snapshots": {"predictions": analysis.predictions_snapshot, "labels": labels.snapshot_id if labels else None},
         "decision": {"fired": decision.fired, "event": decision.event, "reasons": decision.reasons,
                                                "drifting_features": decision.drifting_features,
                                                # what the drift thresholds were set for, and chunks judged without alerts
                                                "calibration": report.calibration.as_record() if report.calibration else None,
                                                "partial_chunks": {str(k): v for k, v in report.partial_chunks.items()}},
         "event": event.model_dump() if event else None, "report_uri": report_uri, "created_at": datetime.now(UTC)},
        report.results,
    )
    markdown = artifact_markdown(summary, charts, plots) + (f"\n\n{rollout_chart}" if rollout_chart else "")
    create_markdown_artifact(key=artifact_key("monitoring", record.model_name), markdown=markdown, description=f"Monitoring of {record.ref}")
    create_table_artifact(
        key=artifact_key("monitoring-results", record.model_name),
        table=[{k: r[k] for k in ("chunk_key", "kind", "name", "method", "value", "lower_threshold", "upper_threshold", "alert")} for r in report.results],
        description="NannyML results per chunk",
    )
    return run_id, report_uri


@flow(name="monitor")
def monitor(
    model: str = "car_loan@champion",
    scoring_run: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    input_uri: str | None = None,
    labels_uri: str | None = None,
    policy: MonitoringPolicy | None = None,
    policy_block: str | None = None,
    registry_block: str | None = None,
) -> MonitorResult:
    """Monitor ``model``'s served rows from its predictions table: one scoring run
    (``scoring_run``; default: the version's latest), or every row the version served
    with a timestamp in [``start``, ``end``); or a Parquet/CSV file of scored rows
    (``input_uri``, e.g. an export). Realized performance uses the model's labels table
    (``driftloop labels``), or ``labels_uri`` (Parquet/CSV with id and target, validated
    by the spec) when given. ``policy``, or the saved MonitoringPolicyBlock named
    ``policy_block``, overrides the spec's ``monitoring`` section. ``registry_block``
    names a driftloop-registry block to use instead of the environment's registry."""
    logger = get_run_logger()
    settings = run_settings(registry_block)
    registry = open_registry(settings.registry_database_url())
    store = ArtifactStore(settings.artifact_root_uri())
    tables = open_tables(registry.engine, settings.artifact_root_uri())
    record = registry.resolve(model)
    spec, reference = load_reference_task(record)
    import_legacy_outputs(registry, tables, settings.artifact_root_uri(), model=record.model_name, spec=spec)
    if policy is None and policy_block:
        from driftloop.blocks.driftloop_blocks import MonitoringPolicyBlock

        policy = MonitoringPolicyBlock.load(policy_block).policy
    active = policy or spec.monitoring
    if active.reference_period is not None:
        reference = reference_period_task(tables, spec, record, active.reference_period)
    # Fitted before the analysis is read: the fits' working sets never sit on top of it.
    fit = fit_monitoring_task(reference, spec, active)
    del reference
    # Only this version's rows: another version's would be judged against this reference.
    analysed = load_analysis_task(registry, tables, spec, record, scoring_run, start, end, input_uri)
    analysis = analysed.rows
    labels, labels_used = load_labels_task(tables, spec, labels_uri,
                                           analysis[spec.id] if spec.id and spec.id in analysis.columns else None)
    if labels is not None and labels_used is not None:
        analysis = join_labels(analysis, labels, spec)
        labels_used.matched = int(analysis[spec.target].is_not_null().sum())
    # Drift and realized thresholds: calibrated once per reference, chunk size and policy, then read back.
    report = monitor_task(fit, analysis, CalibrationStore(store, record.model_name))
    decision = decide_task(report, active, spec.gate, spec.gate_metric)

    event = build_event(record, decision, report, analysed.described) if decision.fired else None
    # Stored first, emitted second: an event never points at results that were not kept.
    # A rollout in progress: both models' realized metric per chunk, on the same rows.
    rollout_chart = (rollout_markdown_task(registry, tables, record.model_name, {record.version: spec})
                     if rollout_pending(registry, record.model_name, spec, datetime.now(UTC)) else "")
    run_id, report_uri = publish_task(registry, store, record, report, decision, event, analysed, labels_used,
                                      rollout_chart)
    if event is not None:
        emit_event(event=event.event, resource=event.resource, payload={**event.payload, "monitoring_run": run_id})
        logger.warning("policy fired: %s (%s)", event.event, "; ".join(decision.reasons))
    else:
        logger.info("policy did not fire: %s", "; ".join(decision.reasons))
    rollout = decide_rollout(registry, record.model_name, spec, registry_block)
    return MonitorResult(
        run_id=run_id, model=record.model_name, version=record.version,
        chunks=[ChunkSummary(**{k: c[k] for k in ("start", "end", "drifting_features", "estimated", "realized")}) for c in chunk_summaries(report)],
        policy=PolicyVerdict(fired=decision.fired, reasons=decision.reasons), event=event, report_uri=report_uri,
        labels=labels_used, rollout=rollout,
    )


def decide_rollout(registry: RegistryStore, model: str, spec: DatasetSpec, registry_block: str | None) -> RolloutOutcome | None:
    """New labels may decide a rollout in progress (a candidate in shadow, a guard). A
    decision that cannot be taken (the champion moved meanwhile) is logged: the data this
    run kept stays kept."""
    from driftloop.flows.rollout import rollout_decide

    if not rollout_pending(registry, model, spec, datetime.now(UTC)):
        return None
    try:
        return rollout_decide(model=model, registry_block=registry_block)
    except DriftloopError as exc:
        get_run_logger().warning("rollout of %s not decided: %s", model, exc)
        return None
