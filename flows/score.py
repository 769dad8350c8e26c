"""Flow ``score``: resolve a model -> verify its form -> stream the input through
validation and the form -> append to the model's predictions table in one commit
(replacing an earlier run of the same input) -> record the run -> optional Parquet
export for consumers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel

from driftloop.errors import DriftloopError
from driftloop.flows.config import dask_block_address, run_settings
from driftloop.forms import Device, Engine
from driftloop.inputs import input_key
from driftloop.legacy_outputs import import_legacy_outputs
from driftloop.naming import artifact_key
from driftloop.redact import mask_uri
from driftloop.registry import ModelVersionRecord, RegistryStore, ScoringRunRecord, open_registry
from driftloop.registry.store import parse_model_ref
from driftloop.scoring_runs import reconcile_scoring_runs, record_scoring_run, run_properties
from driftloop.storage import ArtifactStore
from driftloop.tables import Tables, history, open_tables
from driftloop.tasks.rollout import model_state_task, shadow_scoring_task
from driftloop.tasks.score import DEFAULT_BATCH_SIZE, ScoreResult, TableSink
from driftloop.tasks.score_tasks import export_task, fetch_form_task, score_table_task


class ScoreSummary(BaseModel):
    run_id: str
    rows_in: int
    rows_scored: int
    rows_quarantined: int
    table: str  # the predictions table the rows went to, e.g. predictions.car_loan
    snapshot_id: int  # the table's snapshot this run committed: pl.scan_iceberg(table, snapshot_id=...)
    input_key: str  # a re-run with the same key replaces this run's rows
    output_uri: str | None  # the Parquet export written for consumers (only when asked for)
    quarantine_uri: str | None
    model: str
    version: int
    form: str  # the verified scoring form used: onnx, native, tensor or compiled
    form_reason: str
    shadow_version: int | None = None  # the model that also scored in shadow (candidate, or replaced champion)
    shadow_rows: int = 0  # rows it scored (role shadow, same run)


@task(name="resolve-model", cache_policy=NONE)
def resolve_model_task(registry: RegistryStore, ref: str) -> ModelVersionRecord:
    return registry.resolve(ref)


@task(name="record-scoring-run", cache_policy=NONE)
def record_run_task(registry: RegistryStore, record: ModelVersionRecord, input_uri: str, result: ScoreResult,
                    started_at: datetime) -> ScoringRunRecord:
    """The run's record, written after its commit. If the registry fails here the rows
    are committed all the same: the snapshot carries the run's record, and the next
    score or monitor run of the model records it from there (reconcile_scoring_runs)."""
    run = ScoringRunRecord(
        id=result.run_id, model_name=record.model_name, model_version=record.version,
        onnx_sha256=record.onnx_sha256, input_uri=mask_uri(input_uri), output_uri=result.table or "",
        quarantine_uri=result.quarantine_uri, rows_in=result.rows_in, rows_scored=result.rows_scored,
        rows_quarantined=result.rows_quarantined, form=result.form, started_at=started_at,
        finished_at=datetime.now(UTC), snapshot_id=result.snapshot_id, input_key=result.input_key,
    )
    try:
        record_scoring_run(registry, run)
    except DriftloopError as exc:
        if result.snapshot_id is None:
            raise
        raise DriftloopError(
            f"scoring run {run.id} committed its rows to {result.table} (snapshot {result.snapshot_id}) but could not "
            f"be recorded: {exc}; nothing is lost: the next driftloop score or monitor of {record.model_name} records "
            "it from that snapshot"
        ) from None
    return run


@task(name="reconcile-scoring-runs", cache_policy=NONE)
def reconcile_task(registry: RegistryStore, tables: Tables, model: str) -> list[str]:
    return [run.id for run in reconcile_scoring_runs(registry, tables, model)]


@task(name="input-key", cache_policy=NONE)
def input_key_task(input_uri: str) -> str:
    return input_key(input_uri)


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
    ``name@alias`` or ``name:version``) into the model's predictions table
    (``predictions.<model>``, Iceberg, catalog in the registry database): one commit per
    run; scoring the same input again (same files, same content) replaces that input's
    rows, another input appends. ``output_uri``, when given, also gets a plain Parquet
    export of this run's rows for consumers: a ``.parquet`` file, or a directory or
    prefix that gets ``<run id>.parquet``.

    ``engine``: which verified form of the version scores (``auto``: the fastest that runs
    here, measured at registration; or ``onnx``, ``native``, ``tensor``, ``compiled``). ``device="cuda"``
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
    store = ArtifactStore(settings.artifact_root_uri())
    tables = open_tables(registry.engine, settings.artifact_root_uri())
    started_at = datetime.now(UTC)
    run_id = str(uuid.uuid4())

    record = resolve_model_task(registry, model)
    scorer, why = fetch_form_task(record, engine, device, threads)
    logger.info("scoring form: %s", why)
    key = input_key_task(input_uri)
    spec = scorer.descriptor.spec()
    # Rows scored before the tables existed are imported once, before anything is replaced.
    import_legacy_outputs(registry, tables, settings.artifact_root_uri(), model=record.model_name, spec=spec)
    # A run that committed but was never recorded (the registry failed after its commit).
    reconcile_task(registry, tables, record.model_name)
    address = dask_address or settings.dask_address
    shadow = None
    if parse_model_ref(model)[1] == "champion":
        # A rollout in progress: its second model scores the shadow fraction of these rows.
        state = model_state_task(registry, record.model_name, {record.version: spec})
        if state.active and (workers or address):
            logger.warning("rollout of %s: partitioned scoring does not score in shadow; v%s gets no rows from this "
                           "run", record.model_name, state.shadow)
        elif state.active:
            shadow, shadow_why = shadow_scoring_task(registry, state, record, spec, engine, device, threads)
            logger.info("rollout %s: %s", state.phase, shadow_why)
    if workers or address:
        from driftloop.flows.score_partitioned import dask_runner, score_partitioned

        runner = dask_runner(workers, address)
        result = score_partitioned.with_options(task_runner=runner)(
            record, input_uri, run_id, key, engine, device, threads or 1, batch_size, workers or 2, registry_block,
            started_at)
    else:
        sink = TableSink(tables, store, spec, model_name=record.model_name, run_id=run_id, input_key=key,
                         form=scorer.kind, properties=run_properties(record, input_uri, started_at))
        result = score_table_task(scorer, input_uri, sink, record.version, batch_size, shadow)
    scorer.close()  # its helper threads, if any
    if shadow is not None:
        shadow.scorer.close()
    run = record_run_task(registry, record, input_uri, result, started_at)
    export_uri = export_task(registry, tables, run, output_uri) if output_uri else None

    logger.info(
        "scored %d of %d rows with %s (%d quarantined) -> %s snapshot %s",
        result.rows_scored, result.rows_in, record.ref, result.rows_quarantined, result.table, result.snapshot_id,
    )
    table = tables.predictions(record.model_name)
    snapshots = history(table) if table is not None else []
    create_markdown_artifact(
        key=artifact_key("scoring", record.model_name),
        markdown=(
            f"# Scoring with {record.ref}\n\n| rows in | scored | quarantined | batches |\n|---:|---:|---:|---:|\n"
            f"| {result.rows_in} | {result.rows_scored} | {result.rows_quarantined} | {result.batches} |\n\n"
            f"Form: {why}\n\n"
            + (f"Shadow: v{shadow.version} scored {result.shadow_rows:,} of these rows (role `shadow`)\n\n"
               if shadow is not None else "")
            + f"Input: `{mask_uri(input_uri)}` (key `{key}`)\n\n"
            f"Table: `{result.table}`, snapshot `{result.snapshot_id}` (scoring run `{run.id}`)"
            + (f"\n\nExport: `{mask_uri(export_uri)}`" if export_uri else "")
            + (f"\n\nQuarantine: `{result.quarantine_uri}`" if result.quarantine_uri else "")
            + "\n\n## The table's newest snapshots\n\n| snapshot | committed (UTC) | operation | rows added | rows deleted "
            "| total rows | by |\n|---|---|---|---:|---:|---:|---|\n"
            + "".join(f"| `{s['snapshot_id']}` | {s['committed_at']} | {s['operation']} | {s['added_rows']} | "
                      f"{s['deleted_rows']} | {s['total_rows']} | `{s['by']}` |\n" for s in snapshots)
        ),
        description=f"Scoring run {run.id}",
    )
    return ScoreSummary(
        run_id=run.id, rows_in=result.rows_in, rows_scored=result.rows_scored,
        rows_quarantined=result.rows_quarantined, table=result.table or "", snapshot_id=result.snapshot_id or 0,
        input_key=key, output_uri=export_uri, quarantine_uri=result.quarantine_uri, model=record.model_name,
        version=record.version, form=result.form or scorer.kind, form_reason=why,
        shadow_version=shadow.version if shadow is not None else None, shadow_rows=result.shadow_rows,
    )
