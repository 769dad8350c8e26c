"""Flow ``labels``: ingest ground truth that arrived after scoring: validated, kept as
a dataset snapshot (lineage), and appended to the model's labels table."""

from __future__ import annotations

from prefect import flow, get_run_logger

from driftloop.flows.config import SQL_BLOCK_PREFIX, resolve_source, run_settings
from driftloop.flows.ingest import IngestResult, load_spec_task
from driftloop.flows.monitor import decide_rollout
from driftloop.registry import open_registry
from driftloop.storage import ArtifactStore
from driftloop.tables import open_tables
from driftloop.tasks.ingest import (
    dataset_id_for,
    enforce_reject_limit,
    read_source_task,
    snapshot_dataset_task,
    write_quarantine_task,
)
from driftloop.tasks.labels import append_labels_task, validate_labels_task


@flow(name="labels")
def ingest_labels(spec_path: str, source: str, registry_block: str | None = None) -> IngestResult:
    """Validate ``source`` (a path or URI, or ``sql-block:<name>``: id, target, optional
    timestamp) against the spec's id and target, keep it as the labels dataset
    ``<name>.labels`` and append its valid rows to the table ``labels.<name>``. Every
    registration appends, even of content sent before: the latest registration of an id
    wins."""
    logger = get_run_logger()
    settings = run_settings(registry_block)
    store = ArtifactStore(settings.artifact_root_uri())
    registry = open_registry(settings.registry_database_url())
    spec = load_spec_task(spec_path)
    labels_spec = spec.model_copy(update={"name": f"{spec.name}.labels"})
    batch = read_source_task(resolve_source(source))
    if source.startswith(SQL_BLOCK_PREFIX):
        batch.source = source
    dataset_id = dataset_id_for(batch, labels_spec, labelled=True)
    result = validate_labels_task(batch.frame, batch.malformed, spec, batch.source)
    quarantine_uri = write_quarantine_task(result, store, labels_spec, dataset_id)
    enforce_reject_limit(result, spec, batch.source, quarantine_uri)
    record, created = snapshot_dataset_task(
        result, labels_spec, dataset_id=dataset_id, content_hash=batch.content_hash, source=batch.source,
        labelled=True, quarantine_uri=quarantine_uri, store=store, registry=registry,
    )
    tables = open_tables(registry.engine, settings.artifact_root_uri())
    registration, snapshot = append_labels_task(tables, result.valid, spec, batch.source)
    logger.info("labels %s: %d in, %d valid, %d quarantined; registration %s -> labels.%s snapshot %s", record.id,
                record.rows_in, record.rows_valid, record.rows_quarantined, registration, spec.name, snapshot)
    if spec.name in registry.list_models():
        decide_rollout(registry, spec.name, spec, registry_block)  # the new labels may decide a rollout
    return IngestResult(
        dataset_id=record.id, name=record.name, rows_in=record.rows_in, rows_valid=record.rows_valid,
        rows_quarantined=record.rows_quarantined, quarantine_uri=record.quarantine_uri,
        snapshot_uri=record.snapshot_uri, created=created, ignored_columns=result.ignored_columns,
        table=f"labels.{spec.name}", table_snapshot=snapshot,
    )
