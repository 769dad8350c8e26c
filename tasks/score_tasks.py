"""The score flow's Prefect tasks: fetch the verified form, score into the predictions
table with a progress artifact, export a run's rows.

Kept apart from :mod:`driftloop.tasks.score`, which holds the scoring itself and imports
no Prefect, so the edge agent (:mod:`driftloop.tasks.edge_agent`) starts without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from driftloop.errors import DriftloopError
from driftloop.forms import Device, Engine, FormScorer
from driftloop.tables import Tables
from driftloop.tasks.score import (
    ScoreResult,
    ShadowScoring,
    TableSink,
    export_run,
    load_scoring_form,
    score_to_table,
)


@task(name="fetch-scoring-form", cache_policy=NONE)
def fetch_form_task(record: Any, engine: Engine, device: Device, threads: int | None) -> tuple[FormScorer, str]:
    return load_scoring_form(record, engine=engine, device=device, threads=threads)


def _progress(input_uri: str) -> tuple[Callable[[int, int | None], None], Callable[[], None]]:
    """A progress artifact in the UI and the CLI's progress line, fed per batch."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from driftloop import progress
    from driftloop.redact import mask_uri

    artifact_id = create_progress_artifact(0.0, description=f"Scoring {mask_uri(input_uri)}")

    def on_batch(done: int, total: int | None) -> None:
        if total:
            update_progress_artifact(artifact_id, progress=min(100.0, 100.0 * done / total))
        progress.notify("score", done, total)

    return on_batch, lambda: update_progress_artifact(artifact_id, progress=100.0)


@task(name="export-predictions", cache_policy=NONE)
def export_task(registry: Any, tables: Tables, run: Any, output_uri: str) -> str:
    """The run's rows as a Parquet file at ``output_uri``, recorded on the run."""
    table = tables.predictions(run.model_name)
    if table is None or run.snapshot_id is None:
        raise DriftloopError(f"scoring run {run.id} committed nothing to export")
    uri = export_run(table, run.snapshot_id, run.id, output_uri)
    registry.set_scoring_export(run.id, uri)
    return uri


@task(name="score-into-table", cache_policy=NONE)
def score_table_task(scorer: FormScorer, input_uri: str, sink: TableSink, model_version: int,
                     batch_size: int, shadow: ShadowScoring | None = None) -> ScoreResult:
    """Score into the model's predictions table (one commit); with ``shadow``, a second
    model scores the shadow fraction in the same pass."""
    on_batch, finished = _progress(input_uri)
    result = score_to_table(scorer.descriptor, input_uri, sink, model_version=model_version, batch_size=batch_size,
                            on_batch=on_batch, predict=scorer.predict, shadow=shadow)
    result.form = scorer.kind
    finished()
    return result
