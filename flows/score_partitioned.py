"""Flow ``score-partitioned``: one input scored as coarse partitions on a Dask cluster
(Prefect's DaskTaskRunner), committed to the predictions table as one run. The
``score`` flow runs it as a subflow when given ``workers`` (a temporary local cluster)
or a Dask scheduler address.

Workers write their parts to the run's work area (``<artifact root>/scoring/<model>/<run
id>``, a :mod:`driftloop.outputs` run prefix, so a re-run partition replaces its own
parts); the flow settles ids repeated across partitions, then appends the final parts to
the table in one commit and removes them; the quarantine parts stay there, recorded."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NONE

from driftloop.errors import DriftloopError, SourceError
from driftloop.flows.config import run_settings
from driftloop.forms import Device, Engine
from driftloop.outputs import QUARANTINE, RUNS, RunWriter, ScoringOutput
from driftloop.scoring_runs import run_properties
from driftloop.storage import ArtifactStore
from driftloop.tables import open_tables
from driftloop.tasks.partitions import (
    Partition,
    PartitionResult,
    plan_partitions,
    score_partition,
    settle_partitions,
)
from driftloop.tasks.score import ScoreResult, TableSink, aborted_on_failure, load_scoring_form


@task(name="plan-partitions", cache_policy=NONE)
def plan_task(input_uri: str, workers: int) -> list[Partition]:
    return plan_partitions(input_uri, workers=workers)


# Retried once: a partition is idempotent (it rewrites its own part names), so running it
# again after a lost worker or a transient store error never duplicates rows.
@task(name="score-partition", cache_policy=NONE, retries=1, task_run_name="score-partition-{partition.key}")
def score_partition_task(record: Any, partition: Partition, output_uri: str, run_id: str, engine: Engine,
                         device: Device, threads: int | None, batch_size: int, scored_at: datetime) -> PartitionResult:
    return score_partition(record, partition, output_uri, run_id, engine=engine, device=device, threads=threads,
                           batch_size=batch_size, scored_at=scored_at)


def dask_runner(workers: int | None, address: str | None) -> Any:
    """Prefect's DaskTaskRunner on an existing scheduler, or on a temporary local cluster
    of ``workers`` single-threaded processes."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    if not workers or workers < 1:
        raise DriftloopError(f"workers must be at least 1, got {workers}")
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None, "env": SINGLE_THREADED_WORKER_ENV})


# A worker process is one core's worth of work: polars' and Arrow's own pools default to
# every core, so N workers on N cores would run N x N threads.
SINGLE_THREADED_WORKER_ENV = {"POLARS_MAX_THREADS": "1", "OMP_NUM_THREADS": "1"}


@flow(name="score-partitioned")
def score_partitioned(record: Any, input_uri: str, run_id: str, input_key: str, engine: Engine = "auto",
                      device: Device = "cpu", threads: int | None = 1, batch_size: int = 100_000, workers: int = 2,
                      registry_block: str | None = None, started_at: datetime | None = None) -> ScoreResult:
    logger = get_run_logger()
    settings = run_settings(registry_block)
    from driftloop.registry import open_registry

    store = ArtifactStore(settings.artifact_root_uri())
    tables = open_tables(open_registry(settings.registry_database_url()).engine, settings.artifact_root_uri())
    # Refused here (a missing or damaged form, no CUDA), not on every worker.
    spec = load_scoring_form(record, engine=engine, device=device, threads=threads)[0].descriptor.spec()
    partitions = plan_task(input_uri, workers)
    output_uri = store.uri(f"scoring/{record.model_name}/{run_id}")
    output = ScoringOutput(output_uri)
    output.claim()
    run = output.start_run(run_id)
    scored_at = datetime.now(UTC)
    logger.info("scoring %s as %d partitions into run %s", input_uri, len(partitions), run.run_id)
    with aborted_on_failure(run, output_uri):
        started = time.perf_counter()
        futures = score_partition_task.map(
            unmapped(record), partitions, unmapped(output_uri), unmapped(run.run_id), unmapped(engine),
            unmapped(device), unmapped(threads), unmapped(batch_size), unmapped(scored_at),
        )
        results = [future.result() for future in futures]
        scored_s = time.perf_counter() - started
        settled = settle_partitions(output, run, spec, partitions, results, batch_size=batch_size)
        logger.info("partitions scored in %.1f s, settled in %.1f s", scored_s, time.perf_counter() - started - scored_s)
        if settled.rows_in == 0:
            raise SourceError(f"input {input_uri} has no data rows; nothing to score")
        # The form the workers scored with (each loads its own), not the flow process's pick.
        forms = sorted({r.form for r in results})
        quarantine_uri = output.uri_of(f"{RUNS}/{run.run_id}/{QUARANTINE}") if settled.rows_quarantined else None
        sink = TableSink(tables, store, spec, model_name=record.model_name, run_id=run_id, input_key=input_key,
                         form=forms[0] if len(forms) == 1 else "+".join(forms),
                         properties=run_properties(record, input_uri, started_at or scored_at))
        table, snapshot = _commit_parts(output, run, sink, {
            "run-id": run_id, "model-version": record.version, "input-key": input_key, "rows-in": settled.rows_in,
            "rows-scored": settled.rows_scored, "rows-quarantined": settled.rows_quarantined,
            **({"quarantine-uri": quarantine_uri} if quarantine_uri else {})})
    if settled.repeats_moved:
        logger.info("%d rows repeated an id of an earlier partition: quarantined", settled.repeats_moved)
    return ScoreResult(
        rows_in=settled.rows_in, rows_scored=settled.rows_scored, rows_quarantined=settled.rows_quarantined,
        output_uri=table or "",
        quarantine_uri=quarantine_uri,
        batches=len(partitions), run_id=run_id, snapshot_id=snapshot, input_key=input_key, table=table,
        form=sink.form,
    )


def _commit_parts(output: ScoringOutput, run: RunWriter, sink: TableSink,
                  properties: dict[str, Any]) -> tuple[str | None, int | None]:
    """The settled parts into the table, one part in memory at a time, in one commit;
    then the parts are removed (the table holds the rows; the quarantine stays)."""
    try:
        for n, part in enumerate(run.parts()):
            sink.write_part(output.read_part(part), partition="settled", index=n)
        committed = sink.commit(properties)
    except BaseException:
        sink.abort()
        raise
    for part in run.parts():
        output.remove_part(part)
    return committed

