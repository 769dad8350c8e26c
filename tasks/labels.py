"""Delayed labels: ground truth that arrives after scoring (id, target, optional
timestamp), validated against the spec's id and target. Registered, they are joined to
scored rows (``driftloop.feedback.join_labels``) for realized performance and retraining."""

from __future__ import annotations

import polars as pl
from prefect import task
from prefect.cache_policies import NONE

from driftloop.errors import DriftloopError
from driftloop.spec import ColumnSpec, DatasetSpec
from tasks.validate import ValidationResult, validate_columns, with_malformed


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
