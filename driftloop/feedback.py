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

from driftloop.errors import DriftloopError
from driftloop.outputs import read_predictions
from driftloop.registry import DatasetRecord, RegistryStore
from driftloop.schema import POLARS_DTYPES
from driftloop.spec import DatasetSpec, RetrainPolicy
from driftloop.storage import read_parquet

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
    labels_unscored: int = 0  # ... of which no scoring output holds the id
    skipped: list[str] = field(default_factory=list)  # sources that could not be read, and why


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


def collect_labelled_data(registry: RegistryStore, spec: DatasetSpec) -> LabelledData:
    """All labelled rows of the model named by ``spec``, de-duplicated by id (the most
    recently registered row of an id wins)."""
    columns = training_columns(spec)
    out = LabelledData(frame=pl.DataFrame())
    frames: list[pl.DataFrame] = []

    for record in _oldest_first([d for d in registry.list_datasets(name=spec.name) if d.labelled]):
        try:
            frame = _conform(read_parquet(record.snapshot_uri), spec, columns, f"dataset {record.id}")
        except (OSError, DriftloopError, pl.exceptions.PolarsError) as exc:
            out.skipped.append(f"dataset {record.id}: {exc}")
            continue
        frames.append(_tagged(frame, record.id, record.created_at))
        out.datasets.append(record.id)

    if spec.id:
        feedback = _feedback(registry, spec, columns, out)
        if feedback is not None:
            frames.append(feedback)

    if not frames:
        out.frame = pl.DataFrame(schema={c: POLARS_DTYPES[spec.column_spec(c).dtype] for c in columns})
        return out
    combined = pl.concat(frames, how="vertical")
    if spec.id:
        combined = combined.sort(REGISTERED_AT, maintain_order=True).unique(subset=[spec.id], keep="last", maintain_order=True)
    out.frame = combined
    return out


def registered_labels(registry: RegistryStore, spec: DatasetSpec, skipped: list[str] | None = None) -> pl.DataFrame | None:
    """The latest registered label of every id (id, target, REGISTERED_AT), from the
    ``<name>.labels`` datasets; None when there are none."""
    assert spec.id is not None
    id_type = POLARS_DTYPES[spec.column_spec(spec.id).dtype]
    target_type = POLARS_DTYPES[spec.column_spec(spec.target).dtype]
    frames = []
    for record in _oldest_first(registry.list_datasets(name=labels_dataset_name(spec.name))):
        try:
            raw = read_parquet(record.snapshot_uri)
            frames.append(
                raw.select(pl.col(spec.id).cast(id_type), pl.col(spec.target).cast(target_type))
                .with_columns(pl.lit(record.created_at).dt.cast_time_unit("us").dt.replace_time_zone(None).alias(REGISTERED_AT))
            )
        except (OSError, pl.exceptions.PolarsError) as exc:
            if skipped is not None:
                skipped.append(f"labels {record.id}: {exc}")
            logger.warning("labels dataset %s left out: %s", record.id, exc)
    if not frames:
        return None
    return pl.concat(frames).unique(subset=[spec.id], keep="last", maintain_order=True)


def join_labels(scored: pl.DataFrame, labels: pl.DataFrame, spec: DatasetSpec, *, how: str = "left") -> pl.DataFrame:
    """Scored rows with the target of their id's latest label (``labels`` in registration
    order: a later label for an id replaces an earlier one). ``left`` keeps unlabelled
    rows (target null), ``inner`` only labelled ones. The id is compared as the spec's
    type, whatever type the labels file carried."""
    assert spec.id is not None
    id_type = POLARS_DTYPES[spec.column_spec(spec.id).dtype]
    target_type = POLARS_DTYPES[spec.column_spec(spec.target).dtype]
    latest = (
        labels.select(pl.col(spec.id).cast(id_type), pl.col(spec.target).cast(target_type),
                      *[c for c in (REGISTERED_AT,) if c in labels.columns])
        .unique(subset=[spec.id], keep="last", maintain_order=True)
    )
    return scored.drop(spec.target, strict=False).with_columns(pl.col(spec.id).cast(id_type)).join(latest, on=spec.id, how=how)  # type: ignore[arg-type]


def _feedback(registry: RegistryStore, spec: DatasetSpec, columns: list[str], out: LabelledData) -> pl.DataFrame | None:
    """Scored rows joined by id to their latest registered label."""
    assert spec.id is not None
    labels = registered_labels(registry, spec, out.skipped)
    if labels is None:
        return None
    out.labels = labels.height

    scored_columns = [c for c in columns if c != spec.target]
    scored_frames = []
    # A later run writing the same output replaced its files: read each output once.
    latest_by_output: dict[str, Any] = {}
    for run in sorted(registry.list_scoring_runs(spec.name), key=lambda r: r.finished_at):
        latest_by_output[run.output_uri] = run
    for run in sorted(latest_by_output.values(), key=lambda r: r.finished_at):
        try:
            frame = _conform(read_predictions(run.output_uri), spec, scored_columns, f"scoring output {run.output_uri}")
        except (OSError, DriftloopError, pl.exceptions.PolarsError) as exc:
            out.skipped.append(f"scoring run {run.id}: {exc}")
            continue
        scored_frames.append(frame.with_columns(pl.lit(run.id, dtype=pl.String).alias(SOURCE)))
    if not scored_frames:
        out.labels_unscored = labels.height
        return None
    scored = pl.concat(scored_frames).unique(subset=[spec.id], keep="last", maintain_order=True)
    out.labels_unscored = labels.join(scored.select(spec.id), on=spec.id, how="anti").height
    joined = join_labels(scored, labels, spec, how="inner")
    out.scoring_runs = sorted(joined[SOURCE].unique().to_list())
    return joined.select(*columns, SOURCE, REGISTERED_AT)


def scored_and_labelled(registry: RegistryStore, spec: DatasetSpec, *, model_version: int, start: datetime,
                        end: datetime) -> pl.DataFrame:
    """The rows ``model_version`` scored with a timestamp in [start, end), whole (features,
    prediction, probabilities), with their latest registered label; unlabelled rows are
    left out. Monitoring's reference when the policy names a reference period."""
    if not spec.id or not spec.timestamp:
        raise DriftloopError(f"a reference period needs the spec's id and timestamp; spec '{spec.name}' lacks one")
    labels = registered_labels(registry, spec)
    if labels is None:
        return pl.DataFrame()
    # An output directory holds what its latest run wrote: it counts only if that run was this version's.
    latest_by_output = {run.output_uri: run for run in sorted(registry.list_scoring_runs(spec.name), key=lambda r: r.finished_at)}
    frames = []
    for run in latest_by_output.values():
        if run.model_version != model_version:
            continue
        try:
            scored = read_predictions(run.output_uri)
        except (OSError, DriftloopError) as exc:
            logger.warning("scoring run %s left out of the reference: %s", run.id, exc)
            continue
        frames.append(scored.filter((pl.col(spec.timestamp) >= start) & (pl.col(spec.timestamp) < end)))
    if not frames:
        return pl.DataFrame()
    rows = pl.concat(frames, how="diagonal_relaxed").unique(subset=[spec.id], keep="last", maintain_order=True)
    return join_labels(rows, labels, spec, how="inner").drop(REGISTERED_AT).sort(spec.timestamp)


@dataclass
class TrainingWindow:
    frame: pl.DataFrame  # training columns only
    record: WindowRecord


def champion_data_end(split: dict[str, Any], window: dict[str, Any] | None) -> datetime | None:
    """The newest timestamp a version was trained (and judged) on."""
    end = (window or {}).get("end") or (split.get("holdout") or [None, None])[1]
    return datetime.fromisoformat(end) if end else None


def select_window(
    data: LabelledData, spec: DatasetSpec, policy: RetrainPolicy, *,
    champion_end: datetime | None = None, champion_sources: set[str] | None = None,
) -> TrainingWindow:
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
    )
    return TrainingWindow(chosen.select(training_columns(spec)), record)


def labelled_between(data: LabelledData, spec: DatasetSpec, after: datetime, until: datetime | None = None) -> pl.DataFrame:
    """Labelled rows with ``after < timestamp <= until`` (for judging models on a later
    period)."""
    if not spec.timestamp:
        raise DriftloopError(f"spec '{spec.name}' has no timestamp; a period cannot be selected")
    rows = data.frame.filter(pl.col(spec.timestamp) > after)
    if until is not None:
        rows = rows.filter(pl.col(spec.timestamp) <= until)
    return rows.select(training_columns(spec))
