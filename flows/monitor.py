"""Flow ``monitor``: scored outputs (+ labels where they arrived) vs the model's
reference -> NannyML -> policy -> results, report and charts (inline in the UI), NannyML's plots
(artifact store) -> event when the policy fires."""

from __future__ import annotations

import hashlib
import io
import uuid
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
    labels_dataset_name,
    registered_labels,
    scored_and_labelled,
)
from driftloop.onnx_model import load_model
from driftloop.outputs import read_predictions
from driftloop.redact import mask_uri
from driftloop.registry import ModelVersionRecord, RegistryStore, open_registry
from driftloop.spec import DatasetSpec, MonitoringPolicy, ReferencePeriod
from driftloop.storage import ArtifactStore, read_bytes
from flows.config import run_settings
from tasks.calibration import CalibrationStore
from tasks.ingest import read_file
from tasks.labels import validate_labels
from tasks.monitor import (
    MonitoringError,
    MonitorReport,
    PolicyDecision,
    chunk_summaries,
    decide_task,
    monitor_task,
    render_summary,
)
from tasks.monitor_charts import artifact_markdown, render_charts
from tasks.score import fetch_verified


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


class MonitorResult(BaseModel):
    run_id: str
    model: str
    version: int
    chunks: list[ChunkSummary]
    policy: PolicyVerdict
    event: EmittedEvent | None
    report_uri: str
    labels: LabelsUsed | None = None


@task(name="load-monitoring-inputs", cache_policy=NONE)
def load_inputs_task(record: ModelVersionRecord, input_uri: str) -> tuple[DatasetSpec, pl.DataFrame, pl.DataFrame]:
    if not record.reference_uri or not record.reference_sha256:
        raise DriftloopError(f"{record.ref} has no monitoring reference (trained by an early build); train it again")
    spec = load_model(fetch_verified(record.onnx_uri, record.onnx_sha256)).spec()
    reference_bytes = read_bytes(record.reference_uri)
    if hashlib.sha256(reference_bytes).hexdigest() != record.reference_sha256:
        raise DriftloopError(f"monitoring reference {record.reference_uri} does not match its recorded sha256; refusing to use it")
    reference = pl.read_parquet(io.BytesIO(reference_bytes))
    return spec, reference, read_predictions(input_uri)


@task(name="load-reference-period", cache_policy=NONE)
def reference_period_task(registry: RegistryStore, spec: DatasetSpec, record: ModelVersionRecord,
                          period: ReferencePeriod) -> pl.DataFrame:
    """The policy's reference period instead of the holdout: what this version scored
    then, with the labels registered since."""
    reference = scored_and_labelled(registry, spec, model_version=record.version, start=period.start, end=period.end)
    if reference.height < 100:
        raise MonitoringError(
            f"monitoring {record.ref}: the reference period {period.start} .. {period.end} holds {reference.height} "
            f"labelled rows scored by v{record.version} (at least 100 needed); score that period with this version "
            "and register its labels (driftloop labels), or remove monitoring.reference_period"
        )
    return reference


@task(name="load-labels", cache_policy=NONE)
def load_labels_task(registry: RegistryStore, spec: DatasetSpec, labels_uri: str | None) -> tuple[pl.DataFrame | None, LabelsUsed | None]:
    """Labels for realized performance: a file parsed and validated by the spec like
    ``driftloop labels`` (bad rows quarantined and counted), or by default the labels
    registered for the model (the later label for an id wins)."""
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
    labels = registered_labels(registry, spec)
    if labels is None:
        return None, None
    return labels, LabelsUsed(source=f"registry:{labels_dataset_name(spec.name)}", rows_in=labels.height,
                              rows_valid=labels.height, rows_quarantined=0, matched=0)


def model_resource(model_name: str, version: int) -> dict[str, str]:
    """The resource of a model's events: what the retrain trigger matches and reads."""
    return {
        "prefect.resource.id": f"driftloop.model.{model_name}",
        "driftloop.model.name": model_name,
        "driftloop.model.version": str(version),
    }


def build_event(record: ModelVersionRecord, decision: PolicyDecision, report: MonitorReport, input_uri: str) -> EmittedEvent:
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
            "analysis_uri": mask_uri(input_uri),
        },
    )


@task(name="publish-monitoring", cache_policy=NONE)
def publish_task(registry: RegistryStore, store: ArtifactStore, record: ModelVersionRecord, report: MonitorReport,
                 decision: PolicyDecision, event: EmittedEvent | None, input_uri: str, labels_uri: str | None) -> tuple[str, str]:
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
        {"id": run_id, "model_name": record.model_name, "model_version": record.version, "analysis_uri": mask_uri(input_uri),
         "labels_uri": labels_uri, "decision": {"fired": decision.fired, "event": decision.event, "reasons": decision.reasons,
                                                "drifting_features": decision.drifting_features,
                                                # what the drift thresholds were set for, and chunks judged without alerts
                                                "calibration": report.calibration.as_record() if report.calibration else None,
                                                "partial_chunks": {str(k): v for k, v in report.partial_chunks.items()}},
         "event": event.model_dump() if event else None, "report_uri": report_uri, "created_at": datetime.now(UTC)},
        report.results,
    )
    key = record.model_name.replace("_", "-")
    create_markdown_artifact(key=f"monitoring-{key}", markdown=artifact_markdown(summary, charts, plots), description=f"Monitoring of {record.ref}")
    create_table_artifact(
        key=f"monitoring-results-{key}",
        table=[{k: r[k] for k in ("chunk_key", "kind", "name", "method", "value", "lower_threshold", "upper_threshold", "alert")} for r in report.results],
        description="NannyML results per chunk",
    )
    return run_id, report_uri


@flow(name="monitor")
def monitor(
    input_uri: str | None = None,
    model: str = "car_loan@champion",
    labels_uri: str | None = None,
    policy: MonitoringPolicy | None = None,
    policy_block: str | None = None,
    registry_block: str | None = None,
) -> MonitorResult:
    """Monitor the scored output at ``input_uri`` (a `driftloop score` output directory;
    default: the model's latest scoring run) for ``model``. Realized performance uses the
    labels registered for the model (``driftloop labels``), or ``labels_uri`` (Parquet/CSV
    with id and target, validated by the spec) when given. ``policy``, or the saved MonitoringPolicyBlock named ``policy_block``,
    overrides the spec's ``monitoring`` section. ``registry_block`` names a
    driftloop-registry block to use instead of the environment's registry."""
    logger = get_run_logger()
    settings = run_settings(registry_block)
    registry = open_registry(settings.registry_database_url())
    store = ArtifactStore(settings.artifact_root_uri())
    record = registry.resolve(model)
    if input_uri is None:
        # The latest run of the version being monitored: another version's outputs would be
        # judged against this version's reference.
        runs = [r for r in registry.list_scoring_runs(record.model_name) if r.model_version == record.version]
        if not runs:
            raise DriftloopError(f"no scoring runs of {record.ref} yet; score some data with it first or pass input_uri")
        input_uri = runs[0].output_uri
    spec, reference, analysis = load_inputs_task(record, input_uri)
    labels, labels_used = load_labels_task(registry, spec, labels_uri)
    if labels is not None and labels_used is not None:
        analysis = join_labels(analysis, labels, spec)
        labels_used.matched = int(analysis[spec.target].is_not_null().sum())
    if policy is None and policy_block:
        from blocks.driftloop_blocks import MonitoringPolicyBlock

        policy = MonitoringPolicyBlock.load(policy_block).policy
    active = policy or spec.monitoring
    if active.reference_period is not None:
        reference = reference_period_task(registry, spec, record, active.reference_period)
    # Drift and realized thresholds: calibrated once per reference, chunk size and policy, then read back.
    report = monitor_task(reference, analysis, spec, active, CalibrationStore(store, record.model_name))
    decision = decide_task(report, active, spec.gate, spec.gate_metric)

    event = build_event(record, decision, report, input_uri) if decision.fired else None
    # Stored first, emitted second: an event never points at results that were not kept.
    run_id, report_uri = publish_task(registry, store, record, report, decision, event, input_uri,
                                      labels_used.source if labels_used else None)
    if event is not None:
        emit_event(event=event.event, resource=event.resource, payload={**event.payload, "monitoring_run": run_id})
        logger.warning("policy fired: %s (%s)", event.event, "; ".join(decision.reasons))
    else:
        logger.info("policy did not fire: %s", "; ".join(decision.reasons))
    return MonitorResult(
        run_id=run_id, model=record.model_name, version=record.version,
        chunks=[ChunkSummary(**{k: c[k] for k in ("start", "end", "drifting_features", "estimated", "realized")}) for c in chunk_summaries(report)],
        policy=PolicyVerdict(fired=decision.fired, reasons=decision.reasons), event=event, report_uri=report_uri,
        labels=labels_used,
    )
