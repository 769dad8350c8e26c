"""The pandera (polars backend) schema derived from a dataset spec.

Types are enforced while parsing (``tasks.validate.coerce_to_spec``), so the schema
checks dtypes without coercing and adds the value checks: bounds, allowed values,
finiteness, nullability and uniqueness.
"""

from __future__ import annotations

import pandera.polars as pa
import polars as pl

from driftloop.spec import ColumnSpec, DatasetSpec, DType

POLARS_DTYPES: dict[DType, pl.DataType] = {
    "int": pl.Int64(),
    "float": pl.Float64(),
    "bool": pl.Boolean(),
    "category": pl.String(),
    "string": pl.String(),
    "datetime": pl.Datetime("us"),
}


def _finite(data: pa.PolarsData) -> pl.LazyFrame:
    return data.lazyframe.select(pl.col(data.key).is_finite())


def _first_of_its_value(data: pa.PolarsData) -> pl.LazyFrame:
    # Keep-first uniqueness: the first row with a value is kept, its repeats fail.
    return data.lazyframe.select(pl.col(data.key).is_first_distinct())


def column_checks(spec: ColumnSpec) -> list[pa.Check]:
    checks: list[pa.Check] = []
    if spec.dtype == "float":
        checks.append(pa.Check(_finite, name="finite"))
    if spec.min is not None:
        checks.append(pa.Check.ge(spec.min))
    if spec.max is not None:
        checks.append(pa.Check.le(spec.max))
    if spec.allowed is not None:
        checks.append(pa.Check.isin(spec.allowed))
    if spec.unique:
        checks.append(pa.Check(_first_of_its_value, name="unique"))
    return checks


def build_schema(spec: DatasetSpec, *, labelled: bool = True) -> pa.DataFrameSchema:
    return build_schema_for(spec.schema_columns(labelled=labelled), spec.name)


def build_schema_for(columns: dict[str, ColumnSpec], name: str) -> pa.DataFrameSchema:
    pandera_columns = {
        column: pa.Column(POLARS_DTYPES[col.dtype], checks=column_checks(col), nullable=col.nullable, required=True)
        for column, col in columns.items()
    }
    return pa.DataFrameSchema(pandera_columns, name=name, strict=False, coerce=False)
