"""Flow ``score``: resolve a model -> verify its artifact -> stream the input through
validation and ONNX Runtime -> commit predictions atomically -> record the run."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel

from driftloop.redact import mask_uri
from driftloop.registry import ModelVersionRecord, RegistryStore, ScoringRunRecord, open_registry
from driftloop.storage import ArtifactStore
from flows.config import run_settings
from tasks.score import DEFAULT_BATCH_SIZE, ScoreResult, fetch_model_task, score_task


class ScoreSummary(BaseModel):
    run_id: str
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    output_uri: str
    quarantine_uri: str | None
    model: str
    version: int


@task(name="resolve-model", cache_policy=NONE)
def resolve_model_task(registry: RegistryStore, ref: str) -> ModelVersionRecord:
    return registry.resolve(ref)


@task(name="record-scoring-run", cache_policy=NONE)
def record_run_task(registry: RegistryStore, record: ModelVersionRecord, input_uri: str, result: ScoreResult, started_at: datetime) -> ScoringRunRecord:
    run = ScoringRunRecord(
        id=str(uuid.uuid4()), model_name=record.model_name, model_version=record.version,
        onnx_sha256=record.onnx_sha256, input_uri=mask_uri(input_uri), output_uri=mask_uri(result.output_uri),
        quarantine_uri=result.quarantine_uri, rows_in=result.rows_in, rows_scored=result.rows_scored,
        rows_quarantined=result.rows_quarantined, started_at=started_at, finished_at=datetime.now(UTC),
    )
    registry.add_scoring_run(run)
    return run


def default_output_uri(record: ModelVersionRecord, input_uri: str, artifact_root: str) -> str:
    stem = input_uri.rstrip("/").rsplit("/", 1)[-1].split(":")[-1].split(".")[0] or "input"
    return ArtifactStore(artifact_root).uri(f"predictions/{record.model_name}/{stem}")


@flow(name="score")
def score(
    input_uri: str,
    output_uri: str | None = None,
    model: str = "car_loan@champion",
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    registry_block: str | None = None,
) -> ScoreSummary:
    """Score ``input_uri`` (Parquet or CSV, path or URI) with ``model`` (``name``,
    ``name@alias`` or ``name:version``) into the scoring output ``output_uri``, a directory
    or object-store prefix (default: ``<artifact root>/predictions/<model>/<input name>``)."""
    logger = get_run_logger()
    settings = run_settings(registry_block)
    registry = open_registry(settings.registry_database_url())
    started_at = datetime.now(UTC)

    record = resolve_model_task(registry, model)
    loaded = fetch_model_task(record.onnx_uri, record.onnx_sha256, threads)
    output_uri = output_uri or default_output_uri(record, input_uri, settings.artifact_root_uri())
    result = score_task(loaded, input_uri, output_uri, record.model_name, record.version, batch_size)
    run = record_run_task(registry, record, input_uri, result, started_at)

    logger.info(
        "scored %d of %d rows with %s (%d quarantined) -> %s",
        result.rows_scored, result.rows_in, record.ref, result.rows_quarantined, mask_uri(result.output_uri),
    )
    create_markdown_artifact(
        key=f"scoring-{record.model_name}".replace("_", "-"),
        markdown=(
            f"# Scoring with {record.ref}\n\n| rows in | scored | quarantined | batches |\n|---:|---:|---:|---:|\n"
            f"| {result.rows_in} | {result.rows_scored} | {result.rows_quarantined} | {result.batches} |\n\n"
            f"Input: `{mask_uri(input_uri)}`\n\nOutput: `{mask_uri(result.output_uri)}`"
            + (f"\n\nQuarantine: `{result.quarantine_uri}`" if result.quarantine_uri else "")
        ),
        description=f"Scoring run {run.id}",
    )
    return ScoreSummary(
        run_id=run.id, rows_in=result.rows_in, rows_scored=result.rows_scored,
        rows_quarantined=result.rows_quarantined, output_uri=result.output_uri,
        quarantine_uri=result.quarantine_uri, model=record.model_name, version=record.version,
    )
