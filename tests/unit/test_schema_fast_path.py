"""``every_row_passes``: validation skips pandera only for batches proven clean, and
skipping it never changes what validation keeps or quarantines."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandera.polars as pa
import polars as pl
import pytest

from driftloop.schema import build_schema_for, every_row_passes
from driftloop.spec import DatasetSpec
from driftloop.tasks import validate
from driftloop.tasks.validate import SeenValues, coerce_to_spec, validate_rows

SPEC = DatasetSpec.model_validate({
    "name": "fast_path",
    "task": "binary_classification",
    "id": "id",
    "target": "label",
    "columns": {
        "id": {"dtype": "int"},
        "x": {"dtype": "float", "min": -1.0, "max": 1.0, "nullable": True},
        "y": {"dtype": "float"},
        "n": {"dtype": "int", "allowed": [0, 1, 2, 7]},
        "band": {"dtype": "category", "allowed": ["a", "b", "c"], "nullable": True},
        "flag": {"dtype": "bool", "nullable": True},
        "ts": {"dtype": "datetime"},
        "note": {"dtype": "string", "nullable": True},
        "label": {"dtype": "int", "allowed": [0, 1]},
    },
    "features": ["x", "y", "n", "band", "flag", "note"],
})
COLUMNS = SPEC.schema_columns(labelled=True)
SCHEMA = build_schema_for(COLUMNS, SPEC.name)

# Per column: values that pass, and values that may fail (or pass, e.g. a null where nulls are allowed).
GOOD = {
    "x": [-1.0, 0.0, 0.25, 1.0, -0.5],
    "y": [0.0, 1e300, -3.5, 42.0],
    "n": [0, 1, 2, 7],
    "band": ["a", "b", "c"],
    "flag": [True, False],
    "ts": [datetime(2026, 1, 1), datetime(2026, 6, 30, 12)],
    "note": ["ok", "", "a longer note"],
    "label": [0, 1],
}
BAD = {
    "x": [None, float("nan"), float("inf"), -1.0000001, 1.0000001, -float("inf")],
    "y": [None, float("nan"), float("inf"), -float("inf")],
    "n": [None, 3, -1, 8],
    "band": [None, "d", "A", ""],
    "flag": [None],
    "ts": [None],
    "note": [None],
    "label": [None, 2, -1],
}
DTYPES = {"id": pl.Int64, "x": pl.Float64, "y": pl.Float64, "n": pl.Int64, "band": pl.String, "flag": pl.Boolean,
          "ts": pl.Datetime("us"), "note": pl.String, "label": pl.Int64}


def random_frame(rng: np.random.Generator, bad_rate: float) -> pl.DataFrame:
    rows = int(rng.integers(1, 12))
    ids = rng.choice(50, size=rows, replace=True) if rng.random() < 0.3 else np.arange(rows) + 100
    data: dict[str, list] = {"id": [None if rng.random() < bad_rate / 4 else int(v) for v in ids]}
    for name, good in GOOD.items():
        data[name] = [_draw(rng, good, BAD[name], bad_rate) for _ in range(rows)]
    return pl.DataFrame(data, schema=DTYPES)


def _draw(rng: np.random.Generator, good: list, bad: list, bad_rate: float) -> object:
    pool = bad if rng.random() < bad_rate else good
    return pool[int(rng.integers(len(pool)))]


def as_text(frame: pl.DataFrame) -> pl.DataFrame:
    """The same rows as a CSV reader gives them: every column text."""
    return frame.with_columns(pl.col(c).cast(pl.String) for c in frame.columns)


def pandera_failures(frame: pl.DataFrame) -> int:
    try:
        SCHEMA.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as exc:
        return exc.failure_cases.height
    return 0


def test_skipping_pandera_on_proven_clean_batches_changes_no_result(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(20261206)
    proven_clean = 0
    cases = 100
    for case in range(cases):
        raw = random_frame(rng, bad_rate=[0.0, 0.02, 0.1, 0.3][case % 4])
        if case % 5 == 0:
            raw = as_text(raw)
        seen = {"id": SeenValues()}
        seen["id"].add(pl.Series("id", [3, 5, 101]))  # ids "earlier batches" kept
        typed, _ = coerce_to_spec(raw, COLUMNS)
        clean = every_row_passes(typed, SCHEMA)
        # The one-way guarantee the skip rests on: proven clean => pandera finds nothing.
        assert not clean or pandera_failures(typed) == 0, f"case {case}: skipped pandera would have failed rows"
        proven_clean += clean
        fast = validate_rows(raw, SPEC, source=f"case {case}", seen=seen)
        with monkeypatch.context() as patched:
            patched.setattr(validate, "every_row_passes", lambda frame, schema: False)
            full = validate_rows(raw, SPEC, source=f"case {case}", seen=seen)
        assert fast.valid.equals(full.valid), f"case {case}"
        assert fast.quarantine.equals(full.quarantine), f"case {case}"
        assert fast.rows_in == fast.rows_valid + fast.rows_quarantined
    # Both branches ran many times, so the comparison above means something.
    assert 20 < proven_clean < cases - 20


@pytest.mark.parametrize(("column", "value"), [
    ("y", None),  # null in a column that is not nullable
    ("y", float("inf")),  # not finite
    ("x", -float("inf")),  # not finite, nullable column
    ("x", 1.5),  # above max
    ("x", -1.5),  # below min
    ("n", 3),  # not allowed
    ("band", "d"),  # category not allowed
    ("label", 2),  # label outside its values
    ("id", 100),  # repeats the first row's id
])
def test_one_failing_value_is_never_proven_clean(column: str, value: object) -> None:
    rows = {name: [GOOD[name][0], GOOD[name][-1]] for name in GOOD} | {"id": [100, 101]}
    clean = pl.DataFrame(rows, schema=DTYPES)
    assert every_row_passes(clean, SCHEMA)
    dirty = clean.with_columns(pl.when(pl.int_range(pl.len()) == 1).then(pl.lit(value, dtype=DTYPES[column]))
                               .otherwise(pl.col(column)).alias(column))
    assert not every_row_passes(dirty, SCHEMA)
    assert pandera_failures(dirty) > 0


def test_nulls_where_allowed_pass_but_two_null_ids_do_not() -> None:
    unique_nullable = build_schema_for(
        DatasetSpec.model_validate({**SPEC.model_dump(), "columns": {
            **SPEC.model_dump()["columns"], "note": {"dtype": "string", "nullable": True, "unique": True}}}
        ).schema_columns(labelled=True), "nullable_unique")
    rows = {name: [GOOD[name][0]] * 3 for name in GOOD} | {"id": [1, 2, 3]}
    frame = pl.DataFrame(rows, schema=DTYPES).with_columns(
        pl.lit(None, dtype=pl.Float64).alias("x"), pl.Series("note", ["a", None, "b"]))
    assert every_row_passes(frame, SCHEMA)
    assert every_row_passes(frame, unique_nullable)  # one null in a unique column is its first
    twice = frame.with_columns(pl.Series("note", [None, None, "b"]))
    assert not every_row_passes(twice, unique_nullable)  # pandera fails the second null
    assert every_row_passes(twice, SCHEMA)


def test_what_it_does_not_model_is_left_to_pandera() -> None:
    frame = pl.DataFrame({"v": [1.0, 2.0]})
    assert every_row_passes(frame, pa.DataFrameSchema({"v": pa.Column(pl.Float64)}))
    assert not every_row_passes(frame, pa.DataFrameSchema({"v": pa.Column(pl.Float32)}))  # dtype not exactly the schema's
    assert not every_row_passes(frame, pa.DataFrameSchema({"v": pa.Column(pl.Float64)}, checks=[
        pa.Check(lambda data: data.lazyframe.select(pl.lit(True)))]))  # a dataframe-level check
    assert not every_row_passes(frame, pa.DataFrameSchema({"v": pa.Column(
        pl.Float64, checks=[pa.Check(lambda value: value > 0, element_wise=True)])}))
    assert not every_row_passes(frame, pa.DataFrameSchema({"w": pa.Column(pl.Float64)}))  # column missing
