"""Flow ``ingest``: read a source, validate it against the dataset spec, quarantine the
rows that fail, snapshot the rest as a registered dataset."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel

from driftloop.flows.config import SQL_BLOCK_PREFIX, resolve_source, run_settings
from driftloop.markdown import md_code
from driftloop.naming import artifact_key
from driftloop.registry import open_registry
from driftloop.spec import DatasetSpec, load_spec
from driftloop.storage import ArtifactStore
from driftloop.tasks.ingest import (
    SqlSource,
    dataset_id_for,
    enforce_reject_limit,
    read_source_task,
    snapshot_dataset_task,
    validate_task,
    write_quarantine_task,
)
from driftloop.tasks.validate import with_malformed


class IngestResult(BaseModel):
    dataset_id: str
    name: str
    rows_in: int
    rows_valid: int
    rows_quarantined: int
    quarantine_uri: str | None
    snapshot_uri: str
    created: bool
    ignored_columns: list[str]
    table: str | None = None  # labels: the table the rows were appended to
    table_snapshot: int | None = None  # ... and its snapshot after this registration


@task(name="load-spec", cache_policy=NONE)
def load_spec_task(spec_path: str) -> DatasetSpec:
    return load_spec(spec_path)


@flow(name="ingest", log_prints=False)
def ingest(
    spec_path: str,
    source: str | None = None,
    sql: SqlSource | None = None,
    labelled: bool = True,
    registry_block: str | None = None,
) -> IngestResult:
    """Ingest ``source`` (a CSV/Parquet path or URI, or ``sql-block:<name>``) or ``sql``
    (a table or query) as a dataset of the spec at ``spec_path``. ``labelled=False``
    accepts rows without the target (data to be scored). ``registry_block`` names a
    driftloop-registry block to use instead of the environment's registry."""
    if (source is None) == (sql is None):
        raise ValueError("give exactly one of source (a path or URI) or sql")
    logger = get_run_logger()
    settings = run_settings(registry_block)
    store = ArtifactStore(settings.artifact_root_uri())
    registry = open_registry(settings.registry_database_url())

    spec = load_spec_task(spec_path)
    batch = read_source_task(sql if sql is not None else resolve_source(source))
    if source and source.startswith(SQL_BLOCK_PREFIX):
        batch.source = source  # re-readable by a retrain, unlike the masked URL
    dataset_id = dataset_id_for(batch, spec, labelled=labelled)
    result = with_malformed(validate_task(batch.frame, spec, labelled, batch.source), batch.malformed)
    quarantine_uri = write_quarantine_task(result, store, spec, dataset_id)
    enforce_reject_limit(result, spec, batch.source, quarantine_uri)
    record, created = snapshot_dataset_task(
        result,
        spec,
        dataset_id=dataset_id,
        content_hash=batch.content_hash,
        source=batch.source,
        labelled=labelled,
        quarantine_uri=quarantine_uri,
        store=store,
        registry=registry,
    )
    summary = IngestResult(
        dataset_id=record.id,
        name=record.name,
        rows_in=record.rows_in,
        rows_valid=record.rows_valid,
        rows_quarantined=record.rows_quarantined,
        quarantine_uri=record.quarantine_uri,
        snapshot_uri=record.snapshot_uri,
        created=created,
        ignored_columns=result.ignored_columns,
    )
    logger.info(
        "dataset %s (%s): %d rows in, %d valid, %d quarantined%s",
        record.id, "new" if created else "already registered",
        record.rows_in, record.rows_valid, record.rows_quarantined,
        f" -> {record.quarantine_uri}" if record.quarantine_uri else "",
    )
    create_markdown_artifact(
        key=artifact_key("dataset", spec.name),
        markdown=_summary_markdown(summary, batch.source),
        description=f"Ingestion of {spec.name}",
    )
    return summary


def _summary_markdown(summary: IngestResult, source: str) -> str:
    """The ingestion artifact. The source and the ignored columns' names come from
    outside (the file's header): they go in as text, never as markup."""
    lines = [
        f"# Dataset `{summary.dataset_id}` ({summary.name})",
        "",
        f"Source: {md_code(source)}",
        "",
        "| rows in | valid | quarantined |",
        "|---:|---:|---:|",
        f"| {summary.rows_in} | {summary.rows_valid} | {summary.rows_quarantined} |",
        "",
        f"Snapshot: `{summary.snapshot_uri}`",
    ]
    if summary.quarantine_uri:
        lines.append(f"Quarantine: `{summary.quarantine_uri}`")
    if summary.ignored_columns:
        lines.append(f"Ignored columns (not in spec): {', '.join(md_code(c) for c in summary.ignored_columns)}")
    return "\n".join(lines)
