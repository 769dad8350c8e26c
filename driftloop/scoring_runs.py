"""Scoring runs recorded in an order a crash cannot make wrong.

A scoring run's rows reach the model's predictions table in one commit, and the
snapshot that commit makes carries the run's whole record in its summary properties
(``driftloop.run-id``, version, input, row accounting, form, start time). The registry's
scoring-run record is written after the commit: if that write fails (the database
went away, the process was killed), the rows are committed but unrecorded.
:func:`reconcile_scoring_runs` then records the run from its snapshot; the score and
monitor flows call it before they read or write the table, so no committed run stays
unaccounted and none is recorded that did not commit."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import IntegrityError

from driftloop.redact import mask_uri
from driftloop.registry import ModelNotFound, RegistryStore, ScoringRunRecord
from driftloop.tables import Tables

logger = logging.getLogger(__name__)

PREFIX = "driftloop."


def run_properties(record: Any, input_uri: str, started_at: datetime) -> dict[str, str]:
    """What a scoring run's commit carries besides its accounting (which the scorer
    adds): enough to record the run from the snapshot alone. ``record`` is the
    ``ModelVersionRecord`` that scores."""
    return {"input-uri": mask_uri(input_uri), "started-at": started_at.astimezone(UTC).isoformat(),
            "onnx-sha256": record.onnx_sha256}


def record_scoring_run(registry: RegistryStore, run: ScoringRunRecord) -> bool:
    """Record ``run`` unless a reconciliation recorded it first (from the same snapshot,
    so with the same accounting). Returns whether this call recorded it."""
    if registry.get_scoring_run(run.id) is not None:
        return False
    try:
        registry.add_scoring_run(run)
    except IntegrityError:  # recorded by a reconciliation between the look and the insert
        return False
    return True


def _run_from_snapshot(registry: RegistryStore, model: str, snapshot: Any) -> ScoringRunRecord | None:
    props = snapshot.summary.additional_properties if snapshot.summary else {}
    if PREFIX + "rows-in" not in props or PREFIX + "run-id" not in props:
        return None  # not a scoring run's commit (a label registration, a legacy import)
    version = int(props[PREFIX + "model-version"])
    sha = props.get(PREFIX + "onnx-sha256")
    if sha is None:  # committed by a release that did not carry it
        try:
            sha = registry.resolve(f"{model}:{version}").onnx_sha256
        except ModelNotFound:
            sha = ""
    finished = datetime.fromtimestamp(snapshot.timestamp_ms / 1000, UTC)
    started = props.get(PREFIX + "started-at")
    table_name = f"predictions.{model}"
    return ScoringRunRecord(
        id=props[PREFIX + "run-id"], model_name=model, model_version=version, onnx_sha256=sha,
        input_uri=props.get(PREFIX + "input-uri", ""), output_uri=table_name,
        quarantine_uri=props.get(PREFIX + "quarantine-uri"), rows_in=int(props[PREFIX + "rows-in"]),
        rows_scored=int(props[PREFIX + "rows-scored"]), rows_quarantined=int(props[PREFIX + "rows-quarantined"]),
        form=props.get(PREFIX + "form"), started_at=datetime.fromisoformat(started) if started else finished,
        finished_at=finished, snapshot_id=snapshot.snapshot_id, input_key=props.get(PREFIX + "input-key"),
    )


def reconcile_scoring_runs(registry: RegistryStore, tables: Tables, model: str) -> list[ScoringRunRecord]:
    """Record every scoring run that committed to ``model``'s predictions table but has
    no record (the registry failed, or the process died, after the commit), from the
    last snapshot it committed. Returns the runs recorded now."""
    table = tables.predictions(model)
    if table is None:
        return []
    recorded = {run.id for run in registry.list_scoring_runs(model)}
    last: dict[str, Any] = {}  # run id -> its last snapshot (a replace commits a delete, then an append)
    for snapshot in table.refresh().table.snapshots():
        props = snapshot.summary.additional_properties if snapshot.summary else {}
        run_id = props.get(PREFIX + "run-id")
        if run_id and run_id not in recorded:
            last[run_id] = snapshot
    found = []
    for snapshot in last.values():
        run = _run_from_snapshot(registry, model, snapshot)
        if run is not None and record_scoring_run(registry, run):
            logger.warning("scoring run %s committed snapshot %s of predictions.%s but was not recorded (the "
                           "registry failed or the process ended after the commit): recorded now from that snapshot",
                           run.id, run.snapshot_id, model)
            found.append(run)
    return found
