"""Flow ``score``: resolve a model -> verify its artifact -> stream the input through
validation and ONNX Runtime -> commit predictions atomically -> record the run."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel

from driftloop.forms import Device, Engine
from driftloop.redact import mask_uri
from driftloop.registry import ModelVersionRecord, RegistryStore, ScoringRunRecord, open_registry
from driftloop.storage import ArtifactStore
from flows.config import dask_block_address, run_settings
from tasks.score import DEFAULT_BATCH_SIZE, ScoreResult, fetch_form_task, score_task


class ScoreSummary(BaseModel):
    run_id: str
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    output_uri: str
    quarantine_uri: str | None
    model: str
    version: int
    form: str  # the verified scoring form used: onnx, native or tensor
    form_reason: str


@task(name="resolve-model", cache_policy=NONE)
def resolve_model_task(registry: RegistryStore, ref: str) -> ModelVersionRecord:
    return registry.resolve(ref)


@task(name="record-scoring-run", cache_policy=NONE)
def record_run_task(registry: RegistryStore, record: ModelVersionRecord, input_uri: str, result: ScoreResult, started_at: datetime,
                    form: str) -> ScoringRunRecord:
    run = ScoringRunRecord(
        id=str(uuid.uuid4()), model_name=record.model_name, model_version=record.version,
        onnx_sha256=record.onnx_sha256, input_uri=mask_uri(input_uri), output_uri=mask_uri(result.output_uri),
        quarantine_uri=result.quarantine_uri, rows_in=result.rows_in, rows_scored=result.rows_scored,
        rows_quarantined=result.rows_quarantined, form=form, started_at=started_at, finished_at=datetime.now(UTC),
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
    engine: Engine = "auto",
    device: Device = "cpu",
    workers: int | None = None,
    dask_address: str | None = None,
    dask_block: str | None = None,
) -> ScoreSummary:
    """Score ``input_uri`` (Parquet or CSV, path or URI) with ``model`` (``name``,
    ``name@alias`` or ``name:version``) into the scoring output ``output_uri``, a directory
    or object-store prefix (default: ``<artifact root>/predictions/<model>/<input name>``).

    ``engine``: which verified form of the version scores (``auto``: the fastest that runs
    here, measured at registration; or ``onnx``, ``native``, ``tensor``). ``device="cuda"``
    scores with the tensor-op form on ONNX Runtime's CUDA provider.

    ``workers`` (a temporary local Dask cluster of that many processes) or
    ``dask_address`` (an existing scheduler; default ``DRIFTLOOP_DASK_ADDRESS``) score the
    input as partitions in parallel (a directory or glob of files, or one Parquet file
    split by row groups): the same result as one process, committed as one run.

    ``dask_block``: the name of a saved ``driftloop-dask`` block (a Dask cluster picked in
    the UI), loaded when the run starts; its address is used unless ``dask_address`` is
    given: an explicit ``dask_address`` wins over the block, and the block over
    ``DRIFTLOOP_DASK_ADDRESS``."""
    logger = get_run_logger()
    settings = run_settings(registry_block)
    if dask_block and not dask_address:
        dask_address = dask_block_address(dask_block)
        logger.info("Dask scheduler from the driftloop-dask block %r: %s", dask_block, dask_address)
    elif dask_block:
        logger.info("dask_address %s given: the driftloop-dask block %r is not used", mask_uri(dask_address), dask_block)
    registry = open_registry(settings.registry_database_url())
    started_at = datetime.now(UTC)

    record = resolve_model_task(registry, model)
    scorer, why = fetch_form_task(record, engine, device, threads)
    logger.info("scoring form: %s", why)
    output_uri = output_uri or default_output_uri(record, input_uri, settings.artifact_root_uri())
    address = dask_address or settings.dask_address
    if workers or address:
        from flows.score_partitioned import dask_runner, score_partitioned

        runner = dask_runner(workers, address)
        result = score_partitioned.with_options(task_runner=runner)(
            record, input_uri, output_uri, engine, device, threads or 1, batch_size, workers or 2)
    else:
        result = score_task(scorer, input_uri, output_uri, record.model_name, record.version, batch_size)
    run = record_run_task(registry, record, input_uri, result, started_at, scorer.kind)

    logger.info(
        "scored %d of %d rows with %s (%d quarantined) -> %s",
        result.rows_scored, result.rows_in, record.ref, result.rows_quarantined, mask_uri(result.output_uri),
    )
    create_markdown_artifact(
        key=f"scoring-{record.model_name}".replace("_", "-"),
        markdown=(
            f"# Scoring with {record.ref}\n\n| rows in | scored | quarantined | batches |\n|---:|---:|---:|---:|\n"
            f"| {result.rows_in} | {result.rows_scored} | {result.rows_quarantined} | {result.batches} |\n\n"
            f"Form: {why}\n\nInput: `{mask_uri(input_uri)}`\n\nOutput: `{mask_uri(result.output_uri)}`"
            + (f"\n\nQuarantine: `{result.quarantine_uri}`" if result.quarantine_uri else "")
        ),
        description=f"Scoring run {run.id}",
    )
    return ScoreSummary(
        run_id=run.id, rows_in=result.rows_in, rows_scored=result.rows_scored,
        rows_quarantined=result.rows_quarantined, output_uri=result.output_uri,
        quarantine_uri=result.quarantine_uri, model=record.model_name, version=record.version,
        form=scorer.kind, form_reason=why,
    )
