"""Every bad-input case ends in quarantined rows (row-level) or one clear error
(batch-level); rows_in == rows_valid + rows_quarantined always."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from driftloop.errors import SchemaError, SourceError
from driftloop.spec import load_spec
from driftloop.tasks.ingest import read_file
from driftloop.tasks.validate import ValidationResult, validate_rows, with_malformed
from tests.support.data import GOOD_ROWS, HEADER, LOAN_SPEC, write_csv, write_spec


def run(tmp_path: Path, rows: list[str], header: str = HEADER, labelled: bool = True) -> ValidationResult:
    spec = load_spec(write_spec(tmp_path))
    batch = read_file(str(write_csv(tmp_path, rows, header)))
    result = with_malformed(validate_rows(batch.frame, spec, labelled=labelled, source=batch.source), batch.malformed)
    assert result.rows_in == result.rows_valid + result.rows_quarantined
    return result


def failures(result: ValidationResult) -> list[tuple]:
    """(row, column, check, value) for each failed check, in row order."""
    out = []
    for row in result.quarantine.iter_rows(named=True):
        for col, check, value in zip(row["_columns"], row["_checks"], row["_values"], strict=True):
            out.append((row["_row"], col, check, value))
    return out


def test_clean_file_is_typed_and_nothing_quarantined(tmp_path: Path) -> None:
    result = run(tmp_path, GOOD_ROWS)
    assert (result.rows_in, result.rows_valid, result.rows_quarantined) == (4, 4, 0)
    assert result.valid.schema == pl.Schema(
        {"id": pl.Int64, "ts": pl.Datetime("us"), "amount": pl.Float64, "ratio": pl.Float64,
         "band": pl.String, "prev_ok": pl.Boolean, "term": pl.Int64, "repaid": pl.Int64}
    )
    assert result.valid["prev_ok"].to_list() == [True, False, True, False]
    assert result.valid["ratio"].to_list() == [0.1, None, 0.3, 0.4]  # empty -> null (nullable)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(SourceError, match=r"empty.csv is empty"):
        read_file(str(path))


def test_header_only(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"data.csv has a header but no data rows"):
        read_file(str(write_csv(tmp_path, [])))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"absent.csv does not exist"):
        read_file(str(tmp_path / "absent.csv"))


def test_missing_column_rejects_the_batch_naming_it(tmp_path: Path) -> None:
    header = HEADER.replace(",band", "")
    rows = [",".join(p for i, p in enumerate(r.split(",")) if i != 4) for r in GOOD_ROWS]
    with pytest.raises(SchemaError) as err:
        run(tmp_path, rows, header)
    message = str(err.value)
    assert "data.csv" in message and "missing column 'band'" in message and "spec 'loans'" in message


def test_missing_column_hints_at_case(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="'Band' looks like 'band'"):
        run(tmp_path, GOOD_ROWS, HEADER.replace("band", "Band"))


def test_missing_target_is_fine_for_unlabelled_data(tmp_path: Path) -> None:
    header = HEADER.removesuffix(",repaid")
    rows = [r.rsplit(",", 1)[0] for r in GOOD_ROWS]
    with pytest.raises(SchemaError, match="unlabelled"):
        run(tmp_path, rows, header)
    assert run(tmp_path, rows, header, labelled=False).rows_valid == 4


def test_extra_column_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [r + ",x" for r in GOOD_ROWS]
    result = run(tmp_path, rows, HEADER + ",comment")
    assert result.rows_valid == 4 and result.ignored_columns == ["comment"]
    assert "comment" not in result.valid.columns
    assert "ignoring 1 column(s) not in spec 'loans': comment" in caplog.text


def test_unparsable_values_quarantine_their_rows(tmp_path: Path) -> None:
    rows = [*GOOD_ROWS, "5,2024-01-05,forty,0.5,low,maybe,12,1", "6,not a date,1,0.5,low,true,1.5,1"]
    result = run(tmp_path, rows)
    assert result.rows_valid == 4 and result.rows_quarantined == 2
    assert failures(result) == [
        (4, "amount", "dtype(float)", "forty"),
        (4, "prev_ok", "dtype(bool)", "maybe"),
        (5, "ts", "dtype(datetime)", "not a date"),
        (5, "term", "dtype(int)", "1.5"),
    ]
    # The quarantine keeps the row as it was read.
    assert result.quarantine["amount"].to_list() == ["forty", "1"]


@pytest.mark.parametrize("value", ["NaN", "nan", "inf", "-inf", "Infinity"])
def test_nan_and_inf_in_numeric_column(tmp_path: Path, value: str) -> None:
    result = run(tmp_path, [*GOOD_ROWS, f"5,2024-01-05,{value},0.5,low,true,12,1"])
    assert result.rows_quarantined == 1
    found = failures(result)
    assert {(row, column) for row, column, _, _ in found} == {(4, "amount")}
    checks = [check for _, _, check, _ in found]
    if "nan" in value.lower():
        assert checks == ["not_nullable"]
    else:  # -inf also fails min: 0
        assert checks[0] == "finite" and set(checks) <= {"finite", "greater_than_or_equal_to(0.0)"}


def test_nan_in_nullable_column_is_missing(tmp_path: Path) -> None:
    result = run(tmp_path, [*GOOD_ROWS, "5,2024-01-05,10,NaN,low,true,12,1"])
    assert result.rows_valid == 5 and result.valid["ratio"][4] is None


def test_out_of_range_and_unknown_category(tmp_path: Path) -> None:
    rows = [*GOOD_ROWS, "5,2024-01-05,-1,1.5,low,true,12,1", "6,2024-01-06,1,0.5,platinum,true,0,1"]
    result = run(tmp_path, rows)
    assert failures(result) == [
        (4, "amount", "greater_than_or_equal_to(0.0)", "-1.0"),
        (4, "ratio", "less_than_or_equal_to(1.0)", "1.5"),
        (5, "band", "isin(['low', 'mid', 'high'])", "platinum"),
        (5, "term", "greater_than_or_equal_to(1.0)", "0"),
    ]


def test_null_in_non_nullable_column(tmp_path: Path) -> None:
    result = run(tmp_path, [*GOOD_ROWS, "5,2024-01-05,,0.5,low,true,12,1"])
    assert failures(result) == [(4, "amount", "not_nullable", None)]


def test_target_outside_binary_labels(tmp_path: Path) -> None:
    result = run(tmp_path, [*GOOD_ROWS, "5,2024-01-05,10,0.5,low,true,12,2", "6,2024-01-05,10,0.5,low,true,12,1.0"])
    assert failures(result) == [(4, "repaid", "isin([0, 1])", "2")]
    assert result.valid["repaid"].to_list()[-1] == 1  # "1.0" is the label 1


def test_duplicate_ids_keep_the_first(tmp_path: Path) -> None:
    rows = [*GOOD_ROWS, "2,2024-01-05,10,0.5,low,true,12,1", "2,2024-01-06,11,0.5,low,true,12,1"]
    result = run(tmp_path, rows)
    assert result.valid["id"].to_list() == [1, 2, 3, 4]
    assert result.valid["amount"][1] == 200.0  # the first id=2 row is the one kept
    assert failures(result) == [(4, "id", "unique", "2"), (5, "id", "unique", "2")]


def test_malformed_lines_are_quarantined_with_their_text(tmp_path: Path) -> None:
    rows = [*GOOD_ROWS, "5,2024-01-05,10,0.5,low,true,12,1,surplus", "6,2024-01-06,10", '7,"2024-01-07, late",10']
    result = run(tmp_path, rows)
    assert result.rows_in == 7 and result.rows_valid == 4 and result.rows_quarantined == 3
    # Each record exactly as written, a quoted field holding a comma included.
    records = [(row["_checks"], row["_values"]) for row in result.quarantine.iter_rows(named=True)]
    assert sorted(records) == [
        (["field_count(expected 8, found 3)"], ["6,2024-01-06,10"]),
        (["field_count(expected 8, found 3)"], ['7,"2024-01-07, late",10']),
        (["field_count(expected 8, found 9)"], ["5,2024-01-05,10,0.5,low,true,12,1,surplus"]),
    ]


def test_non_utf8_bytes_quarantine_the_record_and_keep_the_bytes(tmp_path: Path) -> None:
    path = write_csv(tmp_path, GOOD_ROWS)
    with path.open("ab") as fh:
        fh.write(b"5,2024-01-05,10,0.5,l\xf6w,true,12,1\n")
    spec = load_spec(write_spec(tmp_path))
    batch = read_file(str(path))
    result = with_malformed(validate_rows(batch.frame, spec, source=batch.source), batch.malformed)
    assert (result.rows_in, result.rows_valid, result.rows_quarantined) == (5, 4, 1)
    # Where the bad byte is in the file, and the record exactly as the file holds it (the
    # bad byte escaped), not re-rendered.
    assert result.quarantine["_checks"].to_list() == [["utf8(byte {})".format(path.read_bytes().index(b"\xf6"))]]
    assert result.quarantine["_values"].to_list() == [["5,2024-01-05,10,0.5,l\\xf6w,true,12,1"]]


def test_a_non_utf8_record_is_quarantined_exactly_as_written_quotes_and_all(tmp_path: Path) -> None:
    path = write_csv(tmp_path, GOOD_ROWS)
    with path.open("ab") as fh:
        fh.write(b'5,2024-01-05,10,0.5,"l\xf6w, north",true,12,1\n')
        fh.write(b'6,2024-01-06,10,0.5,"two\r\nlines \xe9\xff",true,12,1\r\n')  # a quoted newline, two bad bytes
        fh.write(b'7,2024-01-07,10,0.5,"fine, \xc3\xa9",true,12,1\n')  # valid UTF-8: not quarantined
        fh.write(b'8,2024-01-08,10,\xb5\n')  # bad byte and too few fields: a field-count failure
    batch = read_file(str(path))
    data = path.read_bytes()
    assert batch.malformed["_values"].to_list() == [
        ["8,2024-01-08,10,\\xb5"],
        ['5,2024-01-05,10,0.5,"l\\xf6w, north",true,12,1'],
        ['6,2024-01-06,10,0.5,"two\r\nlines \\xe9\\xff",true,12,1'],
    ]
    assert batch.malformed["_checks"].to_list() == [
        ["field_count(expected 8, found 4)"], ["utf8(byte {})".format(data.index(b"\xf6"))],
        ["utf8(byte {})".format(data.index(b"\xe9"))],
    ]
    assert batch.frame["id"].to_list()[-1] == "7"


def test_parquet_with_wrong_types_is_parsed_like_text(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path))
    frame = pl.DataFrame(
        {
            "id": [1, 2, 3], "ts": ["2024-01-01", "2024-01-02", "2024-01-03"],
            "amount": ["1.5", "x", "3"], "ratio": [0.1, None, 0.2], "band": ["low", "mid", "high"],
            "prev_ok": [1, 0, 2], "term": [12.0, 24.0, 36.0], "repaid": [1, 0, 1],
        }
    )
    path = tmp_path / "data.parquet"
    frame.write_parquet(path)
    batch = read_file(str(path))
    result = validate_rows(batch.frame, spec, source=batch.source)
    assert result.rows_valid == 1
    assert failures(result) == [(1, "amount", "dtype(float)", "x"), (2, "prev_ok", "dtype(bool)", "2")]
    assert result.valid["term"].dtype == pl.Int64


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceError, match="bad.parquet is not a readable Parquet file"):
        read_file(str(path))


def test_seen_values_finds_repeats_across_many_batches_exactly() -> None:
    """Ids kept by earlier batches (ints and strings, with nulls): a lookup is exact
    whatever the batch order, and runs stay few as batches accumulate."""
    import numpy as np

    from driftloop.tasks.validate import SeenValues

    rng = np.random.default_rng(0)
    for make in (lambda a: pl.Series("id", a, dtype=pl.Int64), lambda a: pl.Series("id", [f"c-{v}" for v in a])):
        seen, kept = SeenValues(), set()
        for _ in range(200):
            batch = rng.integers(0, 50_000, 300)
            values = make(batch)
            expected = np.array([v in kept for v in values.to_list()])
            assert (seen.contains(values).to_numpy() == expected).all()
            seen.add(values)
            kept.update(values.to_list())
        assert len(seen.runs) <= 10  # log-structured, not one run per batch
        with_null = make(np.array([1, 2])).extend(pl.Series("id", [None], dtype=make(np.array([1])).dtype))
        assert seen.contains(with_null).to_list()[-1] is False


def test_one_very_long_id_does_not_size_every_kept_id(tmp_path: Path) -> None:
    """A 100,000-character id in an untrusted input: memory follows the bytes given, not
    the longest id times the batch (numpy's fixed-width unicode made a 100,000-row batch
    40 GB). Measured as allocations (tracemalloc sees numpy's) and as what is kept."""
    import tracemalloc

    from driftloop.tasks.validate import SeenValues

    long_id = "x" * 100_000
    first = pl.Series("id", [f"c-{i}" for i in range(300)])
    second = pl.Series("id", [f"c-{i}" for i in range(300, 600)] + [long_id])
    given = first.estimated_size() + second.estimated_size()
    tracemalloc.start()
    try:
        seen = SeenValues()
        seen.add(first)
        assert not seen.contains(second).any()
        seen.add(second)
        again = seen.contains(pl.Series("id", [long_id, "c-5", "c-600", None]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert again.to_list() == [True, True, False, False]
    assert peak < 10 * given, (peak, given)  # fixed-width: ~4 bytes x 100,000 x 301 = 120 MB
    assert seen.nbytes < 3 * given, (seen.nbytes, given)

    # Through validation: the long id is an id like any other; its repeat is quarantined.
    spec = load_spec(write_spec(tmp_path, {"columns": {**LOAN_SPEC["columns"], "id": {"dtype": "string"}}}))
    rows = [f"{new_id},{row.split(',', 1)[1]}" for new_id, row in zip(["a", long_id, "b"], GOOD_ROWS, strict=False)]
    batch = read_file(str(write_csv(tmp_path, rows)))
    result = validate_rows(batch.frame, spec, seen={"id": seen})
    assert result.rows_valid == 2 and result.quarantine["_checks"].to_list() == [["unique(earlier batch)"]]
    assert result.quarantine["_row"].to_list() == [1]


def test_a_quarantine_file_can_be_ingested_again(tmp_path: Path) -> None:
    """A quarantine file holds the input's columns plus ``_row`` and the failure lists. Fixed
    and ingested again, ``_row`` collided with the position validation adds: polars'
    DuplicateError ("unexpected error") as soon as one row failed."""
    from driftloop.spec import RESERVED_COLUMN_NAMES
    from driftloop.tasks.validate import RESERVED_COLUMNS

    assert RESERVED_COLUMNS == RESERVED_COLUMN_NAMES
    first = run(tmp_path, [*GOOD_ROWS, "5,2024-01-05 00:00:00,-1,0.5,low,true,12,1", "6,2024-01-06 00:00:00,9,2.0,mid,no,6,0"])
    assert first.rows_quarantined == 2 and "_row" in first.quarantine.columns
    quarantine = tmp_path / "quarantine.parquet"
    first.quarantine.write_parquet(quarantine)
    # One row fixed (amount), one left as it was: the second pass quarantines that one again.
    fixed = pl.read_parquet(quarantine).with_columns(
        pl.when(pl.col("id") == "5").then(pl.lit("50")).otherwise(pl.col("amount")).alias("amount"))
    fixed.write_parquet(quarantine)
    batch = read_file(str(quarantine))
    second = validate_rows(batch.frame, load_spec(write_spec(tmp_path)), source=batch.source)
    assert (second.rows_in, second.rows_valid, second.rows_quarantined) == (2, 1, 1)
    assert second.valid["id"].to_list() == [5]
    assert failures(second) == [(1, "ratio", "less_than_or_equal_to(1.0)", "2.0")]  # its position in this input
    assert set(RESERVED_COLUMNS) <= set(second.ignored_columns)


def test_a_spec_column_cannot_take_a_quarantine_name() -> None:
    from pydantic import ValidationError

    from driftloop.spec import DatasetSpec

    with pytest.raises(ValidationError, match="reserved for the quarantine"):
        DatasetSpec.model_validate({**LOAN_SPEC, "columns": {**LOAN_SPEC["columns"], "_row": {"dtype": "int"}}})
