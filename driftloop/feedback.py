"""A model's labelled data, and the training window a retrain draws from it.

Labelled rows come from two kinds of registered, validated data:

- **datasets**: labelled datasets ingested under the spec's name (the original training
  data, or a newer labelled file or SQL query);
- **feedback**: rows the model scored (the scoring outputs: id, timestamp, features)
  joined by id to the labels registered with ``driftloop labels`` (datasets named
  ``<name>.labels``; a later label for an id replaces an earlier one).

An id present in several sources keeps its most recently registered row. Labels for
ids that were never scored are counted, not dropped silently. Nothing here reads a
path that did not come from the registry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import polars as pl
from pydantic import BaseModel, Field

from driftloop.backtest import WindowChoice
from driftloop.errors import DriftloopError
from driftloop.registry import DatasetRecord, RegistryStore
from driftloop.schema import POLARS_DTYPES
from driftloop.spec import DatasetSpec, RetrainPolicy
from driftloop.storage import read_parquet
from driftloop.tables import (
    FORM,
    INPUT_KEY,
    LABEL_TIMESTAMP,
    MODEL_NAME,
    MODEL_VERSION,
    REGISTRATION,
    ROLE,
    SCORED_AT,
    SCORING_RUN,
    SERVED,
    MemoryTable,
    Tables,
)
from driftloop.tables import REGISTERED_AT as LABELS_REGISTERED_AT

logger = logging.getLogger(__name__)

SOURCE = "_source"  # dataset id or scoring run id a row came from
REGISTERED_AT = "_registered_at"  # when that row's label was registered (later wins)
LABELS_SUFFIX = ".labels"
WINDOW_SUFFIX = ".window"


def labels_dataset_name(model: str) -> str:
    return f"{model}{LABELS_SUFFIX}"


def window_dataset_name(model: str) -> str:
    return f"{model}{WINDOW_SUFFIX}"


class EmptyWindow(DriftloopError):
    """The training window holds no labelled rows."""


@dataclass
class LabelledData:
    """Every labelled row of a model, one per id, with where each came from."""

    frame: pl.DataFrame  # training columns + SOURCE + REGISTERED_AT
    datasets: list[str] = field(default_factory=list)  # labelled datasets read
    scoring_runs: list[str] = field(default_factory=list)  # scoring runs with at least one label
    labels: int = 0  # distinct labelled ids registered with `driftloop labels`
    labels_unscored: int = 0  # ... of which no scored row holds the id
    skipped: list[str] = field(default_factory=list)  # sources that could not be read, and why
    predictions_snapshot: int | None = None  # the tables' snapshots read
    labels_snapshot: int | None = None


class WindowSnapshots(BaseModel):
    """What a stored window read: re-reading these gives the same rows."""

    predictions: int | None = None
    labels: int | None = None
    datasets: list[str] | None = None  # every labelled dataset read (None: all registered now)


class WindowRecord(BaseModel):
    """What a retrain trained on, stored with the version (``models show --json``)."""

    policy: str = Field(description="The spec's window, e.g. 'last 92d'.")
    start: str | None = Field(description="Oldest timestamp in the window (None without a timestamp).")
    end: str | None = Field(description="Newest timestamp in the window: the newest label minus skip_recent.")
    rows: int
    skipped_recent: int = Field(description="Labelled rows left out as too recent (skip_recent).")
    new_labels: int = Field(description="Labelled rows newer than the champion's training data.")
    dataset_ids: list[str]
    scoring_runs: list[str]
    labels_unscored: int = Field(description="Registered labels whose id was never scored.")
    predictions_snapshot: int | None = Field(default=None, description="Snapshot of predictions.<model> read.")
    labels_snapshot: int | None = Field(default=None, description="Snapshot of labels.<model> read.")
    datasets_read: list[str] | None = Field(default=None, description="Every labelled dataset read (the window "
                                            "may use fewer): with the snapshots, what re-reads it exactly.")
    choice: WindowChoice | None = Field(default=None, description="With window: {choose: [...]}: every candidate's "
                                        "backtest figures and the window chosen (this record's policy).")

    def snapshots(self) -> WindowSnapshots:
        return WindowSnapshots(predictions=self.predictions_snapshot, labels=self.labels_snapshot,
                               datasets=self.datasets_read)


def training_columns(spec: DatasetSpec) -> list[str]:
    """The columns a training row carries: id, timestamp, features, segment, target."""
    names = (spec.id, spec.timestamp, *spec.feature_columns, spec.segment, spec.target)
    return list(dict.fromkeys(n for n in names if n))


def _conform(frame: pl.DataFrame, spec: DatasetSpec, columns: list[str], where: str) -> pl.DataFrame:
    """The frame's ``columns`` with the spec's types; a missing column is an error naming
    the source (the caller skips that source and says so)."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DriftloopError(f"{where} lacks column(s) {', '.join(missing)}")
    return frame.select(pl.col(c).cast(POLARS_DTYPES[spec.column_spec(c).dtype]) for c in columns)


def _tagged(frame: pl.DataFrame, source: str, registered_at: datetime) -> pl.DataFrame:
    return frame.with_columns(
        pl.lit(source, dtype=pl.String).alias(SOURCE),
        pl.lit(registered_at).dt.cast_time_unit("us").dt.replace_time_zone(None).alias(REGISTERED_AT),
    )


def _oldest_first(records: list[DatasetRecord]) -> list[DatasetRecord]:
    return sorted(records, key=lambda r: (r.created_at, r.id))


def collect_labelled_data(registry: RegistryStore, tables: Tables, spec: DatasetSpec, *,
                          policy: RetrainPolicy | None = None, at: WindowSnapshots | None = None) -> LabelledData:
    """All labelled rows of the model named by ``spec``, de-duplicated by id (the most
    recently registered row of an id wins).

    ``policy``: with a ``last`` window and a timestamp, scored rows older than the
    window are never read (pushed down to the table scan: memory follows the window,
    not the table's history). ``at``: read the tables as of these snapshots and only
    these datasets, to re-read a stored window exactly."""
    from driftloop.legacy_outputs import import_legacy_outputs

    import_legacy_outputs(registry, tables, None, model=spec.name, spec=spec)  # once: rows scored before the tables
    columns = training_columns(spec)
    out = LabelledData(frame=pl.DataFrame())
    frames: list[pl.DataFrame] = []

    records = [d for d in registry.list_datasets(name=spec.name) if d.labelled]
    if at is not None and at.datasets is not None:
        records = [d for d in records if d.id in set(at.datasets)]
    for record in _oldest_first(records):
        try:
            frame = _conform(read_parquet(record.snapshot_uri), spec, columns, f"dataset {record.id}")
        except (OSError, DriftloopError, pl.exceptions.PolarsError) as exc:
            out.skipped.append(f"dataset {record.id}: {exc}")
            continue
        frames.append(_tagged(frame, record.id, record.created_at))
        out.datasets.append(record.id)

    if spec.id:
        since = _window_start(frames, tables, spec, policy, at)
        feedback = _feedback(tables, spec, columns, out, at, since)
        if feedback is not None:
            frames.append(feedback)

    if not frames:
        out.frame = pl.DataFrame(schema={c: POLARS_DTYPES[spec.column_spec(c).dtype] for c in columns})
        return out
    if len(frames) == 1:  # one source is unique by id already: no copies
        out.frame = frames[0]
        return out
    combined = pl.concat(frames, how="vertical")
    if spec.id:
        combined = combined.sort(REGISTERED_AT, maintain_order=True).unique(subset=[spec.id], keep="last", maintain_order=True)
    out.frame = combined
    return out


def _snapshot(table: MemoryTable | None, at: int | None) -> int | None:
    if table is None:
        return None
    return at if at is not None else table.refresh().snapshot_id()


def latest_labels(tables: Tables, spec: DatasetSpec, snapshot: int | None = None, *,
                  ids: pl.LazyFrame | None = None) -> tuple[pl.LazyFrame | None, int | None]:
    """The latest registered label of every id (id, target, REGISTERED_AT), lazily, from
    the model's labels table as of ``snapshot`` (default: now); None when it has none.
    ``ids``: only these ids (a window's, a monitoring run's), selected before the latest
    label is found, so the work follows them and not every label ever registered."""
    assert spec.id is not None
    table = tables.labels(spec.name)
    snapshot = _snapshot(table, snapshot)
    if table is None or snapshot is None:
        return None, None
    id_type = POLARS_DTYPES[spec.column_spec(spec.id).dtype]
    target_type = POLARS_DTYPES[spec.column_spec(spec.target).dtype]
    rows = table.scan(snapshot).select(
        pl.col(spec.id).cast(id_type), pl.col(spec.target).cast(target_type),
        pl.col(LABELS_REGISTERED_AT).dt.replace_time_zone(None).dt.cast_time_unit("us").alias(REGISTERED_AT),
        pl.col(REGISTRATION))
    if ids is not None:
        rows = rows.join(ids.select(pl.col(spec.id).cast(id_type)), on=spec.id, how="semi")
    labels = (
        rows
        # the latest registration of an id wins; within one registration, its last row
        .sort(REGISTERED_AT, REGISTRATION, maintain_order=True)
        .unique(subset=[spec.id], keep="last", maintain_order=True)
        .drop(REGISTRATION)
    )
    return labels, snapshot


def served_rows(tables: Tables, spec: DatasetSpec, snapshot: int | None = None, *, model_version: int | None = None,
                since: datetime | None = None, until: datetime | None = None, scoring_run: str | None = None,
                bookkeeping: bool = True) -> tuple[pl.LazyFrame | None, int | None]:
    """The rows the model served (role ``served``) in its predictions table as of
    ``snapshot``, lazily, filtered (and pruned) by version, time range and scoring run.
    ``bookkeeping=False`` leaves out the per-row strings only the table needs (input key,
    role, form, model name, run id): monitoring's copy of the rows is then much smaller."""
    table = tables.predictions(spec.name)
    snapshot = _snapshot(table, snapshot)
    if table is None or snapshot is None:
        return None, None
    rows = table.scan(snapshot).filter(pl.col(ROLE) == SERVED)
    if model_version is not None:
        rows = rows.filter(pl.col(MODEL_VERSION) == model_version)
    if scoring_run is not None:
        rows = rows.filter(pl.col(SCORING_RUN) == scoring_run)
    if spec.timestamp and since is not None:
        rows = rows.filter(pl.col(spec.timestamp) >= since)
    if spec.timestamp and until is not None:
        rows = rows.filter(pl.col(spec.timestamp) < until)
    if not bookkeeping:
        rows = rows.drop([INPUT_KEY, ROLE, FORM, MODEL_NAME, SCORING_RUN], strict=False)
    return rows, snapshot


def _window_start(frames: list[pl.DataFrame], tables: Tables, spec: DatasetSpec, policy: RetrainPolicy | None,
                  at: WindowSnapshots | None) -> datetime | None:
    """The oldest timestamp a ``last`` window can reach: the newest labelled timestamp
    (datasets, and scored rows with a label: ids and timestamps only) minus skip_recent
    and the span. None when every labelled row may be needed."""
    if policy is None or policy.window.span is None or not spec.timestamp or not spec.id:
        return None
    ts = spec.timestamp
    newest = [f[ts].max() for f in frames if f.height]
    newest.append(_newest_labelled(tables, spec, policy.window.span, at))
    newest = [n for n in newest if n is not None]
    return window_reach(max(newest) if newest else None, policy)


def window_reach(newest: datetime | None, policy: RetrainPolicy | None) -> datetime | None:
    """The oldest timestamp a ``last`` window can reach when the newest labelled row is at
    ``newest``: scored rows older than it are not read (None: every row may be needed)."""
    if newest is None or policy is None or policy.window.span is None:
        return None
    return newest - policy.skip_recent_span - policy.window.span


def _label_ids(tables: Tables, spec: DatasetSpec, snapshot: int | None) -> pl.LazyFrame | None:
    table = tables.labels(spec.name)
    snapshot = _snapshot(table, snapshot)
    if table is None or snapshot is None:
        return None
    id_type = POLARS_DTYPES[spec.column_spec(spec.id).dtype]  # type: ignore[arg-type]
    return table.scan(snapshot).select(pl.col(spec.id).cast(id_type))  # type: ignore[arg-type]


def _newest_labelled(tables: Tables, spec: DatasetSpec, span: Any, at: WindowSnapshots | None) -> datetime | None:
    """The newest timestamp of a served row that has a label. Looked for in the newest
    ``span`` of served rows first (pruned to those files): only when none of them is
    labelled does it read every served row's id and timestamp."""
    assert spec.id is not None and spec.timestamp is not None
    ts = spec.timestamp
    labelled = _label_ids(tables, spec, at.labels if at else None)
    scored, _ = served_rows(tables, spec, at.predictions if at else None)
    if labelled is None or scored is None:
        return None
    newest_scored = scored.select(pl.col(ts).max()).collect().item()
    if newest_scored is None:
        return None
    id_type = POLARS_DTYPES[spec.column_spec(spec.id).dtype]
    for since in (newest_scored - span, None):
        rows = scored if since is None else scored.filter(pl.col(ts) >= since)
        found = (rows.select(pl.col(spec.id).cast(id_type), ts).join(labelled, on=spec.id, how="semi")
                 .select(pl.col(ts).max()).collect(engine="streaming").item())
        if found is not None:
            return found
    return None


def _feedback(tables: Tables, spec: DatasetSpec, columns: list[str], out: LabelledData, at: WindowSnapshots | None,
              since: datetime | None) -> pl.DataFrame | None:
    """Served rows joined by id to their latest registered label, read lazily from the
    two tables (as of ``at``, or now, recorded on ``out``). With ``since`` (a ``last``
    window) only the window's served rows are read, and only their ids' labels are
    deduplicated (see :func:`_count_labels` for what is counted then)."""
    assert spec.id is not None
    id_type = POLARS_DTYPES[spec.column_spec(spec.id).dtype]
    scored, out.predictions_snapshot = served_rows(tables, spec, at.predictions if at else None)
    out.labels_snapshot = _snapshot(tables.labels(spec.name), at.labels if at else None)
    if out.labels_snapshot is None:
        return None
    _count_labels(tables, spec, out, scored, since)
    if scored is None:
        return None
    window_rows = scored if since is None else scored.filter(pl.col(spec.timestamp) >= since)  # type: ignore[arg-type]
    scored_columns = [c for c in columns if c != spec.target]
    missing = [c for c in scored_columns if c not in window_rows.collect_schema().names()]
    if missing:
        out.skipped.append(f"table predictions.{spec.name} lacks column(s) {', '.join(missing)}")
        return None
    window = (
        window_rows.select(*[pl.col(c) for c in scored_columns], pl.col(SCORED_AT), pl.col(SCORING_RUN).alias(SOURCE))
        .with_columns(pl.col(spec.id).cast(id_type))
        # an id scored again (a re-scored input, a new champion) keeps its latest row
        .sort(SCORED_AT, maintain_order=True).unique(subset=[spec.id], keep="last", maintain_order=True)
        .collect(engine="streaming")
    )
    labels, _ = latest_labels(tables, spec, out.labels_snapshot, ids=window.lazy().select(spec.id))
    assert labels is not None
    joined = window.join(labels.collect(engine="streaming"), on=spec.id, how="inner")
    del window
    frame = joined.select(pl.col(c).cast(POLARS_DTYPES[spec.column_spec(c).dtype]) for c in columns).with_columns(
        joined[SOURCE], joined[REGISTERED_AT])
    out.scoring_runs = sorted(frame[SOURCE].unique().to_list())
    return frame


def _count_labels(tables: Tables, spec: DatasetSpec, out: LabelledData, scored: pl.LazyFrame | None,
                  since: datetime | None) -> None:
    """``labels``: distinct labelled ids; ``labels_unscored``: of those, ids no served row
    holds (ids only, streamed). With ``since`` (a ``last`` window) labels whose label
    timestamp is older than the window are not counted (labels sent without a timestamp
    always are), so the work follows the window, not the labels' whole history."""
    assert spec.id is not None
    table = tables.labels(spec.name)
    assert table is not None and out.labels_snapshot is not None
    id_type = POLARS_DTYPES[spec.column_spec(spec.id).dtype]
    rows = table.scan(out.labels_snapshot)
    if since is not None:
        rows = rows.filter(pl.col(LABEL_TIMESTAMP).is_null() | (pl.col(LABEL_TIMESTAMP) >= since))
    ids = rows.select(pl.col(spec.id).cast(id_type)).unique().collect(engine="streaming")
    out.labels = ids.height
    if scored is None:
        out.labels_unscored = out.labels
        return
    # Labels that found a served row: the served ids semi-joined to the (fewer) label ids,
    # so the hash table is the labels', not every served row's.
    matched = scored.select(pl.col(spec.id).cast(id_type)).join(ids.lazy(), on=spec.id, how="semi").unique() \
        .select(pl.len()).collect(engine="streaming").item()
    out.labels_unscored = out.labels - matched


def join_labels(scored: pl.DataFrame, labels: pl.DataFrame, spec: DatasetSpec, *, how: str = "left") -> pl.DataFrame:
    """Scored rows with the target of their id's latest label (``labels``: one row per
    id, the latest). ``left`` keeps unlabelled rows (target null), ``inner`` only labelled
    ones. The id is compared as the spec's type, whatever type the labels file carried."""
    assert spec.id is not None
    id_type = POLARS_DTYPES[spec.column_spec(spec.id).dtype]
    target_type = POLARS_DTYPES[spec.column_spec(spec.target).dtype]
    latest = (
        labels.select(pl.col(spec.id).cast(id_type), pl.col(spec.target).cast(target_type),
                      *[c for c in (REGISTERED_AT,) if c in labels.columns])
        .unique(subset=[spec.id], keep="last", maintain_order=True)
    )
    return scored.drop(spec.target, strict=False).with_columns(pl.col(spec.id).cast(id_type)).join(latest, on=spec.id, how=how)  # type: ignore[arg-type]


def scored_and_labelled(tables: Tables, spec: DatasetSpec, *, model_version: int, start: datetime,
                        end: datetime) -> pl.DataFrame:
    """The rows ``model_version`` served with a timestamp in [start, end), whole (features,
    prediction, probabilities), with their latest registered label; unlabelled rows are
    left out. Monitoring's reference when the policy names a reference period."""
    if not spec.id or not spec.timestamp:
        raise DriftloopError(f"a reference period needs the spec's id and timestamp; spec '{spec.name}' lacks one")
    labels, _ = latest_labels(tables, spec)
    rows, _ = served_rows(tables, spec, model_version=model_version, since=start, until=end)
    if labels is None or rows is None:
        return pl.DataFrame()
    scored = rows.sort(SCORED_AT, maintain_order=True).unique(subset=[spec.id], keep="last", maintain_order=True).collect()
    return join_labels(scored, labels.collect(), spec, how="inner").drop(REGISTERED_AT).sort(spec.timestamp)


@dataclass
class LabelledWindow:
    """The labelled rows a retrain trains on, and the record of how they were chosen
    (not the policy that chooses them: that is ``driftloop.spec.TrainingWindow``)."""

    frame: pl.DataFrame  # training columns only
    record: WindowRecord


def champion_data_end(split: dict[str, Any], window: dict[str, Any] | None) -> datetime | None:
    """The newest timestamp a version was trained (and judged) on."""
    end = (window or {}).get("end") or (split.get("holdout") or [None, None])[1]
    return datetime.fromisoformat(end) if end else None


def select_window(
    data: LabelledData, spec: DatasetSpec, policy: RetrainPolicy, *,
    champion_end: datetime | None = None, champion_sources: set[str] | None = None,
) -> LabelledWindow:
    """The rows a retrain learns from. With a timestamp the window ends at the newest
    label minus ``skip_recent`` and reaches back ``last`` (or ``rows`` rows, or all);
    without one, ``rows`` takes the most recently registered rows. ``new_labels``
    counts rows newer than the champion's data (by time; without a timestamp: rows from
    sources the champion was not trained on)."""
    frame = data.frame
    if frame.height == 0:
        raise EmptyWindow(
            f"model '{spec.name}' has no labelled rows: ingest a labelled dataset or register labels for "
            "scored rows (driftloop labels)"
        )
    ts = spec.timestamp
    skipped_recent = 0
    end: datetime | None = None
    if ts:
        end = frame[ts].max() - policy.skip_recent_span  # type: ignore[operator]
        matured = frame.filter(pl.col(ts) <= end)
        skipped_recent = frame.height - matured.height
        matured = matured.sort(ts, maintain_order=True)
        span = policy.window.span
        if span is not None:
            chosen = matured.filter(pl.col(ts) > end - span)
        elif policy.window.rows is not None:
            chosen = matured.tail(policy.window.rows)
        else:
            chosen = matured
        newer = matured.filter(pl.col(ts) > champion_end) if champion_end is not None else matured
        new_labels = newer.height
    else:
        ordered = frame.sort(REGISTERED_AT, maintain_order=True)
        chosen = ordered.tail(policy.window.rows) if policy.window.rows is not None else ordered
        known = champion_sources or set()
        new_labels = frame.filter(~pl.col(SOURCE).is_in(list(known))).height
    if chosen.height == 0:
        raise EmptyWindow(
            f"model '{spec.name}': the window ({policy.window.describe()}, skip_recent {policy.skip_recent}) "
            f"holds no labelled rows of {frame.height}; widen the window in the spec's retrain section"
        )
    sources = set(chosen[SOURCE].unique().to_list())
    record = WindowRecord(
        policy=policy.window.describe(),
        start=str(chosen[ts].min()) if ts else None,
        end=str(end) if ts else None,
        rows=chosen.height,
        skipped_recent=skipped_recent,
        new_labels=new_labels,
        dataset_ids=[d for d in data.datasets if d in sources],
        scoring_runs=[r for r in data.scoring_runs if r in sources],
        labels_unscored=data.labels_unscored,
        predictions_snapshot=data.predictions_snapshot,
        labels_snapshot=data.labels_snapshot,
        datasets_read=list(data.datasets),
    )
    return LabelledWindow(chosen.select(training_columns(spec)), record)


def reread_window(registry: RegistryStore, tables: Tables, spec: DatasetSpec, policy: RetrainPolicy,
                  record: WindowRecord) -> LabelledWindow:
    """A stored window read again from the snapshots and datasets it names: the same
    rows it trained on, however much the tables have grown since."""
    if record.predictions_snapshot is None and record.labels_snapshot is None and record.datasets_read is None:
        raise DriftloopError("this window was stored before windows recorded their snapshots; it cannot be re-read")
    data = collect_labelled_data(registry, tables, spec, policy=policy, at=record.snapshots())
    return select_window(data, spec, policy)
