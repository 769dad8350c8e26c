"""Delayed labels: ground truth that arrives after scoring (id, target, optional
timestamp), validated against the spec's id and target. Registered, they are appended
to the model's labels table (:mod:`driftloop.tables`) and joined to scored rows by id
(:mod:`driftloop.feedback`) for realized performance and retraining."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import polars as pl
from prefect import task
from prefect.cache_policies import NONE

from driftloop.errors import DriftloopError
from driftloop.redact import mask_uri
from driftloop.spec import ColumnSpec, DatasetSpec
from driftloop.tables import LABEL_TIMESTAMP, REGISTERED_AT, REGISTRATION, SOURCE, Tables
from driftloop.tasks.validate import ValidationResult, validate_columns, with_malformed


def label_columns(spec: DatasetSpec, raw_columns: list[str]) -> dict[str, ColumnSpec]:
    if not spec.id:
        raise DriftloopError(f"spec '{spec.name}' has no id column; labels are joined to scored rows by id")
    columns = {spec.id: spec.column_spec(spec.id), spec.target: spec.column_spec(spec.target)}
    if spec.timestamp and spec.timestamp in raw_columns:
        columns[spec.timestamp] = spec.column_spec(spec.timestamp).model_copy(update={"nullable": True})
    return columns


def validate_labels(raw: pl.DataFrame, malformed: pl.DataFrame, spec: DatasetSpec, *, source: str) -> ValidationResult:
    result = validate_columns(raw, label_columns(spec, raw.columns), spec_name=spec.name, source=source, target=spec.target)
    return with_malformed(result, malformed)


@task(name="validate-labels", cache_policy=NONE)
def validate_labels_task(raw: pl.DataFrame, malformed: pl.DataFrame, spec: DatasetSpec, source: str) -> ValidationResult:
    return validate_labels(raw, malformed, spec, source=source)


def label_rows(valid: pl.DataFrame, spec: DatasetSpec, *, source: str, registered_at: datetime,
               registration_id: str) -> pl.DataFrame:
    """The labels table's rows for one registration: id, target, label timestamp (the
    file's timestamp column, else null), registered_at, source, registration id."""
    assert spec.id is not None
    timestamp = (pl.col(spec.timestamp).cast(pl.Datetime("us")) if spec.timestamp and spec.timestamp in valid.columns
                 else pl.lit(None, dtype=pl.Datetime("us")))
    return valid.select(
        pl.col(spec.id), pl.col(spec.target), timestamp.alias(LABEL_TIMESTAMP),
        pl.lit(registered_at).dt.convert_time_zone("UTC").dt.cast_time_unit("us").alias(REGISTERED_AT),
        pl.lit(mask_uri(source), dtype=pl.String).alias(SOURCE),
        pl.lit(registration_id, dtype=pl.String).alias(REGISTRATION),
    )


def append_labels(tables: Tables, valid: pl.DataFrame, spec: DatasetSpec, *, source: str) -> tuple[str, int | None]:
    """Append one registration to ``labels.<model>`` in one commit, even when the same
    content was registered before: a later registration of an id wins. Returns the
    registration id and the snapshot id."""
    registration = str(uuid.uuid4())
    rows = label_rows(valid, spec, source=source, registered_at=datetime.now(UTC), registration_id=registration)
    if rows.height == 0:
        return registration, None
    table = tables.labels(spec.name, sample=rows)
    assert table is not None
    return registration, table.append(rows, properties={"driftloop.registration-id": registration,
                                                         "driftloop.rows": str(rows.height)})


@task(name="append-labels", cache_policy=NONE)
def append_labels_task(tables: Tables, valid: pl.DataFrame, spec: DatasetSpec, source: str) -> tuple[str, int | None]:
    return append_labels(tables, valid, spec, source=source)
