"""Nothing already scored is lost: the scoring outputs and label datasets recorded before
the tables (:mod:`driftloop.tables`) imported into them, once.

- **Scoring runs**: every run recorded before the tables (no ``snapshot_id`` and no
  ``input_key``) whose ``output_uri`` is a scoring output (:mod:`driftloop.outputs`:
  manifests, or the pre-manifest ``_SUCCESS`` layout). An output holds the rows of its
  current run only (each run replaced the one before), so its current rows are appended
  to ``predictions.<model>`` tagged with that run: the run its newest manifest names
  (else the output's latest run record), role ``served``, input key ``<masked input
  URI>#legacy``, the run's scoring form; then that run's record gets the snapshot.
  The output's older runs (their rows were replaced before the upgrade) are marked
  ``<masked input URI>#legacy-superseded-by:<run id>`` in ``input_key``, with no snapshot.
  The commit replaces whatever rows the same run id has in the table: an import cut
  short between the commit and the record, run again, leaves one copy.
- **Labels**: every ``<model>.labels`` dataset, oldest first, appended to
  ``labels.<model>`` in one commit with ``registered_at`` = the dataset's ``created_at``
  and ``source`` = ``registration_id`` = the dataset id; a registration id already in
  the table is skipped, and so is a dataset that a registration through the table
  already holds (same source and row count, registered within the hour after the
  dataset was made: ``driftloop labels`` after the upgrade makes both). When every
  dataset is in, the table is marked (property ``driftloop.legacy-labels-imported``),
  and later calls read only that mark.

Nothing is deleted: the old outputs stay where they are (their quarantines too). An
output or dataset that cannot be read is reported and left for the next run. Running
the import again imports nothing; with nothing left it costs one registry query per
model and one table load (and nothing at all after the first call in a process).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, timedelta
from typing import Any

import polars as pl
from pydantic import BaseModel, Field

from driftloop.errors import DriftloopError
from driftloop.redact import mask_uri
from driftloop.registry import RegistryStore, ScoringRunRecord
from driftloop.tables import (
    FORM,
    INPUT_KEY,
    LABEL_TIMESTAMP,
    MODEL_NAME,
    MODEL_VERSION,
    REGISTERED_AT,
    REGISTRATION,
    ROLE,
    SCORED_AT,
    SCORING_RUN,
    SERVED,
    SOURCE,
    Tables,
)

logger = logging.getLogger(__name__)

LEGACY = "#legacy"  # input key suffix of an imported run
SUPERSEDED = "#legacy-superseded-by:"  # input key note of a run whose rows a later run of its output replaced
LABELS_DONE = "driftloop.legacy-labels-imported"  # labels table property: every .labels dataset is in
IMPORT_PROPERTY = "driftloop.legacy-import"  # snapshot summary: the run or "labels" an import commit holds
SAME_REGISTRATION = timedelta(hours=1)  # a dataset and a table registration this close are one registration

_done: set[tuple[str, str]] = set()  # (registry URL, model) fully imported in this process
_done_lock = threading.Lock()


class ImportedRun(BaseModel):
    run_id: str
    output_uri: str = Field(description="Masked.")
    rows: int
    table: str | None
    snapshot_id: int | None
    superseded: list[str] = Field(default_factory=list, description="Older runs of the same output, marked only.")


class ImportedLabels(BaseModel):
    dataset_id: str
    rows: int


class ImportReport(BaseModel):
    scoring_runs: list[ImportedRun] = Field(default_factory=list)
    labels: list[ImportedLabels] = Field(default_factory=list)
    labels_snapshots: dict[str, int] = Field(default_factory=dict, description="labels table -> snapshot committed")
    labels_already_in: list[str] = Field(default_factory=list,
                                         description="Datasets a table registration already holds: skipped.")
    problems: list[str] = Field(default_factory=list, description="What could not be read: left, for the next run.")

    @property
    def imported(self) -> bool:
        return bool(self.scoring_runs or self.labels)

    def summary(self, *, problems: bool = True) -> str:
        rows = sum(r.rows for r in self.scoring_runs)
        labels = sum(x.rows for x in self.labels)
        text = (f"imported {len(self.scoring_runs)} scoring output(s) ({rows:,} rows) and {len(self.labels)} label "
                f"dataset(s) ({labels:,} rows)")
        if not self.problems:
            return text
        return text + f"; {len(self.problems)} left" + (": " + "; ".join(self.problems) if problems else "")


def import_legacy_outputs(registry: RegistryStore, tables: Tables, artifact_root: str | None = None,
                          model: str | None = None, *, spec: Any | None = None) -> ImportReport:
    """Import what the registry recorded before the tables (every model, or ``model``)
    into the predictions and labels tables, once. ``spec``: ``model``'s dataset spec
    when the caller has it (else it is read from the model's registered artifact, only
    when a table must be created or labels imported). ``artifact_root`` resolves an
    output recorded as a relative path."""
    report = ImportReport()
    if model is not None:
        with _done_lock:
            if (_registry_key(registry), model) in _done:
                return report
    pending = _pending_runs(registry, model)
    by_model: dict[str, list[ScoringRunRecord]] = defaultdict(list)
    for run in pending:
        by_model[run.model_name].append(run)
    models = {model} if model is not None else set(by_model) | _labelled_models(registry)
    specs = _Specs(registry, {model: spec} if model is not None and spec is not None else {})
    for name in sorted(models):
        problems = len(report.problems)
        _import_runs(tables, by_model.get(name, []), registry, specs, artifact_root, report)
        _import_labels(tables, name, registry, specs, report)
        if len(report.problems) == problems:
            with _done_lock:
                _done.add((_registry_key(registry), name))
    if report.imported or report.problems:
        logger.info("legacy import: %s", report.summary())
    return report


def _registry_key(registry: RegistryStore) -> str:
    """The registry's URL (an engine's id can be reused once it is gone)."""
    return registry.engine.url.render_as_string(hide_password=True)


# --- scoring runs ----------------------------------------------------------------------


def _pending_runs(registry: RegistryStore, model: str | None) -> list[ScoringRunRecord]:
    """Runs recorded before the tables and not imported yet, oldest first."""
    from sqlalchemy import select

    from driftloop.registry.store import _scoring_run
    from driftloop.registry.tables import ScoringRunRow

    query = (select(ScoringRunRow).where(ScoringRunRow.snapshot_id.is_(None), ScoringRunRow.input_key.is_(None))
             .order_by(ScoringRunRow.finished_at, ScoringRunRow.id))
    if model is not None:
        query = query.where(ScoringRunRow.model_name == model)
    with registry.session() as s:
        return [_scoring_run(row) for row in s.scalars(query)]


def _labelled_models(registry: RegistryStore) -> set[str]:
    suffix = ".labels"
    return {d.name.removesuffix(suffix) for d in registry.list_datasets() if d.name.endswith(suffix)}


class _Specs:
    """Each model's dataset spec, read from its newest registered artifact when needed."""

    def __init__(self, registry: RegistryStore, known: dict[str, Any]) -> None:
        self.registry = registry
        self.known = dict(known)

    def __call__(self, model: str) -> Any:
        if model not in self.known:
            self.known[model] = _spec_from_registry(self.registry, model)
        return self.known[model]


def _spec_from_registry(registry: RegistryStore, model: str) -> Any:
    import fsspec

    from driftloop.onnx_model import load_model

    versions = sorted(registry.list_versions(model), key=lambda v: v.version, reverse=True)
    if not versions:
        raise DriftloopError(f"model '{model}' has no registered version to read its dataset spec from")
    record = versions[0]
    try:
        with fsspec.open(record.onnx_uri, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise DriftloopError(f"model artifact {record.onnx_uri} ({record.ref}) is missing: its dataset spec "
                             "cannot be read; restore it from backup") from None
    if hashlib.sha256(data).hexdigest() != record.onnx_sha256:
        raise DriftloopError(f"model artifact {record.onnx_uri} is not the one {record.ref} recorded (sha256 differs)")
    return load_model(data, threads=1).spec()


def _resolve(uri: str, artifact_root: str | None) -> str:
    if "://" in uri or uri.startswith("/") or not artifact_root:
        return uri
    return f"{artifact_root.rstrip('/')}/{uri}"


def _import_runs(tables: Tables, pending: list[ScoringRunRecord], registry: RegistryStore, specs: _Specs,
                 artifact_root: str | None, report: ImportReport) -> None:
    by_output: dict[str, list[ScoringRunRecord]] = defaultdict(list)
    for run in pending:
        by_output[run.output_uri].append(run)
    for output_uri, runs in by_output.items():
        shown = mask_uri(output_uri)
        try:
            imported = _import_output(tables, _resolve(output_uri, artifact_root), runs, specs)
        except Exception as exc:  # noqa: BLE001 - an unreadable output is reported and left, never a crash
            report.problems.append(f"scoring output {shown} (runs {', '.join(r.id for r in runs)}): {exc}")
            logger.warning("legacy import: scoring output %s left: %s", shown, exc)
            continue
        _mark_runs(registry, imported, runs)
        report.scoring_runs.append(imported)


def _parts(output_uri: str) -> tuple[str | None, Iterator[pl.DataFrame]]:
    """The output's current rows, a part at a time (bounded memory), each part checked
    against its manifest; and the run id its manifest names (None: pre-manifest layout)."""
    from driftloop.outputs import ScoringOutput

    output = ScoringOutput(output_uri)
    found = output.current()
    if found is None:
        frame = output.read()  # the pre-manifest layout, or an error that says what this is
        return None, iter([frame] if frame.width else [])
    _, manifest = found
    if not manifest.parts:
        return manifest.run_id, iter([])
    return manifest.run_id, (output.read_part(part) for part in manifest.parts)


def _import_output(tables: Tables, output_uri: str, runs: list[ScoringRunRecord], specs: _Specs) -> ImportedRun:
    from pyiceberg.expressions import EqualTo

    current, frames = _parts(output_uri)
    chosen = next((r for r in runs if r.id == current), None) or max(runs, key=lambda r: (r.finished_at, r.id))
    key = f"{mask_uri(chosen.input_uri)}{LEGACY}"
    table = tables.predictions(chosen.model_name)
    writer = None
    rows = 0
    try:
        for frame in frames:
            tagged = _tagged(frame, chosen, key)
            if writer is None:
                timestamp = specs(chosen.model_name).timestamp if table is None else None
                table = tables.predictions(chosen.model_name, sample=tagged, timestamp=timestamp)
                assert table is not None
                writer = table.writer()
            writer.write(tagged)
            rows += tagged.height
        snapshot = None
        if writer is not None:
            snapshot = writer.commit(replace=EqualTo(SCORING_RUN, chosen.id), properties={
                IMPORT_PROPERTY: chosen.id, "driftloop.run-id": chosen.id, "driftloop.legacy-output": mask_uri(output_uri),
                "driftloop.rows": str(rows)})
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return ImportedRun(run_id=chosen.id, output_uri=mask_uri(output_uri), rows=rows,
                       table=table.name if table is not None else None, snapshot_id=snapshot,
                       superseded=[r.id for r in runs if r.id != chosen.id])


def _tagged(frame: pl.DataFrame, run: ScoringRunRecord, key: str) -> pl.DataFrame:
    """The output's rows with what every predictions row carries; a column an old output
    lacks (model, version, scored_at) comes from its run record."""
    fill = []
    if MODEL_NAME not in frame.columns:
        fill.append(pl.lit(run.model_name, dtype=pl.String).alias(MODEL_NAME))
    if MODEL_VERSION not in frame.columns:
        fill.append(pl.lit(run.model_version, dtype=pl.Int64).alias(MODEL_VERSION))
    if SCORED_AT not in frame.columns:
        fill.append(pl.lit(run.finished_at.astimezone(UTC)).dt.cast_time_unit("us").alias(SCORED_AT))
    tags = {SCORING_RUN: run.id, INPUT_KEY: key, FORM: run.form or "onnx", ROLE: SERVED}
    return frame.with_columns(*fill, *(pl.lit(v, dtype=pl.String).alias(k) for k, v in tags.items()))


def _mark_runs(registry: RegistryStore, imported: ImportedRun, runs: list[ScoringRunRecord]) -> None:
    from driftloop.registry.tables import ScoringRunRow

    with registry.session() as s:
        for run in runs:
            row = s.get(ScoringRunRow, run.id)
            if row is None:
                continue
            if run.id == imported.run_id:
                row.snapshot_id = imported.snapshot_id
                row.input_key = f"{mask_uri(run.input_uri)}{LEGACY}"
            else:
                row.input_key = f"{mask_uri(run.input_uri)}{SUPERSEDED}{imported.run_id}"


# --- labels ------------------------------------------------------------------------------


def _import_labels(tables: Tables, model: str, registry: RegistryStore, specs: Callable[[str], Any],
                   report: ImportReport) -> None:
    from driftloop.feedback import labels_dataset_name

    table = tables.labels(model)
    if table is not None and table.table.properties.get(LABELS_DONE) == "true":
        return
    datasets = sorted(registry.list_datasets(name=labels_dataset_name(model)), key=lambda d: (d.created_at, d.id))
    if not datasets:
        return
    present = _registrations(table) if table is not None else pl.DataFrame()
    present_ids = set(present[REGISTRATION].to_list()) if present.height else set()
    frames: list[pl.DataFrame] = []
    failed = False
    for dataset in datasets:
        if dataset.id in present_ids:
            continue
        if _registered_through_table(dataset, present):
            report.labels_already_in.append(dataset.id)
            continue
        try:
            rows = _label_rows(dataset, specs(model))
        except Exception as exc:  # noqa: BLE001 - reported and left for the next run
            failed = True
            report.problems.append(f"labels dataset {dataset.id} ({model}): {exc}")
            logger.warning("legacy import: labels dataset %s left: %s", dataset.id, exc)
            continue
        frames.append(rows)
        report.labels.append(ImportedLabels(dataset_id=dataset.id, rows=rows.height))
    if frames:
        rows = pl.concat(frames, how="diagonal_relaxed")
        table = tables.labels(model, sample=rows)
        assert table is not None
        if rows.height:
            report.labels_snapshots[table.name] = table.append(rows, properties={
                IMPORT_PROPERTY: "labels", "driftloop.rows": str(rows.height),
                "driftloop.datasets": str(len(frames))})
    if table is not None and not failed:
        _mark_labels_done(table)


def _registrations(table: Any) -> pl.DataFrame:
    """One row per registration in the labels table: id, source, registered_at, rows."""
    return (table.scan().group_by(REGISTRATION)
            .agg(pl.col(SOURCE).first(), pl.col(REGISTERED_AT).first(), pl.len().alias("rows"))
            .collect())


def _registered_through_table(dataset: Any, present: pl.DataFrame) -> bool:
    """A dataset that ``driftloop labels`` made after the upgrade: the same registration is
    in the table (same source and row count, registered within the hour after the
    dataset was made), under its own registration id."""
    if present.height == 0:
        return False
    made = dataset.created_at.astimezone(UTC)
    at = present[REGISTERED_AT]
    if at.dtype.time_zone is None:  # type: ignore[attr-defined]
        at = at.dt.replace_time_zone("UTC")
    at = at.dt.convert_time_zone("UTC")
    match = present.with_columns(at.alias("_at")).filter(
        (pl.col(SOURCE) == mask_uri(dataset.source)) & (pl.col("rows") == dataset.rows_valid)
        & (pl.col("_at") >= made) & (pl.col("_at") <= made + SAME_REGISTRATION))
    return match.height > 0


def _label_rows(dataset: Any, spec: Any) -> pl.DataFrame:
    """The labels table's rows for one dataset registered before the tables."""
    from driftloop.storage import read_parquet

    if not spec.id:
        raise DriftloopError(f"spec '{spec.name}' has no id column; labels are joined to scored rows by id")
    frame = read_parquet(dataset.snapshot_uri)
    missing = [c for c in (spec.id, spec.target) if c not in frame.columns]
    if missing:
        raise DriftloopError(f"{dataset.snapshot_uri} lacks column(s) {', '.join(missing)}")
    timestamp = (pl.col(spec.timestamp).cast(pl.Datetime("us")) if spec.timestamp and spec.timestamp in frame.columns
                 else pl.lit(None, dtype=pl.Datetime("us")))
    registered = dataset.created_at.astimezone(UTC)
    return frame.select(
        pl.col(spec.id), pl.col(spec.target), timestamp.alias(LABEL_TIMESTAMP),
        pl.lit(registered).dt.convert_time_zone("UTC").dt.cast_time_unit("us").alias(REGISTERED_AT),
        pl.lit(dataset.id, dtype=pl.String).alias(SOURCE),
        pl.lit(dataset.id, dtype=pl.String).alias(REGISTRATION),
    )


def _mark_labels_done(table: Any) -> None:
    from pyiceberg.exceptions import CommitFailedException

    try:
        with table.refresh().table.transaction() as tx:
            tx.set_properties({LABELS_DONE: "true"})
    except CommitFailedException:  # a concurrent commit: the next import checks again (and skips what is in)
        logger.info("labels table %s: the import mark is set by the next run", table.name)

